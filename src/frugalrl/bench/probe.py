"""Probing along a training run: what the value and grad benches share.

One real run (``trainer.train`` as the run config says) is probed through its ``on_step``
hook by a ``Probe``:

* Probes: the first ``bench.probes`` held-out prompts (never trained on, so probing does not
  steer the run). Probes are always sampled in process, at ``rollout.temperature`` and top-p.
* Every step i, after its update, for each G in ``bench.groups``: G fresh samples of every
  probe from the current policy. Every ``bench.every`` steps (a checkpoint): V(x) of each probe
  by Monte Carlo from ``bench.mc_samples`` samples (drawn before that step's G samples), then
  what each estimator gives each of that step's G samples (the same samples for all): ``grpo``
  the group mean, ``rloo`` the leave-one-out group mean (neither exists for G = 1),
  ``reinforce`` the leave-one-out mean of the whole probe batch (P x G samples),
  ``reinforce_pp`` the probe batch mean, ``kae`` and ``kae_every_step`` history + leave-one-out.
  ``Probe.measure`` records, per checkpoint, each baseline's squared error against V_MC(x) per
  probe; a bench extends it to measure more (``grad.py``).
* KAE is the one estimator whose baseline depends on the prompt schedule (its history); two KAE
  estimators per G, each with ``bench.kae_preset``'s ``algo.kae_*`` options and called exactly
  as training with group size G calls it, differ in when a probe's rewards enter its history:
  - ``kae``, as the preset trains (the headline): the trainer's ``PromptSampler`` over the run's
    training pool with the preset's ``rollout.batch_prompts`` and ``data.sticky_steps`` and the
    run's seed. At checkpoint c, probe p stands in for a prompt of the sampler's batch at
    sampler step c + (p mod sticky_steps), and is sampled at that prompt's steps in the
    sampler's order up to then, read back by the same offset (``schedule_visits``), each
    (probe, checkpoint) with a history of its own: a first visit has none, a sticky batch at
    most sticky_steps - 1 steps, and an earlier epoch's visits count where the kernel reaches
    them. The offset puts the probes at every position of a sticky block in equal shares at
    every checkpoint, as training's steps are on average (read unshifted, all would sit at the
    checkpoint step's one position).
  - ``kae_every_step``: every probe at every step, so that at a checkpoint it has all the
    run's steps of history: the best case for KAE, an upper bound on what it can do.
  Both shrink toward the preset's ``algo.kae_prior``; ``kae_<prior>``, for each prior of
  ``bench.kae_priors``, is the scheduled KAE with that prior instead, fed the same samples.
* KAE's priors (``passrate.py``) come from the probed run as the trainer would build them: the
  run's rewards (``on_step``) go into a pass-rate estimate of the Probe's own, which fits kappa
  and gives the population mean; the cross-prompt prior reads the starting model's embeddings of
  the training prompts and the probes (``prior_inputs``). Probes never enter that history: a
  probe's prior comes from the training prompts only.

Every sample is kept with its tokens (``Samples``), so that a measure can differentiate the
policy's log-probabilities of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from frugalrl.advantages import AdvantageOutput, get_estimator
from frugalrl.bench.options import ValueOptions
from frugalrl.bench.stats import Estimate, ratio_ci
from frugalrl.config import Config, ConfigError, load_config
from frugalrl.data import PromptSampler
from frugalrl.evaluation import score
from frugalrl.history import PromptHistory
from frugalrl.passrate import PassRateEstimator, prompt_embeddings
from frugalrl.rollout import Rollout, generate
from frugalrl.trainer import RunResult, build_estimator, load_inputs, set_seed, train

# the run a bench probes: a fixed number of steps, no held-out evaluation (the bench measures the probes)
RUN_DEFAULTS = ["max_steps=100", "max_wall_s=0", "eval_every=0"]
# KAE fed every probe at every step: its upper bound
EVERY_STEP = "kae_every_step"
# estimators compared at every G, with the baseline each one names
ESTIMATORS = {"grpo": "group mean", "rloo": "group leave-one-out mean", "reinforce": "batch leave-one-out mean",
              "reinforce_pp": "batch mean", "kae": "history + group leave-one-out, as the KAE preset trains",
              EVERY_STEP: "the same, every probe at every step: best case for KAE"}
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


def load_kae_preset(opts: ValueOptions) -> Config:
    """``bench.kae_preset`` loaded; a ConfigError naming the option when it cannot be, a
    ValueError unless it is a KAE preset."""
    try:
        preset = load_config(opts.kae_preset)
    except ConfigError as err:
        raise ConfigError(f"bench.kae_preset: {err} (a path from the current directory: run from the repository's "
                          f"root or give the preset's path)") from None
    if preset.algo.estimator != "kae":
        raise ValueError(f"bench.kae_preset={opts.kae_preset} trains algo.estimator={preset.algo.estimator}; "
                         f"point it at a KAE preset such as configs/kae.yaml")
    return preset


def schedule_visits(pool: int, batch_prompts: int, sticky_steps: int, seed: int, probes: int,
                    checkpoints: list[int]) -> dict[int, list[tuple[int, int]]]:
    """When to sample each probe so that at each checkpoint it has the history training gives a
    prompt: run step -> [(probe, checkpoint)], the checkpoint's own step included.

    The schedule is the trainer's ``PromptSampler`` over ``pool`` prompts (its batches of
    ``batch_prompts``, each kept ``sticky_steps`` steps, shuffled epochs from ``seed``). At
    checkpoint c, probe p (offset o = p mod sticky_steps) stands in for prompt p mod
    batch_prompts of the sampler's batch at sampler step c + o; that prompt's sampler steps
    v <= c + o are the probe's visits at run steps v - o (those before the run's first step
    dropped). A ValueError when the pool is smaller than a batch.
    """
    if not checkpoints:
        return {}
    sampler = PromptSampler(list(range(pool)), batch_prompts, sticky_steps, seed)
    batches = [sampler.next() for _ in range(max(checkpoints) + sticky_steps - 1)]  # sampler step u: [u - 1]
    members = [set(batch) for batch in batches]
    visits: dict[int, list[tuple[int, int]]] = {}
    for c in checkpoints:
        for p in range(probes):
            offset = p % sticky_steps
            prompt = batches[c + offset - 1][p % batch_prompts]
            for v in range(offset + 1, c + offset + 1):
                if prompt in members[v - 1]:
                    visits.setdefault(v - offset, []).append((p, c))
    return visits


def _key(probe: int, checkpoint: int) -> str:
    """The scheduled KAE's prompt id of a probe standing in for the prompt it measures at ``checkpoint``."""
    return f"probe{probe}@{checkpoint}"


