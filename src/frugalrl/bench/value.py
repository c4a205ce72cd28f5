"""Value bench: how close each estimator's baseline comes to a prompt's true value V(x).

Protocol of ``frugalrl bench value``, along one real training run (``trainer.train`` as the
run config says, probed through its ``on_step`` hook):

* Probes: the first ``bench.probes`` held-out prompts (never trained on, so probing does not
  steer the run). Probes are always sampled in process, at ``rollout.temperature`` and top-p.
* Every step i, after its update, for each G in ``bench.groups``: G fresh samples of every
  probe from the current policy. They go through a KAE estimator of their own (one per G, with
  the run config's ``algo.kae_*`` options), called exactly as training with group size G calls
  it when the prompt is in every batch (a sticky schedule as long as the run), so its history
  of each probe's rewards builds up step by step.
* Every ``bench.every`` steps (a checkpoint): V(x) of each probe by Monte Carlo from
  ``bench.mc_samples`` samples, then the baseline each estimator gives each of that step's G
  samples (the same samples for all): ``grpo`` the group mean, ``rloo`` the leave-one-out group
  mean (neither exists for G = 1), ``reinforce`` the leave-one-out mean of the whole probe
  batch (P x G samples), ``reinforce_pp`` the probe batch mean, ``kae`` history + leave-one-out.
* MSE = mean over checkpoints, probes and samples of (baseline - V_MC(x))^2, minus the Monte
  Carlo estimate's own variance (mean over probes of s^2(x) / M, s^2 the sample variance of its
  M rewards): a baseline's samples are independent of the Monte Carlo ones, so
  E[(b - V_MC)^2] = E[(b - V)^2] + Var(V_MC).
* A*-PO apart, since its baseline targets something else: V*_ref(x), ``optimal_value`` of
  ``algo.vstar_n`` samples of the starting model at temperature 1 (``algo.astar_beta1``), the
  reference policy's soft-max value. Its MSE is reported against its own target (V*_ref from
  ``bench.mc_samples`` samples) and against the current policy's V(x).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from frugalrl.advantages import get_estimator, optimal_value
from frugalrl.bench.options import ValueOptions
from frugalrl.bench.report import fmt, merge_summary, page, table
from frugalrl.config import Config
from frugalrl.evaluation import score
from frugalrl.rollout import generate
from frugalrl.trainer import build_estimator, load_inputs, set_seed, train
from frugalrl.vstar import TEMPERATURE as VSTAR_TEMPERATURE

# the run this bench probes: a fixed number of steps, no held-out evaluation (the bench measures values)
TRAIN_DEFAULTS = ["max_steps=100", "max_wall_s=0", "eval_every=0", "output_dir=runs/bench-value"]
# estimators compared at every G, with the baseline each one names
ESTIMATORS = {"grpo": "group mean", "rloo": "group leave-one-out mean", "reinforce": "batch leave-one-out mean",
              "reinforce_pp": "batch mean", "kae": "history + group leave-one-out"}
GROUP_ONLY = ("grpo", "rloo")  # no baseline from a group of one sample
# sequences per generate call: bounds memory when probes x samples is large
_CALL = 1024


def sample_rewards(model, tokenizer, rows: list[dict], reward_fn, n: int, *, temperature: float, top_p: float,
                   max_new_tokens: int) -> torch.Tensor:
    """(len(rows), n) rewards of n fresh samples of each row's prompt from ``model``."""
    per_call = max(1, _CALL // n)
    out = []
    for start in range(0, len(rows), per_call):
        chunk = rows[start:start + per_call]
        rollout = generate(model, tokenizer, [r["prompt"] for r in chunk for _ in range(n)],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        out.append(score(reward_fn, chunk, rollout.texts, n).view(len(chunk), n))
    return torch.cat(out).double()


class _Probe:
    """The ``on_step`` hook: per-G KAE histories every step, squared baseline errors at checkpoints.

    ``sq_err[(name, G)]``: per checkpoint, the mean over the P x G probe samples of
    (baseline - V_MC)^2. ``mc_var``: per checkpoint, the mean over probes of Var(V_MC) = s^2 / M.
    ``v_star``: (P,) A*-PO's baseline V*_ref (from the starting model).
    """

    def __init__(self, cfg: Config, opts: ValueOptions, tokenizer, rows: list[dict], reward_fn,
                 v_star: torch.Tensor):
        self.cfg, self.opts, self.tokenizer, self.rows, self.reward_fn = cfg, opts, tokenizer, rows, reward_fn
        self.v_star = v_star
        kae_cfg = replace(cfg, algo=replace(cfg.algo, estimator="kae"))
        self.kae = {G: build_estimator(kae_cfg) for G in opts.groups}
        self.stateless = {"grpo": get_estimator("grpo"), "rloo": get_estimator("rloo"),
                          "reinforce": get_estimator("reinforce", baseline="loo"),
                          "reinforce_pp": get_estimator("reinforce_pp")}
        self.sq_err: dict[tuple[str, int], list[float]] = {}
        self.mc_var: list[float] = []
        self.checkpoints: list[tuple[int, float]] = []  # (step, mean V_MC over probes)
        self.astar_vs_v: list[float] = []

    def _rewards(self, model, n: int, temperature: float | None = None) -> torch.Tensor:
        ro = self.cfg.rollout
        return sample_rewards(model, self.tokenizer, self.rows, self.reward_fn, n,
                              temperature=temperature or ro.temperature, top_p=ro.top_p,
                              max_new_tokens=ro.max_new_tokens)

    def __call__(self, step: int, model, rows, rollout, rewards) -> None:
        checkpoint = step % self.opts.every == 0
        if checkpoint:
            mc = self._rewards(model, self.opts.mc_samples)
            v = mc.mean(dim=1)  # (P,)
            self.mc_var.append((mc.var(dim=1) / mc.shape[1]).mean().item())
            self.checkpoints.append((step, v.mean().item()))
            self.astar_vs_v.append(((self.v_star - v) ** 2).mean().item())
        for G in self.opts.groups:
            r = self._rewards(model, G).flatten()  # (P * G,), each probe's G samples consecutive
            ids = [row["id"] for row in self.rows for _ in range(G)]
            baselines = {"kae": self.kae[G].estimate(r, ids, step).baselines}  # every step: history builds
            if not checkpoint:
                continue
            for name, est in self.stateless.items():
                if G > 1 or name not in GROUP_ONLY:
                    baselines[name] = est.estimate(r, ids, step).baselines
            target = v.repeat_interleave(G)
            for name, b in baselines.items():
                self.sq_err.setdefault((name, G), []).append(((b - target) ** 2).mean().item())

    def mse(self, name: str, G: int) -> float | None:
        """Baseline MSE against V(x), Monte Carlo variance removed; None where there is no baseline."""
        errs = self.sq_err.get((name, G))
        return None if not errs else sum(errs) / len(errs) - sum(self.mc_var) / len(self.mc_var)


def _plot(probe: _Probe, groups: list[int], astar: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    floor = 1e-5  # log scale: a corrected MSE at or below 0 is drawn at the floor
    for name in ESTIMATORS:
        pts = [(G, probe.mse(name, G)) for G in groups if probe.mse(name, G) is not None]
        if pts:
            ax.plot([g for g, _ in pts], [max(m, floor) for _, m in pts], "o-", label=name)
    ax.axhline(max(astar, floor), ls="--", color="grey", label="astar: V*_ref vs V(x) (no G)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(groups, [str(g) for g in groups])
    ax.set_xlabel("G (samples per prompt)")
    ax.set_ylabel("MSE of baseline vs V(x)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config, opts: ValueOptions, command: str, console: Console) -> dict:
    """Train as ``cfg`` says while probing; write value.md and value.png; merge the kae/grpo MSE
    ratios at G = 2 and 4 into summary.json and return them."""
    if not opts.groups or min(opts.groups) < 1:
        raise ValueError(f"bench.groups={opts.groups} must list group sizes >= 1, e.g. [1,2,4,8]")
    t0 = time.perf_counter()
    set_seed(cfg.seed)
    task, reference, tokenizer, _ = load_inputs(cfg, console)
    if len(task.eval_rows) < opts.probes:
        raise ValueError(f"bench.probes={opts.probes} exceeds the {len(task.eval_rows)} held-out prompts; "
                         f"lower it or raise data.eval_size")
    rows = task.eval_rows[:opts.probes]
    ro = cfg.rollout
    sample = dict(temperature=VSTAR_TEMPERATURE, top_p=1.0, max_new_tokens=ro.max_new_tokens)
    v_star = optimal_value(sample_rewards(reference, tokenizer, rows, task.reward_fn, cfg.algo.vstar_n, **sample),
                           cfg.algo.astar_beta1)
    v_star_target = optimal_value(
        sample_rewards(reference, tokenizer, rows, task.reward_fn, opts.mc_samples, **sample), cfg.algo.astar_beta1)
    del reference  # train() loads its own copy of the starting model
    probe = _Probe(cfg, opts, tokenizer, rows, task.reward_fn, v_star)
    result = train(cfg, console, on_step=probe)
    if not probe.checkpoints:
        raise ValueError(f"the run made {result.steps} steps, fewer than bench.every={opts.every}: no checkpoint; "
                         f"raise max_steps or lower bench.every")
    wall = time.perf_counter() - t0

    groups = sorted(set(opts.groups))
    astar_vs_v = sum(probe.astar_vs_v) / len(probe.astar_vs_v) - sum(probe.mc_var) / len(probe.mc_var)
    astar_vs_target = ((v_star - v_star_target) ** 2).mean().item()
    ratios = {G: probe.mse("kae", G) / probe.mse("grpo", G) for G in (2, 4)
              if G in groups and probe.mse("grpo", G)}
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{cfg.algo.estimator} run, {len(probe.checkpoints)} checkpoints x {opts.probes} probes, "
             f"V(x) from {opts.mc_samples} samples")
    _plot(probe, groups, astar_vs_v, results_dir / "value.png", title)
    mse_rows = [[f"{name} ({what})", *(fmt(probe.mse(name, G)) for G in groups)] for name, what in ESTIMATORS.items()]
    steps = ", ".join(f"{s}: {v:.3f}" for s, v in probe.checkpoints)
    sections = [
        f"Baseline MSE against the Monte Carlo value V(x) of {opts.probes} probe prompts (held-out), at "
        f"{len(probe.checkpoints)} checkpoints of a {result.steps}-step `{cfg.algo.estimator}` run "
        f"({ro.batch_prompts} prompts x G={ro.group_size}, lr {cfg.train.lr:g}), sampling at temperature "
        f"{ro.temperature:g}. V(x) from {opts.mc_samples} samples per probe; its own variance "
        f"({sum(probe.mc_var) / len(probe.mc_var):.2g}) is subtracted. Protocol: `src/frugalrl/bench/value.py`.",
        table(["estimator (baseline)", *(f"G={G}" for G in groups)], mse_rows),
        "kae / grpo MSE ratio: " + (", ".join(f"G={G}: {fmt(r, 3)}" for G, r in ratios.items()) or "n/a")
        + f" (KAE: {cfg.algo.kae_kernel} kernel, bandwidth {cfg.algo.kae_bandwidth:g} "
          f"({cfg.algo.kae_bandwidth_mode}); probe history from G samples at every step).",
        "A*-PO's baseline is V*_ref(x), the starting model's soft-max value (beta1 = "
        f"{cfg.algo.astar_beta1:g}, temperature {VSTAR_TEMPERATURE:g}) from algo.vstar_n = {cfg.algo.vstar_n} "
        "samples, a different target than V(x):\n\n"
        + table(["astar baseline V*_ref against", "MSE"],
                [[f"its own target: V*_ref from {opts.mc_samples} samples", fmt(astar_vs_target)],
                 ["the current policy's V(x) (as above)", fmt(astar_vs_v)]]),
        f"Mean V(x) over the probes at each checkpoint (step: V): {steps}.",
        f"Bench wall time: {wall:.0f} s ({torch.get_num_threads()} torch threads).",
    ]
    (results_dir / "value.md").write_text(page("Value bench: baseline MSE against V(x)", command, sections))
    summary = {f"value_mse_ratio_kae_vs_grpo_g{G}": r for G, r in ratios.items()}
    merge_summary(results_dir, summary)
    console.print(f"value bench: {', '.join(f'{k}={v:.3f}' for k, v in summary.items())}; "
                  f"results in {results_dir}/value.md ({wall:.0f} s)")
    return summary
