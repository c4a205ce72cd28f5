"""Budget bench: where a step's completions go (``rollout.allocation``, dynamic sampling), on finite pools.

Protocol of ``frugalrl bench budget``:

* Tasks (``bench.tasks``, ``TASKS``): ``embedded``, the built-in arithmetic task with
  ``data.train_size`` = ``bench.pool``, and ``gym-chain-sum``, ``configs/gym-chain-sum.yaml`` with
  ``data.size`` = ``bench.pool``: finite pools, as real datasets are, seen for many epochs. Each
  task trains from its own SFT checkpoint (built once, before the runs); the data split is fixed
  (``data.seed=0``).
* Runs (``bench.runs``, ``RUNS``): RLOO, 64 prompts x G = 4 = 256 trained completions per step
  (the rloo preset; gym-chain-sum's config is RLOO with the same batch), as ``uniform`` (the
  plain method), ``dynamic`` (DAPO's dynamic sampling: more prompts generated until 64 groups
  differ), ``skip``, ``budget`` and ``budget_cross`` (budget with the cross-prompt prior), each for
  every seed of ``bench.seeds``, interleaved (seed 0 of every run, then seed 1...), each its own
  process (``train.run_child``), ``bench.steps`` steps, accuracy read every ``bench.eval_every``
  steps (greedy, on ``bench.eval_size`` held-out prompts: one reading's standard error is at most
  0.5 / sqrt(eval_size), 0.016 at 1,024) and at the end.
* Target: ``bench.target_frac`` x the mean final accuracy of ``uniform`` (per task). A run's time
  and completions to target are the training wall clock (evaluation excluded) and the completions
  it *generated* (dynamic sampling's dropped groups included) where its accuracy curve first
  reaches the target, read linearly between the reading before and the first reading at or
  above it (``crossing``): a reading every 10 steps would otherwise round every crossing up to
  the next reading, and steps' worth of noise with it. ``dynamic_steps_to_target_ratio_vs_rloo``:
  dynamic sampling's training steps to target over uniform's, the floor under skip's completions
  ratio (a step of either trains the same completions; dynamic's hold only groups that differ).
* Ratios per task (``summary.json`` keys end in ``TASKS[task]``'s suffix): each run's mean over
  seeds / uniform's (time and completions to target), with 95 % bootstrap intervals resampling
  seeds (paired); final accuracy as a paired difference (mean over seeds of run - uniform, t
  interval); budget's time to target over dynamic sampling's. ``prior_brier_ratio_cross_prompt_vs_population``:
  in the ``budget_cross`` runs, the Brier score of the cross-prompt prior at prompts' first visits
  over that of the population mean at the same visits (every row's ``prior_brier_*`` weighted by
  its ``first_visits``), mean over seeds with a t interval.
* Calibration (``all_equal_calibration_gap``): in the ``uniform`` runs, the gap of the reliability
  diagram of the predicted chance that a group's rewards are all equal (``allocation.calibration_gap``:
  groups binned by prediction, |mean prediction - realised share| weighed by the bin's groups),
  mean over seeds with a t interval; the diagram of every run is drawn in budget-TASK-calibration.png.
  The page also gives the per-step mean |all_equal_predicted - all_equal_realised| and the floor
  that one step's groups put under it even for calibrated predictions.
* Resolution: the page gives each ratio's 95 % half-width against ``RESOLUTION`` (0.15): the
  seeds needed are what it took for the intervals to be that narrow.
* DASH against the GRPO its authors compared with, TRL's ``GRPOTrainer`` (``bench.dash_samples`` >
  0): the embedded task's whole pool, every seed of ``bench.dash_seeds`` (its own: 3 resolved that
  ratio, and the allocation runs need more), each side ``bench.dash_samples`` sampled
  completions, one torch thread each (as ``bench peer``, whose TRL run this is: same model, rows,
  reward and GRPO settings, ``peer.py``), held-out accuracy every ``bench.dash_eval_every_samples``
  completions (TRL's from a callback, its time left out). Target: ``bench.target_frac`` x TRL's
  mean final accuracy; ``time_to_target_ratio_dash_vs_trl_grpo``: DASH's mean training time to it
  over TRL's, paired bootstrap interval. DASH reports 0.17 (GPU, Qwen2.5-0.5B).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from rich.console import Console

from frugalrl.allocation import calibration_gap
from frugalrl.bench import peer
from frugalrl.bench.options import BudgetOptions
from frugalrl.bench.probe import figure
from frugalrl.bench.report import publish, run_child, table
from frugalrl.bench.stats import Estimate, crossing, mean_ci, ratio_ci
from frugalrl.bench.train import RunRecord, _plot, _record, fresh_runs
from frugalrl.config import Config, changed_options, load_config, save_config
from frugalrl.models import resolve_model_path
from frugalrl.plots import draw_reliability
from frugalrl.recovery import read_metrics

TRAIN_DEFAULTS = ["output_dir=runs/bench-budget", "max_wall_s=0", "eval.pass_k=0", "data.seed=0"]
# task -> (config file, its pool option, summary-key suffix)
TASKS = {"embedded": ("rloo.yaml", "data.train_size", ""),
         "gym-chain-sum": ("gym-chain-sum.yaml", "data.size", "_gym")}
# label -> options on top of the task's config
RUNS = {
    "uniform": [],
    "dynamic": ["rollout.dynamic_sampling=true"],
    "skip": ["rollout.allocation=skip"],
    "budget": ["rollout.allocation=budget"],
    "budget_cross": ["rollout.allocation=budget", "rollout.passrate_prior=cross_prompt"],
}
BASELINE = "uniform"
# the issues' goals, per summary key (without the task suffix)
AIMS = {"budget_time_to_target_ratio_vs_rloo": "<= 0.6", "budget_samples_to_target_ratio_vs_rloo": "<= 0.5",
        "budget_final_accuracy_delta_vs_rloo": ">= -0.01", "budget_time_to_target_ratio_vs_dynamic_sampling": "<= 0.8",
        "prior_brier_ratio_cross_prompt_vs_population": "<= 0.8", "skip_samples_to_target_ratio_vs_rloo": "<= 0.6",
        "skip_final_accuracy_delta_vs_rloo": ">= -0.01", "all_equal_calibration_gap": "<= 0.03"}
FLOOR_KEY = "dynamic_steps_to_target_ratio_vs_rloo"  # the floor under skip's completions ratio
RESOLUTION = 0.15  # the 95 % half-width a ratio should have to resolve a 20 % effect


def time_to(record: RunRecord, target: float) -> float | None:
    """Training seconds to ``target`` (``crossing``)."""
    return crossing(record.curve, target, 0)


def samples_to(record: RunRecord, target: float) -> float | None:
    """Completions generated to ``target`` (``crossing``)."""
    return crossing(record.curve, target, 1)


def steps_to(record: RunRecord, rows: list[dict], target: float) -> float | None:
    """Training steps to ``target`` (``crossing``); ``rows``: the run's per-step metrics rows, whose
    cumulative ``samples`` date each reading."""
    step_of = {0: 0, **{r["samples"]: r["step"] for r in rows}}
    return crossing([(step_of[s], s, accuracy) for _, s, accuracy in record.curve], target, 0)


def step_gap(rows: list[dict]) -> tuple[float, float]:
    """(mean over steps of |all_equal_predicted - all_equal_realised|, the floor of that mean for
    calibrated predictions): a step's realised share is a mean of its m groups' outcomes, whose
    mean absolute deviation from their predictions q is sqrt(2 / pi) sqrt(sum q (1 - q)) / m,
    here bounded above by the mean prediction's q (1 - q) for every group."""
    steps = [r for r in rows if "all_equal_predicted" in r]
    gap = statistics.fmean(abs(r["all_equal_predicted"] - r["all_equal_realised"]) for r in steps)
    floor = statistics.fmean(math.sqrt(2 / math.pi * r["all_equal_predicted"] * (1 - r["all_equal_predicted"])
                                       / r["prompts_rolled_out"]) for r in steps)
    return gap, floor


