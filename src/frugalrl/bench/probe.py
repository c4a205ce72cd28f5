"""Probing along a training run: what the value and grad benches share.

One real run (``trainer.train`` as the run config says) is probed through its ``on_step``
hook by a ``Probe``:

* Probes: the first ``bench.probes`` held-out prompts (never trained on, so probing does not
  steer the run). Probes are always sampled in process, at ``rollout.temperature`` and top-p.
* Every step i, after its update, for each G in ``bench.groups``: G fresh samples of every
  probe from the current policy. They go through a KAE estimator of their own (one per G, with
  the run config's ``algo.kae_*`` options), called exactly as training with group size G calls
  it when the prompt is in every batch (a sticky schedule as long as the run), so its history
  of each probe's rewards builds up step by step.
* Every ``bench.every`` steps (a checkpoint): V(x) of each probe by Monte Carlo from
  ``bench.mc_samples`` samples (drawn before that step's G samples), then what each estimator
  gives each of that step's G samples (the same samples for all): ``grpo`` the group mean,
  ``rloo`` the leave-one-out group mean (neither exists for G = 1), ``reinforce`` the
  leave-one-out mean of the whole probe batch (P x G samples), ``reinforce_pp`` the probe batch
  mean, ``kae`` history + leave-one-out. ``Probe.measure`` records, per checkpoint, each
  baseline's squared error against V_MC(x); a bench extends it to measure more (``grad.py``).

Every sample is kept with its tokens (``Samples``), so that a measure can differentiate the
policy's log-probabilities of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from frugalrl.advantages import AdvantageOutput, get_estimator
from frugalrl.bench.options import ValueOptions
from frugalrl.config import Config
from frugalrl.evaluation import score
from frugalrl.rollout import Rollout, generate
from frugalrl.trainer import RunResult, build_estimator, load_inputs, set_seed, train

# the run a bench probes: a fixed number of steps, no held-out evaluation (the bench measures the probes)
RUN_DEFAULTS = ["max_steps=100", "max_wall_s=0", "eval_every=0"]
# estimators compared at every G, with the baseline each one names
ESTIMATORS = {"grpo": "group mean", "rloo": "group leave-one-out mean", "reinforce": "batch leave-one-out mean",
              "reinforce_pp": "batch mean", "kae": "history + group leave-one-out"}
GROUP_ONLY = ("grpo", "rloo")  # no baseline from a group of one sample
# sequences per generate call: bounds memory when probes x samples is large
_CALL = 1024


@dataclass
class Samples:
    """n samples of each of P prompts. rewards: (P, n) float64. rollouts: the P x n sequences
    in chunks of whole prompts, in order, prompt-major (sample j of prompt p is sequence
    p * n + j of the concatenated chunks)."""

    rewards: Tensor
    rollouts: list[Rollout]

    def columns(self, cols: slice) -> Samples:
        """Samples ``cols`` (of the n) of every prompt."""
        n = self.rewards.shape[1]
        keep = set(range(n)[cols])
        return Samples(self.rewards[:, cols],
                       [ro.select([i for i in range(len(ro)) if i % n in keep]) for ro in self.rollouts])


def sample(model, tokenizer, rows: list[dict], reward_fn, n: int, *, temperature: float, top_p: float,
           max_new_tokens: int) -> Samples:
    """n fresh samples of each row's prompt from ``model``, scored."""
    per_call = max(1, _CALL // n)
    rewards, rollouts = [], []
    for start in range(0, len(rows), per_call):
        chunk = rows[start:start + per_call]
        rollout = generate(model, tokenizer, [r["prompt"] for r in chunk for _ in range(n)],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        rewards.append(score(reward_fn, chunk, rollout.texts, n).view(len(chunk), n))
        rollouts.append(rollout)
    return Samples(torch.cat(rewards).double(), rollouts)


@dataclass
class Group:
    """One checkpoint's G samples of every probe and each estimator's output for them (by name;
    ``grpo`` and ``rloo`` only when G > 1)."""

    samples: Samples
    estimates: dict[str, AdvantageOutput]


class Probe:
    """The ``on_step`` hook: per-G KAE histories every step, measures at checkpoints.

    ``checkpoints``: (step, mean V_MC over probes) per checkpoint. ``values``: (P,) V_MC per
    checkpoint. ``mc_var``: per checkpoint, the mean over probes of Var(V_MC) = s^2 / M (s^2
    the sample variance of the M rewards). ``sq_err[(name, G)]``: per checkpoint, the mean over
    the P x G probe samples of (baseline - V_MC)^2.
    """

    def __init__(self, cfg: Config, opts: ValueOptions, tokenizer, rows: list[dict], reward_fn):
        self.cfg, self.opts, self.tokenizer, self.rows, self.reward_fn = cfg, opts, tokenizer, rows, reward_fn
        kae_cfg = replace(cfg, algo=replace(cfg.algo, estimator="kae"))
        self.kae = {G: build_estimator(kae_cfg) for G in opts.groups}
        self.stateless = {"grpo": get_estimator("grpo"), "rloo": get_estimator("rloo"),
                          "reinforce": get_estimator("reinforce", baseline="loo"),
                          "reinforce_pp": get_estimator("reinforce_pp")}
        self.checkpoints: list[tuple[int, float]] = []
        self.values: list[Tensor] = []
        self.mc_var: list[float] = []
        self.sq_err: dict[tuple[str, int], list[float]] = {}

    def _sample(self, model, n: int) -> Samples:
        ro = self.cfg.rollout
        return sample(model, self.tokenizer, self.rows, self.reward_fn, n, temperature=ro.temperature,
                      top_p=ro.top_p, max_new_tokens=ro.max_new_tokens)

    def __call__(self, step: int, model, rows, rollout, rewards) -> None:
        checkpoint = step % self.opts.every == 0
        mc = self._sample(model, self.opts.mc_samples) if checkpoint else None
        groups = {}
        for G in self.opts.groups:
            samples = self._sample(model, G)
            r = samples.rewards.flatten()  # (P * G,), each probe's G samples consecutive
            ids = [row["id"] for row in self.rows for _ in range(G)]
            estimates = {"kae": self.kae[G].estimate(r, ids, step)}  # every step: the history builds
            if not checkpoint:
                continue
            for name, est in self.stateless.items():
                if G > 1 or name not in GROUP_ONLY:
                    estimates[name] = est.estimate(r, ids, step)
            groups[G] = Group(samples, estimates)
        if checkpoint:
            self.measure(step, model, mc, groups)

    def measure(self, step: int, model, mc: Samples, groups: dict[int, Group]) -> None:
        """At a checkpoint: ``mc`` the Monte Carlo samples (P, M), ``groups`` the G samples per G."""
        v = mc.rewards.mean(dim=1)  # (P,)
        self.checkpoints.append((step, v.mean().item()))
        self.values.append(v)
        self.mc_var.append((mc.rewards.var(dim=1) / mc.rewards.shape[1]).mean().item())
        for G, group in groups.items():
            target = v.repeat_interleave(G)
            for name, out in group.estimates.items():
                self.sq_err.setdefault((name, G), []).append(((out.baselines - target) ** 2).mean().item())

    def mse(self, name: str, G: int) -> float | None:
        """Baseline MSE against V(x), Monte Carlo variance removed (a baseline's samples are
        independent of the Monte Carlo ones, so E[(b - V_MC)^2] = E[(b - V)^2] + Var(V_MC));
        None where there is no baseline."""
        errs = self.sq_err.get((name, G))
        return None if not errs else mean(errs) - mean(self.mc_var)


def mean(values: list[float]) -> float:
    """The mean of a non-empty list (per-checkpoint figures)."""
    return sum(values) / len(values)


def check_groups(opts: ValueOptions) -> None:
    """A ValueError unless ``bench.groups`` lists group sizes >= 1."""
    if not opts.groups or min(opts.groups) < 1:
        raise ValueError(f"bench.groups={opts.groups} must list group sizes >= 1, e.g. [1,2,4,8]")


def load_probes(cfg: Config, opts: ValueOptions, console: Console):
    """(task, probe rows, starting model, tokenizer), with the probe count checked."""
    set_seed(cfg.seed)
    task, reference, tokenizer, _ = load_inputs(cfg, console)
    if len(task.eval_rows) < opts.probes:
        raise ValueError(f"bench.probes={opts.probes} exceeds the {len(task.eval_rows)} held-out prompts; "
                         f"lower it or raise data.eval_size")
    return task, task.eval_rows[:opts.probes], reference, tokenizer


def train_probed(cfg: Config, opts: ValueOptions, console: Console, probe: Probe) -> RunResult:
    """The run, probed; a ValueError when it made no checkpoint."""
    result = train(cfg, console, on_step=probe)
    if not probe.checkpoints:
        raise ValueError(f"the run made {result.steps} steps, fewer than bench.every={opts.every}: no checkpoint; "
                         f"raise max_steps or lower bench.every")
    return result


def describe_run(cfg: Config, opts: ValueOptions, probe: Probe, result: RunResult) -> str:
    """The probes and the run, for a results page (ends without a full stop)."""
    ro = cfg.rollout
    return (f"{opts.probes} probe prompts (held-out), at {len(probe.checkpoints)} checkpoints of a "
            f"{result.steps}-step `{cfg.algo.estimator}` run ({ro.batch_prompts} prompts x G={ro.group_size}, "
            f"lr {cfg.train.lr:g}), sampling at temperature {ro.temperature:g}. V(x) from {opts.mc_samples} "
            f"samples per probe")


def trajectory(probe: Probe) -> str:
    """The mean V(x) at each checkpoint, for a results page."""
    steps = ", ".join(f"{s}: {v:.3f}" for s, v in probe.checkpoints)
    return f"Mean V(x) over the probes at each checkpoint (step: V): {steps}."


def plot_by_group(ax, curves: dict[str, list[tuple[int, float | None]]], groups: list[int], ylabel: str,
                  title: str, yscale: str = "log", floor: float = 1e-5) -> None:
    """One line per curve (label -> (G, y) points; None points skipped) against G on a log
    axis; on a log y axis a value at or below ``floor`` (an estimate with its noise removed can
    be) is drawn at it."""
    for label, points in curves.items():
        points = [(G, y) for G, y in points if y is not None]
        if points:
            ys = [max(y, floor) if yscale == "log" else y for _, y in points]
            ax.plot([G for G, _ in points], ys, "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale(yscale)
    ax.set_xticks(groups, [str(g) for g in groups])
    ax.set_xlabel("G (samples per prompt)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


@contextmanager
def figure(path: Path, panels: int):
    """Side-by-side axes to draw on (a list of ``panels``); on exit the figure is saved as a PNG
    at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