def _probe(key: str) -> int:
    """The probe a scheduled KAE's prompt id (``_key``) stands for."""
    return int(key.removeprefix("probe").partition("@")[0])


def kae_priors(opts: ValueOptions, preset: Config) -> list[str]:
    """The priors the probed KAEs use: the preset's ``algo.kae_prior`` and ``bench.kae_priors``, less
    "none"; a ValueError for vstar, whose kappa would need A*-PO's stage 1 over the training pool."""
    kinds = [k for k in dict.fromkeys([preset.algo.kae_prior, *opts.kae_priors]) if k != "none"]
    if "vstar" in kinds:
        raise ValueError("bench value/grad measure KAE's prior from the probed run's training prompts, and a vstar "
                         "prior needs A*-PO's stage 1 over all of them: leave vstar out of bench.kae_priors and "
                         "bench.kae_preset's algo.kae_prior")
    return kinds


def prior_inputs(opts: ValueOptions, task, rows: list[dict], reference, tokenizer) -> dict:
    """What the probed KAEs' priors need from the starting model (``reference``), as keyword
    arguments of ``Probe``: the embeddings of the training prompts and the probes where a
    cross_prompt prior is measured."""
    if "cross_prompt" not in kae_priors(opts, load_kae_preset(opts)):
        return {}
    every = task.train_rows + rows
    vectors = prompt_embeddings(reference, tokenizer, [r["prompt"] for r in every])
    return {"embeddings": ([r["id"] for r in every], vectors)}