def brier_ratio(run_dir: Path) -> float | None:
    """First-visit Brier score of the cross-prompt prior / the population prior's, over one run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "prior_brier_cross_prompt" in r]
    population = sum(r["prior_brier_population"] * r["first_visits"] for r in rows)
    return None if not population else sum(r["prior_brier_cross_prompt"] * r["first_visits"] for r in rows) / population


def _paired(records: dict[str, list[RunRecord]], label: str, figure, target: float,
            baseline: str = BASELINE) -> tuple[Estimate | None, str]:
    """``figure(run, target)`` of ``label`` over ``baseline``'s, mean over seeds / mean over seeds
    (paired bootstrap interval), or (None, why)."""
    if label not in records or baseline not in records:
        return None, f"{label if label not in records else baseline} not run"
    pairs = [(figure(a, target), figure(b, target)) for a, b in zip(records[label], records[baseline])]
    missing = [r.seed for r, (x, y) in zip(records[label], pairs) if x is None or y is None]
    if missing:
        return None, f"target not reached in seeds {missing}"
    if not any(y for _, y in pairs):
        return None, f"{baseline} was at the target before training"
    return ratio_ci([x for x, _ in pairs], [y for _, y in pairs], paired=True), ""


def _delta(records, label: str) -> tuple[Estimate | None, str]:
    if label not in records or BASELINE not in records:
        return None, "not run"
    return mean_ci([a.final - b.final for a, b in zip(records[label], records[BASELINE])]), ""


def task_ratios(records: dict[str, list[RunRecord]], target: float, briers: list[float | None],
                metrics: dict[str, list[list[dict]]]) -> dict:
    """{summary key without suffix: (Estimate or None, why)} for one task; ``metrics``: each run's
    metrics rows by label, in ``records``' order."""
    out = {}
    for label in RUNS:
        if label == BASELINE:
            continue
        out[f"{label}_time_to_target_ratio_vs_rloo"] = _paired(records, label, time_to, target)
        out[f"{label}_samples_to_target_ratio_vs_rloo"] = _paired(records, label, samples_to, target)
        out[f"{label}_final_accuracy_delta_vs_rloo"] = _delta(records, label)
    out["budget_time_to_target_ratio_vs_dynamic_sampling"] = _paired(records, "budget", time_to, target,
                                                                      baseline="dynamic")
    # dynamic sampling trains only groups that differ, what a skip that never erred would roll out
    rows_of = {(r.label, r.seed): m for label in records for r, m in zip(records[label], metrics[label])}
    out[FLOOR_KEY] = _paired(
        records, "dynamic", lambda run, target: steps_to(run, rows_of[run.label, run.seed], target), target)
    known = [b for b in briers if b is not None]
    out["prior_brier_ratio_cross_prompt_vs_population"] = (
        (mean_ci(known), "") if known else (None, "budget_cross not run (or no first visits)"))
    gaps = [g for rows in metrics[BASELINE] if (g := calibration_gap(rows)) is not None]
    out["all_equal_calibration_gap"] = (mean_ci(gaps), "") if gaps else (None, "no all-equal predictions logged")
    return out


