"""Real-model bench: which conclusions of the toy benches hold on SmolLM2-135M-Instruct.

Every other bench trains the embedded 1 M-parameter character model, which memorises a sticky
batch within 8 steps, sees homogeneous sums and spends its steps in Python overhead. This one
trains the real chat model of ``make demo-real`` on its task and checks, point by point
(``CONCLUSIONS``), what the toy benches concluded.

Protocol of ``frugalrl bench real``:

* Base: ``bench.base_config`` (default ``configs/smollm2-arithmetic.yaml``, the demo's config:
  model, task, learning rate and schedule, completion length), then the bench's
  ``TRAIN_DEFAULTS``, ``--config`` and the command line's run options (``bench.configure``).
  Each run's whole config is written to its directory (``bench-config.yaml``) and trained from it.
* Runs (``bench.runs``, ``RUNS``), each at 64 sampled completions per step and the base's
  learning rate: ``rloo_g4`` (the default: RLOO, 16 prompts x G = 4), ``reinforce_g1`` (REINFORCE
  with the batch leave-one-out baseline, 64 prompts x G = 1), ``kae_j8`` and ``kae_j4`` (KAE, 32
  prompts x G = 2, each batch reused for 8 steps as the paper does, or for 4 as our preset
  does; KAE as the paper has it, without ``algo.kae_prior``), ``ppo`` (PPO with its critic head,
  64 prompts x G = 1, two clipped optimizer steps per batch, as ``configs/ppo.yaml``), and
  ``skip`` against ``rloo_pool64`` (``rollout.allocation=skip`` and uniform RLOO on a pool of 64
  training problems, where prompts recur: skip reads a prompt's history).
* Budget: ``bench.samples`` sampled completions each (a whole number of steps), accuracy read
  before training, every ``bench.eval_every_samples`` completions and at the end (greedy, on
  ``data.eval_size`` held-out problems). Every run for every seed of ``bench.seeds``,
  interleaved (seed 0 of every run, then seed 1, ...), each in its own process
  (``report.run_child``); the data split is fixed (``data.seed=0``), seeds vary sampling and
  order only. ``bench.resume=true`` reuses every run directory that holds a finished run of the
  same config (``finished_run``), and the page lists them.
* Figures: ``real_final_accuracy_<run>``: the last reading, mean over seeds with its 95 % t
  interval; deltas between runs are paired by seed (mean of the per-seed differences, t
  interval), ``real_final_accuracy_delta_kae_j8_vs_j4`` among them. Completions to target
  of the skip pair: ``bench.target_frac`` x ``rloo_pool64``'s mean final gain over the start,
  read between readings (``stats.crossing``). A sticky batch's memorisation: the mean sampled
  reward at each visit of a batch (1..J), over the KAE runs' blocks.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console

from frugalrl.bench.options import RealOptions
from frugalrl.bench.report import publish, run_child, table
from frugalrl.bench.stats import Estimate, crossing, mean_ci, ratio_ci
from frugalrl.bench.train import RunRecord, _plot, _record, fresh_runs, whole_steps
from frugalrl.checkpoint import MANIFEST
from frugalrl.config import apply_overrides, load_config, save_config
from frugalrl.models import resolve_model_path
from frugalrl.recovery import read_metrics

TRAIN_DEFAULTS = ["output_dir=runs/bench-real", "max_wall_s=0", "eval.pass_k=0", "data.seed=0"]
# label -> options on top of the base config (the demo's: RLOO, 64 prompts x G = 4)
RUNS = {
    "rloo_g4": ["rollout.batch_prompts=16"],
    "reinforce_g1": ["algo.estimator=reinforce", "algo.reinforce_baseline=loo", "rollout.batch_prompts=64",
                     "rollout.group_size=1"],
    "kae_j8": ["algo.estimator=kae", "rollout.batch_prompts=32", "rollout.group_size=2", "data.sticky_steps=8"],
    "kae_j4": ["algo.estimator=kae", "rollout.batch_prompts=32", "rollout.group_size=2", "data.sticky_steps=4"],
    "ppo": ["algo.loss=ppo", "algo.estimator=reinforce", "algo.reinforce_baseline=none", "rollout.batch_prompts=64",
            "rollout.group_size=1", "train.mini_batches=2"],
    # skip acts on a prompt's history, so the pair runs on a pool where prompts recur (64 problems,
    # visited ~5 times in 1,280 completions of 16 prompts x G = 4); the other runs draw from 20,000
    "rloo_pool64": ["rollout.batch_prompts=16", "data.size=64"],
    "skip": ["rollout.batch_prompts=16", "data.size=64", "rollout.allocation=skip"],
}
BASELINE = "rloo_g4"
# (run, the run it is compared with, the sign the toy benches found for run - comparison: 1 above,
# -1 below, 0 the same, and what they found)
DELTAS = [
    ("kae_j8", "kae_j4", -1, "KAE's sticky batches: the paper's J = 8 ends below our J = 4, because the toy "
     "memorises a batch reused 8 times (embedded: 0.34 vs 0.45 after 150 steps)"),
    ("reinforce_g1", BASELINE, 1, "at equal samples, more prompts with one completion beat groups of 4: REINFORCE "
     "G = 1 above RLOO G = 4 (train.md: 0.638 vs 0.609)"),
    ("ppo", BASELINE, 1, "PPO with its critic ends highest at equal samples (train.md: 0.663 vs RLOO's 0.609)"),
    ("kae_j4", BASELINE, -1, "KAE G = 2 ends below RLOO G = 4: a better baseline does not make up for a quarter "
     "of the distinct prompts (train.md: KAE 0.558)"),
    ("skip", "rloo_pool64", 0, "skip keeps RLOO's final accuracy (budget.md: -0.013, interval -0.03..0)"),
]
SKIP_PAIR = ("skip", "rloo_pool64")


def finished_run(run_dir: Path, cfg) -> bool:
    """Whether ``run_dir`` holds a run of exactly ``cfg`` that ended well (``bench.resume``): its
    final model complete (the manifest is written last) and its peak RSS recorded."""
    config = run_dir / "bench-config.yaml"
    return (config.is_file() and load_config(config) == cfg and (run_dir / "model" / MANIFEST).is_file()
            and (run_dir / "train.log.peak_mb").is_file())


def _delta(records: dict[str, list[RunRecord]], a: str, b: str) -> Estimate | None:
    """Final accuracy of run ``a`` minus run ``b``, paired by seed: mean with its t interval."""
    if a not in records or b not in records:
        return None
    return mean_ci([x.final - y.final for x, y in zip(records[a], records[b])])


def _gen_share(run_dir: Path) -> float:
    """Generation's share of a run's step time (its metrics' gen_s / step_s, summed over steps)."""
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step_s" in r]
    return sum(r["gen_s"] for r in steps) / sum(r["step_s"] for r in steps)


def block_rewards(run_dir: Path, sticky: int) -> list[float]:
    """Mean sampled reward at the k-th visit of a sticky batch, k = 1..``sticky``, over the run's
    whole blocks: a reward that climbs within a block while held-out accuracy does not is the
    batch being memorised."""
    rewards = [r["reward_mean"] for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]
    blocks = [rewards[i:i + sticky] for i in range(0, len(rewards) - sticky + 1, sticky)]
    return [statistics.fmean(block[k] for block in blocks) for k in range(sticky)] if blocks else []


def _cell(estimate: Estimate | None) -> str:
    if estimate is None:
        return "not run"
    interval = f" [{estimate.low:+.3f}, {estimate.high:+.3f}]" if estimate.n >= 2 else " (one seed)"
    return f"{estimate.value:+.3f}{interval}"


def verdict(estimate: Estimate | None, sign: int) -> str:
    """Whether a difference the toy found > 0 (``sign`` 1), < 0 (-1) or 0 (0) is so here, by its
    95 % interval."""
    if estimate is None:
        return "not run"
    if estimate.n < 2:
        return "one seed: no verdict"
    if estimate.low == estimate.high:  # every seed gave the same difference (readings are multiples of 1/N)
        return "not resolved (every seed gives the same difference: no spread for an interval)"
    if sign == 0:
        return "holds (interval includes 0)" if estimate.low <= 0 <= estimate.high else "does not hold"
    near, far = sorted((sign * estimate.low, sign * estimate.high))  # the interval in the toy's direction
    if near > 0:
        return "holds"
    return "reversed" if far < 0 else "not resolved (interval includes 0)"


def conclusions(records: dict[str, list[RunRecord]], shares: dict[str, list[float]],
                blocks: dict[str, list[list[float]]], skip_samples: Estimate | None,
                skip_crossings: list[tuple[float | None, float | None]] = ()) -> list[list[str]]:
    """The toy benches' conclusions (bench/results/train.md, budget.md, the kae preset, MEASURED)
    against this bench's figures: [what the toy showed, the figure on SmolLM2, holds?]."""
    rows = [[toy, f"final accuracy {a} - {b}: {_cell(_delta(records, a, b))}", verdict(_delta(records, a, b), sign)]
            for a, b, sign, toy in DELTAS]
    claim = "skip reaches uniform RLOO's target with fewer completions (budget.md: 0.81x)"
    if skip_samples is not None:  # the ratio's distance from 1, so that verdict reads it as a difference
        below_one = Estimate(skip_samples.value - 1, skip_samples.low - 1, skip_samples.high - 1, skip_samples.n)
        rows.append([claim, f"completions to target, skip / rloo_pool64: {skip_samples}", verdict(below_one, -1)])
    elif skip_crossings:  # some run never reached the target: no ratio, but a count
        missed = [sum(pair[i] is None for pair in skip_crossings) for i in (0, 1)]
        n = len(skip_crossings)
        rows.append([claim, f"target not reached within the budget: skip in {missed[0]} of {n} seeds, rloo_pool64 in "
                     f"{missed[1]} of {n}", "does not hold" if missed[0] > missed[1] else "not resolved"])
    for label, curves in blocks.items():
        if curves and all(curves):
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
            rise = mean_ci([c[-1] - c[0] for c in curves])
            rows.append([f"a batch reused J times is memorised: its sampled reward climbs within the block ({label})",
                         f"mean reward at visits 1..{len(mean)}: " + ", ".join(f"{m:.2f}" for m in mean)
                         + f"; last - first visit {_cell(rise)}", verdict(rise, 1)])
    if shares:
        share = statistics.fmean(x for s in shares.values() for x in s)
        rows.append(["generation is 40-50 % of a step (MEASURED.md; the toy's step is mostly Python overhead)",
                     "generation's share of step time: " + ", ".join(f"{label} {statistics.fmean(s):.0%}"
                                                                     for label, s in shares.items()),
                     "holds" if 0.4 <= share <= 0.5 else f"does not hold ({share:.0%} over all runs)"])
    return rows


def run(cfg, opts: RealOptions, command: str, console: Console) -> dict:
    """Train every ``bench.runs`` label for every seed; write real.md and real.png; merge
    ``real_final_accuracy_<run>`` and the deltas into summary.json and return them."""
    unknown = [label for label in opts.runs if label not in RUNS]
    if unknown or not opts.runs or not opts.seeds:
        raise ValueError(f"bench.runs={opts.runs} must name some of {list(RUNS)} and bench.seeds some seeds")
    plans = {}
    for label in opts.runs:  # every run checked before any starts
        run_cfg = apply_overrides(cfg, RUNS[label])
        per_step = run_cfg.rollout.batch_prompts * run_cfg.rollout.group_size
        plans[label] = (run_cfg, whole_steps(opts.samples, per_step, "bench.samples", label),
                        whole_steps(opts.eval_every_samples, per_step, "bench.eval_every_samples", label))
    model = resolve_model_path(cfg, console).resolve()  # a GGUF model dequantised once, before the runs
    out_root = Path(cfg.output_dir)
    records: dict[str, list[RunRecord]] = {label: [] for label in opts.runs}
    shares: dict[str, list[float]] = {label: [] for label in opts.runs}
    blocks: dict[str, list[list[float]]] = {}
    jobs = [(seed, label) for seed in opts.seeds for label in opts.runs]

    def run_config(seed: int, label: str, run_dir: Path):
        run_cfg, steps, every = plans[label]
        return apply_overrides(run_cfg, [f"model.name_or_path={json.dumps(str(model))}", f"seed={seed}",
                                         f"output_dir={run_dir}", f"max_steps={steps}", f"eval_every={every}"])

    def finished(seed: int, label: str, run_dir: Path) -> bool:
        return opts.resume and finished_run(run_dir, run_config(seed, label, run_dir))

    reused = []
    for seed, label, run_dir in fresh_runs("bench real", jobs, out_root, console, keep=finished):
        run_cfg = plans[label][0]
        if finished(seed, label, run_dir):
            reused.append(f"{label} seed {seed}")
            # its process's seconds are not kept; this page does not use them (training time is the run's own)
            seconds, rss = float("nan"), float((run_dir / "train.log.peak_mb").read_text())
            console.print(f"bench real: {label} seed {seed}: the finished run in {run_dir} is reused")
        else:
            # the run's whole config in a file of its own: the child reads exactly what was checked here
            save_config(run_config(seed, label, run_dir), run_dir / "bench-config.yaml")
            seconds, rss = run_child("frugalrl.cli", ["train", "--config", str(run_dir / "bench-config.yaml")],
                                     run_dir / "train.log")
        records[label].append(_record(label, seed, run_dir, seconds, rss))
        shares[label].append(_gen_share(run_dir))
        if run_cfg.data.sticky_steps > 1:
            blocks.setdefault(label, []).append(block_rewards(run_dir, run_cfg.data.sticky_steps))

    start = statistics.fmean(r.curve[0][2] for runs in records.values() for r in runs)
    summary: dict[str, float | None] = {}
    for label in RUNS:  # null for a run not made, so that no stale figure survives
        key = f"real_final_accuracy_{label}"
        summary.update(mean_ci([r.final for r in records[label]]).as_summary(key) if label in records
                       else dict.fromkeys([key, f"{key}_ci_low", f"{key}_ci_high"]))
    for a, b, _, _ in DELTAS:
        key = f"real_final_accuracy_delta_{a}_vs_{b}"
        delta = _delta(records, a, b)
        summary.update(delta.as_summary(key) if delta else dict.fromkeys([key, f"{key}_ci_low", f"{key}_ci_high"]))
    skip, uniform = SKIP_PAIR
    target, skip_samples, pairs = None, None, []
    if skip in records and uniform in records:
        target = start + opts.target_frac * (statistics.fmean(r.final for r in records[uniform]) - start)
        pairs = [(crossing(x.curve, target, 1), crossing(y.curve, target, 1))
                 for x, y in zip(records[skip], records[uniform])]
        if all(x is not None and y for x, y in pairs):
            skip_samples = ratio_ci(*map(list, zip(*pairs)), paired=True)
    key = "real_skip_samples_to_target_ratio_vs_rloo"
    summary.update(skip_samples.as_summary(key) if skip_samples else dict.fromkeys([key, f"{key}_ci_low",
                                                                                    f"{key}_ci_high"]))

    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    title = (f"SmolLM2-135M-Instruct, {len(opts.seeds)} seeds x {opts.samples} sampled completions per run "
             f"(start {start:.3f})" + (f"; dotted: skip's target {target:.3f}" if target is not None else ""))
    _plot(records, target, results_dir / "real.png", title)
    b = cfg
    rows = [[label, " ".join(RUNS[label]), f"{plans[label][1]} x {opts.samples // plans[label][1]}",
             str(mean_ci([r.final for r in runs])), f"{statistics.fmean(r.train_s for r in runs):.0f}",
             f"{statistics.fmean(shares[label]):.0%}", f"{statistics.fmean(r.peak_rss_mb for r in runs):.0f}"]
            for label, runs in records.items()]
    sections = [
        f"Every run starts from `{b.model.name_or_path}` (`{model.name}`), held-out greedy accuracy "
        f"{start:.3f} on {next(iter(records.values()))[0].eval_prompts} problems (mean over runs), and trains on "
        f"{opts.samples} sampled completions (64 a step), seeds {list(opts.seeds)}, with the base config "
        f"`{opts.base_config}` (lr {b.train.lr:g} with a {b.train.lr_schedule} schedule, LoRA r = {b.lora.r}, "
        f"completions of at most {b.rollout.max_new_tokens} "
        f"tokens at temperature {b.rollout.temperature:g}). Accuracy is read before training, every "
        f"{opts.eval_every_samples} completions and at the end. Means over seeds, [95 % t interval]; deltas "
        "paired by seed. Protocol: `src/frugalrl/bench/real.py`.",
        *([f"Reused from an earlier invocation's finished run directories (`bench.resume=true`; the wall time "
           f"above is this invocation's alone): {', '.join(reused)}."] if reused else []),
        table(["run", "options on the base", "steps x completions", "final accuracy", "training time (s)",
               "generation share", "peak RSS (MB)"], rows),
        "![accuracy against training time and completions](real.png)",
        "## Which conclusions of the toy benches hold on SmolLM2\n\n"
        + table(["on the embedded 1 M model", "on SmolLM2-135M", "holds?"],
                conclusions(records, shares, blocks, skip_samples, pairs)),
    ]
    return publish(results_dir, "real", "Real-model bench: SmolLM2-135M-Instruct", command, sections, summary,
                   console)