class Probe:
    """The ``on_step`` hook: KAE histories as its schedules say, measures at checkpoints.

    ``pool``: the run's training prompts (their number sets the scheduled KAE's epochs).
    ``checkpoints``: (step, mean V_MC over probes) per checkpoint. ``values``: (P,) V_MC per
    checkpoint. ``mc_var``: (P,) per checkpoint, Var(V_MC(x)) = s^2 / M (s^2 the sample
    variance of the M rewards). ``sq_err[(name, G)]``: (P,) per checkpoint, the mean over each
    probe's G samples of (baseline - V_MC)^2. ``rates``: the pass-rate estimate of the run's
    training rewards that KAE's priors read. ``described``: every baseline measured -> what it is.
    ``embeddings``: what a cross_prompt prior needs (``prior_inputs``).
    """

    def __init__(self, cfg: Config, opts: ValueOptions, tokenizer, rows: list[dict], reward_fn, pool: int,
                 embeddings: tuple[list[str], Tensor] | None = None):
        self.cfg, self.opts, self.tokenizer, self.rows, self.reward_fn = cfg, opts, tokenizer, rows, reward_fn
        self.preset = load_kae_preset(opts)
        # the probed run's rewards, from which KAE's priors are built as the trainer builds them
        self.rates = PassRateEstimator(PromptHistory(), kinds=kae_priors(opts, self.preset),
                                       embeddings=embeddings, neighbors=self.preset.rollout.prior_neighbors)
        preset_prior = self.preset.algo.kae_prior
        self.kae = {G: self._kae(preset_prior) for G in opts.groups}
        self.kae_every_step = {G: self._kae(preset_prior) for G in opts.groups}
        self.kae_with = {(kind, G): self._kae(kind) for kind in opts.kae_priors for G in opts.groups}
        self.described = {**ESTIMATORS, **{f"kae_{kind}": f"the scheduled KAE with algo.kae_prior={kind}"
                                           for kind in opts.kae_priors}}
        try:
            self.visits = schedule_visits(pool, self.preset.rollout.batch_prompts, self.preset.data.sticky_steps,
                                          cfg.seed, len(rows), list(range(opts.every, cfg.max_steps + 1, opts.every)))
        except ValueError as err:
            raise ValueError(f"bench.kae_preset={opts.kae_preset}: {err} of the probed run; point it at a preset "
                             f"with fewer prompts per batch") from None
        self.pool = pool
        self.stateless = {"grpo": get_estimator("grpo"), "rloo": get_estimator("rloo"),
                          "reinforce": get_estimator("reinforce", baseline="loo"),
                          "reinforce_pp": get_estimator("reinforce_pp")}
        self.checkpoints: list[tuple[int, float]] = []
        self.values: list[Tensor] = []
        self.mc_var: list[Tensor] = []
        self.sq_err: dict[tuple[str, int], list[Tensor]] = {}

    def _kae(self, prior: str):
        """A KAE with the preset's options, shrunk toward prior ``prior`` ("none": not shrunk)."""
        kae = build_estimator(self.preset)
        if prior != "none":
            def shrink_toward(keys: list[str]):  # a scheduled KAE's keys name the probes they stand for
                ids = [self.rows[_probe(k)]["id"] if "@" in k else k for k in keys]
                return self.rates.priors(ids, prior), self.rates.strength(prior)
            kae.use_prior(shrink_toward)
        return kae

    def _sample(self, model, rows: list[dict], n: int) -> Samples:
        ro = self.cfg.rollout
        return sample(model, self.tokenizer, rows, self.reward_fn, n, temperature=ro.temperature,
                      top_p=ro.top_p, max_new_tokens=ro.max_new_tokens)

    def __call__(self, step: int, model, rows, rollout, rewards) -> None:
        if rows is not None:  # the run's step, as the trainer's pass-rate estimate records it
            self.rates.record([row["id"] for row in rows], rewards.tolist(), step)
        checkpoint = step % self.opts.every == 0
        mc = self._sample(model, self.rows, self.opts.mc_samples) if checkpoint else None
        # the checkpoint's own visits are measured on the samples that every estimator gets, below
        visits = [(p, c) for p, c in self.visits.get(step, []) if c != step]
        groups = {}
        for G in self.opts.groups:
            scheduled = {"kae": self.kae[G], **{f"kae_{k}": self.kae_with[k, G] for k in self.opts.kae_priors}}
            if visits:
                r = self._sample(model, [self.rows[p] for p, _ in visits], G).rewards.flatten()
                keys = [_key(p, c) for p, c in visits for _ in range(G)]
                for kae in scheduled.values():
                    kae.estimate(r, keys, step)
            samples = self._sample(model, self.rows, G)
            r = samples.rewards.flatten()  # (P * G,), each probe's G samples consecutive
            ids = [row["id"] for row in self.rows for _ in range(G)]
            estimates = {EVERY_STEP: self.kae_every_step[G].estimate(r, ids, step)}
            if not checkpoint:
                continue
            keys = [_key(p, step) for p in range(len(self.rows)) for _ in range(G)]
            for name, kae in scheduled.items():
                estimates[name] = kae.estimate(r, keys, step)
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
        self.mc_var.append(mc.rewards.var(dim=1) / mc.rewards.shape[1])
        for G, group in groups.items():
            target = v.repeat_interleave(G)
            for name, out in group.estimates.items():
                self.sq_err.setdefault((name, G), []).append(((out.baselines - target) ** 2).view(-1, G).mean(dim=1))

    def noise(self) -> Tensor:
        """(P,) each probe's Var(V_MC(x)), the mean over checkpoints."""
        return torch.stack(self.mc_var).mean(dim=0)

    def probe_mse(self, name: str, G: int) -> Tensor | None:
        """(P,) each probe's baseline MSE against V(x), Monte Carlo variance removed (a baseline's
        samples are independent of the Monte Carlo ones, so E[(b - V_MC)^2] = E[(b - V)^2] +
        Var(V_MC)); None where there is no baseline."""
        errs = self.sq_err.get((name, G))
        return None if not errs else torch.stack(errs).mean(dim=0) - self.noise()

    def mse(self, name: str, G: int) -> float | None:
        """The baseline MSE against V(x) over all probes (``probe_mse``'s mean)."""
        per_probe = self.probe_mse(name, G)
        return None if per_probe is None else per_probe.mean().item()

    def mse_ratio(self, name: str, against: str, G: int) -> Estimate | None:
        """mse(name) / mse(against) at G with a 95 % bootstrap interval, probes resampled (the two
        estimators' errors paired by probe); None where either has no baseline or ``against``'s
        MSE is 0."""
        num, den = self.probe_mse(name, G), self.probe_mse(against, G)
        if num is None or den is None or den.mean().item() == 0:
            return None
        return ratio_ci(num.tolist(), den.tolist(), paired=True)

    def schedule(self) -> str:
        """The scheduled KAE's schedule and options, for a results page (ends without a full stop)."""
        a, batch, sticky = self.preset.algo, self.preset.rollout.batch_prompts, self.preset.data.sticky_steps
        epoch = self.pool // batch * sticky
        return (f"`kae` as `{self.opts.kae_preset}` trains: batches of {batch} prompts from the run's pool of "
                f"{self.pool}, each for data.sticky_steps = {sticky} steps (a prompt's first visit has no history, "
                f"a later one of its batch the rewards of at most {sticky - 1} earlier steps; it comes back once an "
                f"epoch, {epoch} steps); `{EVERY_STEP}`: every probe at every step, the best case for KAE. Both with "
                f"the {a.kae_kernel} kernel, bandwidth {a.kae_bandwidth:g} ({a.kae_bandwidth_mode}) and "
                f"algo.kae_prior={a.kae_prior}; the preset trains at G = {self.preset.rollout.group_size}")


def mean(values: list[float]) -> float:
    """The mean of a non-empty list (per-checkpoint figures)."""
    return sum(values) / len(values)


def ratio_summary(key: str, ratios: dict[int, Estimate], suffix: str = "") -> dict[str, float | None]:
    """``summary.json`` entries KEY_gG{suffix} (and _ci_low, _ci_high) for G = 2 and 4: the ratio
    where there is one, else null, so that no stale number is left standing."""
    out: dict[str, float | None] = {}
    for G in (2, 4):
        name = f"{key}_g{G}{suffix}"
        out.update(ratios[G].as_summary(name) if G in ratios
                   else {name: None, f"{name}_ci_low": None, f"{name}_ci_high": None})
    return out


def ratio_line(ratios: dict[int, Estimate]) -> str:
    """Ratios by G with their intervals, for a results page: "G=2: 0.8 [0.7, 0.9], ..." or "n/a"."""
    return ", ".join(f"G={G}: {r}" for G, r in ratios.items()) or "n/a"


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