def _runs(task: str, cfg: Config, opts: BudgetOptions, console: Console):
    """Every run of ``task``: ({label: [RunRecord per seed]}, [Brier ratio per budget_cross seed],
    {label: [metrics rows per seed]}, model, completions per step)."""
    name, pool_option, _ = TASKS[task]
    path = str(Path(opts.configs_dir) / name)
    common = [*changed_options(cfg), f"{pool_option}={opts.pool}", f"data.eval_size={opts.eval_size}"]
    base = load_config(path, common)
    model = Path(base.model.name_or_path or resolve_model_path(base, console)).resolve()
    out_root = Path(cfg.output_dir) / task
    records: dict[str, list[RunRecord]] = {label: [] for label in opts.runs}
    metrics: dict[str, list[list[dict]]] = {label: [] for label in opts.runs}
    briers: list[float | None] = []
    jobs = [(seed, label) for seed in opts.seeds for label in opts.runs]
    for seed, label, run_dir in fresh_runs(f"bench budget {task}", jobs, out_root, console):
        options = [*common, *RUNS[label], f"model.name_or_path={json.dumps(str(model))}", f"seed={seed}",
                   f"output_dir={run_dir}", f"max_steps={opts.steps}", f"eval_every={opts.eval_every}"]
        seconds, rss = run_child("frugalrl.cli", ["train", "--config", path, *options], run_dir / "train.log")
        records[label].append(_record(label, seed, run_dir, seconds, rss))
        metrics[label].append([r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r])
        if label == "budget_cross":
            briers.append(brier_ratio(run_dir))
    return records, briers, metrics, model, base.rollout.batch_prompts * base.rollout.group_size


def _dash_vs_trl(cfg: Config, opts: BudgetOptions, console: Console) -> tuple[dict, str, list[str]]:
    """DASH (frugalrl) and TRL's GRPOTrainer runs, every seed: (summary keys, page section, its tables)."""
    common = [*changed_options(cfg), *peer.TRAIN_DEFAULTS]
    paths = {"dash": str(Path(opts.configs_dir) / "dash.yaml"), "trl_grpo": str(Path(opts.configs_dir) / "grpo.yaml")}
    grpo = load_config(paths["trl_grpo"], common)
    model = Path(grpo.model.name_or_path or resolve_model_path(grpo, console)).resolve()
    records: dict[str, list[RunRecord]] = {"dash": [], "trl_grpo": []}
    jobs = [(seed, label) for seed in opts.dash_seeds for label in paths]
    for seed, label, run_dir in fresh_runs("bench budget dash-vs-trl", jobs, Path(cfg.output_dir) / "dash-vs-trl",
                                           console):
        path = paths[label]
        ro = load_config(path, common).rollout
        per_step = ro.batch_prompts * ro.group_size
        options = [*common, f"model.name_or_path={json.dumps(str(model))}", f"seed={seed}",
                   f"output_dir={run_dir}", f"max_steps={opts.dash_samples // per_step}",
                   f"eval_every={opts.dash_eval_every_samples // per_step}"]
        if label == "dash":
            seconds, rss = run_child("frugalrl.cli", ["train", "--config", path, *options], run_dir / "train.log")
            records[label].append(_record(label, seed, run_dir, seconds, rss))
            continue
        save_config(load_config(path, options), run_dir / "peer-config.yaml")
        seconds, rss = run_child("frugalrl.bench.peer", ["trl", str(run_dir / "peer-config.yaml"),
                                                         str(run_dir / "peer-result.json")], run_dir / "peer.log")
        curve = [tuple(c) for c in json.loads((run_dir / "peer-result.json").read_text())["curve"]]
        records[label].append(RunRecord(label, seed, curve, curve[-1][0], seconds, rss, 0, 0, 0))
    target = opts.target_frac * statistics.fmean(r.final for r in records["trl_grpo"])
    estimate, why = _paired(records, "dash", time_to, target, baseline="trl_grpo")
    key = "time_to_target_ratio_dash_vs_trl_grpo"
    summary = estimate.as_summary(key) if estimate else dict.fromkeys([key, f"{key}_ci_low", f"{key}_ci_high"])
    rows = [[label, str(mean_ci([r.final for r in runs])),
             str(mean_ci([time_to(r, target) for r in runs])) if None not in [time_to(r, target) for r in runs]
             else "not reached", f"{statistics.fmean(r.train_s for r in runs):.0f}"] for label, runs in records.items()]
    section = (f"## DASH vs TRL's GRPOTrainer\n\nThe embedded task, `{model.name}`, {opts.dash_samples} sampled "
               f"completions per run, one torch thread per run, accuracy every {opts.dash_eval_every_samples} "
               f"completions; target {target:.3f} = {opts.target_frac:g} x TRL's mean final accuracy. "
               f"`{key}`: **{estimate if estimate else f'n/a: {why}'}** (DASH reports "
               "0.17 on GPU).")
    return summary, section, [table(["run", "final accuracy", "time to target (s)", "training time (s)"], rows)]


def _skip_floor(dynamic_steps: tuple[Estimate | None, str], key: str) -> str:
    """The page's sentence on the least completions ratio that skip can reach; ``key``: the figure's
    summary key, with the task's suffix."""
    estimate, why = dynamic_steps
    return ("Dynamic sampling trains only groups whose rewards differ, the batch that a skip which never erred would "
            f"roll out; it reached the target in {estimate if estimate else f'n/a ({why})'} of uniform's steps "
            f"(`{key}`). Skip generates as many completions a step as uniform, so that is about the least its "
            "completions ratio can be.")


def _half_width(estimate: Estimate | None) -> str:
    """A figure's 95 % half-width ("—" without an interval)."""
    if estimate is None or estimate.n < 2:
        return "—"
    return f"±{max(estimate.value - estimate.low, estimate.high - estimate.value):.3f}"


def _calibration(task: str, metrics: dict[str, list[list[dict]]], path: Path) -> str:
    """The reliability diagram of every run of ``task`` (seeds pooled) at ``path``; the page's paragraph on it."""
    with figure(path, 1) as (ax,):
        draw_reliability(ax, {label: [row for rows in runs for row in rows] for label, runs in metrics.items()})
        ax.set_title(f"{task}: predicted vs realised all-equal groups, every step of every seed", fontsize=9)
    gaps = [step_gap(rows) for rows in metrics[BASELINE]]
    return (f"Calibration of the all-equal predictions: the reliability diagram of each run, its seeds pooled "
            f"(gap in the legend: `allocation.calibration_gap`). Per step, uniform's mean |predicted - realised| "
            f"all-equal share is {statistics.fmean(g for g, _ in gaps):.3f}, of which one step's "
            f"{metrics[BASELINE][0][0]['prompts_rolled_out']:.0f} groups alone would give calibrated predictions up "
            f"to {statistics.fmean(f for _, f in gaps):.3f}: the per-step figure cannot show a gap below that, the "
            f"diagram's can.\n\n![{task} calibration](budget-{task}-calibration.png)")


def run(cfg: Config, opts: BudgetOptions, command: str, console: Console) -> dict:
    """Every task, run and seed; write budget.md, budget-TASK.png and budget-TASK-calibration.png;
    merge the ratios into summary.json."""
    unknown = [label for label in opts.runs if label not in RUNS] + [t for t in opts.tasks if t not in TASKS]
    if unknown or BASELINE not in opts.runs:
        raise ValueError(f"bench.runs={opts.runs} must include {BASELINE} and name only some of {list(RUNS)}; "
                         f"bench.tasks={opts.tasks} only some of {list(TASKS)}")
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    summary, sections = {}, []
    for task in opts.tasks:
        records, briers, metrics, model, per_step = _runs(task, cfg, opts, console)
        target = opts.target_frac * statistics.fmean(r.final for r in records[BASELINE])
        suffix = TASKS[task][2]
        ratios = task_ratios(records, target, briers, metrics)
        for key, (estimate, _) in ratios.items():
            full = key + suffix
            summary.update(estimate.as_summary(full) if estimate
                           else dict.fromkeys([full, f"{full}_ci_low", f"{full}_ci_high"]))
        _plot(records, target, results_dir / f"budget-{task}.png",
              f"{task}: {len(opts.seeds)} seeds x {opts.steps} steps, pool {opts.pool}; dotted: target {target:.3f}")
        rows = []
        for label, runs in records.items():
            times = [time_to(r, target) for r in runs]
            samples = [samples_to(r, target) for r in runs]
            reached = None not in times
            rows.append([label, " ".join(RUNS[label]) or "—", str(mean_ci([r.final for r in runs])),
                         str(mean_ci(times)) if reached else f"not reached ({len(times) - times.count(None)}/"
                                                             f"{len(times)} seeds)",
                         str(mean_ci(samples)) if reached else "—",
                         f"{statistics.fmean(r.curve[-1][1] for r in runs):.0f}",
                         f"{statistics.fmean(r.train_s for r in runs):.0f}",
                         f"{statistics.fmean(r.peak_rss_mb for r in runs):.0f}"])
        claims = [[f"`{key + suffix}`", str(estimate) if estimate else f"n/a: {why}", _half_width(estimate),
                   AIMS.get(key, "—")] for key, (estimate, why) in ratios.items()]
        resolved = [e for key, (e, _) in ratios.items() if "_ratio_" in key and e is not None and e.n >= 2]
        wide = sum(max(e.value - e.low, e.high - e.value) > RESOLUTION for e in resolved)
        final, evaluated = statistics.fmean(r.final for r in records[BASELINE]), records[BASELINE][0].eval_prompts
        sections += [
            f"## {task}\n\nModel `{model.name}`, config `{TASKS[task][0]}`, pool {opts.pool} training prompts "
            f"({TASKS[task][1]}), "
            f"{opts.steps} steps of {per_step} trained completions, accuracy read every {opts.eval_every} steps on "
            f"{evaluated} held-out prompts (one reading's standard error at uniform's final accuracy "
            f"{math.sqrt(final * (1 - final) / evaluated):.4f}), crossings read between readings; target "
            f"{target:.3f} = {opts.target_frac:g} x uniform's mean final accuracy. Means over seeds "
            f"{list(opts.seeds)}, [95 % interval].",
            table(["run", "options", "final accuracy", "time to target (s)", "completions to target",
                   "completions generated", "training time (s)", "peak RSS (MB)"], rows),
            f"What it took: {len(opts.seeds)} seeds; {len(resolved) - wide} of the {len(resolved)} ratios with an "
            f"interval have a 95 % half-width within ±{RESOLUTION:g}.",
            table(["summary.json", "value", "95 % half-width", "aim"], claims),
            _skip_floor(ratios[FLOOR_KEY], FLOOR_KEY + suffix),
            f"![{task}](budget-{task}.png)",
            _calibration(task, metrics, results_dir / f"budget-{task}-calibration.png"),
        ]
    if opts.dash_samples:
        dash_summary, section, tables = _dash_vs_trl(cfg, opts, console)
        summary.update(dash_summary)
        sections += [section, *tables]
    sections.insert(0, "Protocol: `src/frugalrl/bench/budget.py`. Ratios: run / uniform RLOO G = 4 (mean over seeds "
                       "/ mean over seeds, paired bootstrap); deltas: paired differences; n/a says why.")
    return publish(results_dir, "budget", "Budget bench: where the completions of a step go", command, sections,
                   summary, console)
