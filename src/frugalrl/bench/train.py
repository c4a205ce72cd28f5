"""Train bench: every preset from the same SFT checkpoint, several seeds, an equal budget of samples.

Protocol of ``frugalrl bench train``:

* Runs: ``bench.runs`` labels (``RUNS``: each preset of ``configs/``, plus ``grpo_g8``, the GRPO
  preset with 32 prompts x G = 8, the reference KAE with G = 2 is compared against), each for
  every seed of ``bench.seeds`` (5 by default). Runs are interleaved (seed 0 of every label, then
  seed 1, ...) so that drifts of a shared machine spread over all labels.
* Each run is its own process, ``frugalrl train --config configs/PRESET.yaml`` plus the bench's
  run options (``TRAIN_DEFAULTS``, then the command line's options), then ``model.name_or_path``,
  ``seed``, ``output_dir``, ``max_steps`` and ``eval_every``: its peak RSS is its own (its VmHWM:
  ``report.run_child``). Every run starts from the same model: ``model.name_or_path`` (default:
  the embedded SFT checkpoint of the base config, built once). The data split is fixed
  (``data.seed=0``), so seeds vary sampling and order only.
* Budget: ``bench.samples`` sampled completions for training, so a run makes
  ``bench.samples / (rollout.batch_prompts x rollout.group_size)`` steps, which must be a whole
  number (checked for every run before any starts). A*-PO's stage 1 (its n reference samples per
  prompt) runs first, in the bench's own process, into the run directory, where the training
  process finds it. Its time is the build alone (sampling, scoring, writing the cache), measured
  inside the process as training times are: loading the model and starting a process are not
  counted. A*-PO's times are given with and without it.
* Accuracy: greedy, on ``data.eval_size`` held-out prompts, before training, then every
  ``bench.eval_every_samples`` sampled completions and after the last step; a run's final
  accuracy is its last reading. A run's ``eval_every`` (steps) is that interval over its
  completions per step, which must be a whole number, so every run is read at the same sample
  counts however many completions its steps hold (DASH's 512 as often per sample as GRPO's 256).
  Time is the run's training wall clock (``wall_s`` in metrics.jsonl: generation, scoring,
  updates; evaluation and start-up excluded).
* Target: ``start + bench.target_frac x (final - start)``, where ``start`` is the starting
  model's mean accuracy and ``final`` the mean final accuracy of ``bench.target_run`` (GRPO with
  G = 8 by default). A run's time to target is the wall clock of its first reading at or above it.
* Ratios (``RATIOS``): each compared run of ``COMPARISONS`` against its comparison, for time to
  target, final accuracy, peak RSS and training time (equal samples, so time per sample): mean
  over seeds / mean over seeds, with a 95 % bootstrap interval that resamples seeds, both runs of
  a seed together (``stats.ratio_ci``, paired). A ratio that cannot be measured (a run not made,
  a seed that never reached the target) is null in summary.json and the page says why.
* Where a compared run samples at another temperature or top-p, trains on other prompts or with
  other data options than its comparison, the page lists the differences, read from both runs'
  resolved configs.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from frugalrl.bench.options import TrainOptions
from frugalrl.bench.report import publish, run_child, table
from frugalrl.bench.stats import Estimate, mean_ci, ratio_ci
from frugalrl.config import Config, changed_options, config_to_dict, flatten, load_config
from frugalrl.models import resolve_model_path
from frugalrl.recovery import read_metrics

TRAIN_DEFAULTS = ["output_dir=runs/bench-train", "max_wall_s=0", "eval.pass_k=0", "data.eval_size=512",
                  "data.seed=0"]
# label -> (preset in bench.configs_dir, options on top of it)
RUNS = {
    "grpo": ("grpo", []),
    "grpo_g8": ("grpo", ["rollout.batch_prompts=32", "rollout.group_size=8"]),
    "dr_grpo": ("dr_grpo", []),
    "rloo": ("rloo", []),
    "reinforce": ("reinforce", []),
    "reinforce_pp": ("reinforce_pp", []),
    "kae": ("kae", []),
    "astar": ("astar", []),
    "dash": ("dash", []),
    "ppo": ("ppo", []),
}
# summary-key suffix -> (compared run, the run it is compared with, name on the page)
COMPARISONS = {
    "kae_g2_vs_grpo_g8": ("kae", "grpo_g8", "KAE G=2 / GRPO G=8"),
    "dash_vs_grpo": ("dash", "grpo", "DASH / GRPO"),
    "astar_vs_ppo": ("astar", "ppo", "A*-PO / PPO"),
    "astar_vs_grpo": ("astar", "grpo", "A*-PO / GRPO"),
}


@dataclass
class RunRecord:
    """One finished run. ``curve``: (wall_s, samples, accuracy) of each evaluation; times in
    seconds, RSS in MB."""

    label: str
    seed: int
    curve: list[tuple[float, int, float]]
    train_s: float
    process_s: float
    peak_rss_mb: float
    tokens_generated: int
    tokens_trained: int
    eval_prompts: int
    stage1_s: float = 0.0
    stage1_samples: int = 0

    @property
    def final(self) -> float:
        return self.curve[-1][2]

    def time_to(self, target: float, with_stage1: bool = False) -> float | None:
        """Training seconds at the first reading at or above ``target`` (plus stage 1's if
        ``with_stage1``); None when no reading got there."""
        wall = next((wall for wall, _, acc in self.curve if acc >= target), None)
        return None if wall is None else wall + (self.stage1_s if with_stage1 else 0.0)


# figure -> (name on the page, its value for one run given the target accuracy)
FIGURES: dict[str, tuple[str, Callable[[RunRecord, float], float | None]]] = {
    "time": ("time to target", lambda r, target: r.time_to(target)),
    "time_stage1": ("time to target, stage 1 included", lambda r, target: r.time_to(target, with_stage1=True)),
    "final_accuracy": ("final accuracy", lambda r, _: r.final),
    "peak_rss": ("peak RSS", lambda r, _: r.peak_rss_mb),
    "train_time": ("training time (equal samples)", lambda r, _: r.train_s),
}
# summary key -> (comparison, figure); the time-to-target keys keep the names earlier pages used
RATIOS = {
    "time_to_target_ratio_kae_g2_vs_grpo_g8": ("kae_g2_vs_grpo_g8", "time"),
    "time_to_target_ratio_dash_vs_grpo": ("dash_vs_grpo", "time"),
    "time_ratio_astar_vs_ppo": ("astar_vs_ppo", "time_stage1"),
    "time_ratio_astar_vs_ppo_no_stage1": ("astar_vs_ppo", "time"),
    "time_ratio_astar_vs_grpo": ("astar_vs_grpo", "time_stage1"),
    **{f"{figure}_ratio_{pair}": (pair, figure) for pair in COMPARISONS
       for figure in ("final_accuracy", "peak_rss", "train_time")},
}
# the papers' claims (SPEC.md), where a ratio has one
AIMS = {"time_to_target_ratio_kae_g2_vs_grpo_g8": "<= 0.5", "time_to_target_ratio_dash_vs_grpo": "<= 0.5",
        "time_ratio_astar_vs_ppo": "<= 0.6", "peak_rss_ratio_astar_vs_ppo": "<= 1"}


@dataclass
class Plan:
    """How a label runs, whatever the seed: its preset file, its options on top of it, its
    resolved config, its sampled completions per step, its steps and its evaluation interval in
    steps."""

    preset: str
    options: list[str]
    cfg: Config
    per_step: int
    steps: int
    eval_every: int


def whole_steps(samples: int, per_step: int, option: str, label: str) -> int:
    """``samples`` sampled completions in steps of ``per_step``; ValueError naming the run and
    the option unless it is a whole number of steps."""
    if samples % per_step:
        raise ValueError(f"{option}={samples} is not a whole number of steps of run {label} ({per_step} completions "
                         f"a step: rollout.batch_prompts x rollout.group_size); use a multiple of {per_step}")
    return samples // per_step


def _plan(label: str, opts: TrainOptions, common: list[str]) -> Plan:
    preset, extra = RUNS[label]
    path = Path(opts.configs_dir) / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(f"bench.configs_dir={opts.configs_dir}: no {preset}.yaml there; run the bench from the "
                         "repository root or point bench.configs_dir at its configs/ directory")
    options = [*common, *extra]
    cfg = load_config(str(path), options)
    per_step = cfg.rollout.batch_prompts * cfg.rollout.group_size
    return Plan(str(path), options, cfg, per_step, whole_steps(opts.samples, per_step, "bench.samples", label),
                whole_steps(opts.eval_every_samples, per_step, "bench.eval_every_samples", label))


def _sampling_and_data(cfg: Config) -> dict[str, object]:
    """What a run samples at and trains on: rollout temperature and top-p, every data option, and
    its training prompts (A*-PO trains only on those its stage 1 covers)."""
    flat = flatten(config_to_dict(cfg))
    settings = {key: flat[key] for key in ("rollout.temperature", "rollout.top_p")}
    settings.update({key: value for key, value in flat.items() if key.startswith("data.")})
    prompts = "all"
    if cfg.algo.estimator == "astar" and cfg.algo.vstar_prompts:
        prompts = f"the first {cfg.algo.vstar_prompts}"
    if cfg.algo.estimator == "astar" and cfg.algo.vstar_drop_unsolved:
        prompts += ", less those no stage-1 sample solved"
    settings["training prompts"] = prompts
    return settings


def differences(cfg: Config, other: Config) -> list[str]:
    """Where ``cfg`` samples or trains differently from ``other`` (``_sampling_and_data``):
    ``KEY A vs B``, A being ``cfg``'s value."""
    mine, theirs = _sampling_and_data(cfg), _sampling_and_data(other)
    return [f"`{key}` {mine[key]} vs {theirs[key]}" for key in mine if mine[key] != theirs[key]]


def target_accuracy(records: dict[str, list[RunRecord]], target_run: str, frac: float) -> tuple[float, float]:
    """(start, target): ``start`` the mean first reading (the starting model) over every run and
    seed, ``target`` = start + frac x (mean final accuracy of ``target_run`` - start)."""
    start = statistics.fmean(r.curve[0][2] for runs in records.values() for r in runs)
    return start, start + frac * (statistics.fmean(r.final for r in records[target_run]) - start)


def ratio(records: dict[str, list[RunRecord]], key: str, target: float) -> tuple[Estimate | None, str]:
    """Ratio ``key`` of ``RATIOS``: the compared run's mean over seeds / its comparison's, with a
    95 % interval resampling seeds (both runs of a seed together: their records are in the same
    seed order); or (None, why) where it cannot be measured."""
    pair, figure = RATIOS[key]
    labels = COMPARISONS[pair][:2]
    missing = [label for label in labels if label not in records]
    if missing:
        return None, f"{' and '.join(missing)} not run"
    name, value = FIGURES[figure]
    values = [[value(r, target) for r in records[label]] for label in labels]
    unreached = [f"{label} (seeds {', '.join(str(r.seed) for r, v in zip(records[label], vals) if v is None)})"
                 for label, vals in zip(labels, values) if None in vals]
    if unreached:
        return None, f"target not reached by {' and '.join(unreached)}"
    if not any(values[1]):
        why = "was at the target before training" if figure.startswith("time") else f"has {name} 0"
        return None, f"{labels[1]} {why} in every seed"
    return ratio_ci(*values, paired=True), ""


def stage_one(cfg: Config, log: Path) -> tuple[float, int]:
    """A*-PO's stage 1 for ``cfg`` into its ``algo.vstar_path``, in this process, its output in
    ``log``: (seconds of the build alone, samples drawn)."""
    import torch

    from frugalrl.trainer import load_inputs
    from frugalrl.vstar import build_cache

    with log.open("w") as out:
        console = Console(file=out, width=120)
        task, model, tokenizer, _ = load_inputs(cfg, console)
        t0 = time.perf_counter()
        info = build_cache(cfg, model, tokenizer, task, console)
        seconds = time.perf_counter() - t0
    del model
    if torch.cuda.is_available():  # the training process that follows needs the memory
        torch.cuda.empty_cache()
    return seconds, info["prompts"] * info["n"]


def eval_curve(rows: list[dict]) -> list[tuple[float, int, float]]:
    """A frugalrl run's held-out accuracy readings: (training seconds, completions sampled,
    accuracy) each, from the rows of its metrics.jsonl (evaluation time is not in the seconds)."""
    return [(r["wall_s"], r["samples"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]


def _record(label: str, seed: int, run_dir: Path, process_s: float, rss: float, **stage1) -> RunRecord:
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "reward_mean" in r]
    curve = eval_curve(rows)
    passes = load_config(run_dir / "config.yaml").train.ppo_epochs  # tokens_trained counts one pass
    return RunRecord(label, seed, curve, steps[-1]["wall_s"], process_s, rss,
                     sum(r["tokens_generated"] for r in steps), passes * sum(r["tokens_trained"] for r in steps),
                     steps[0]["eval_prompts"], **stage1)


def fresh_runs(title: str, jobs: list[tuple[int, str]], out_root: Path, console: Console, keep=None):
    """For each (seed, label) of ``jobs`` in order, an empty run directory ``out_root/LABEL-seedSEED``
    (an earlier one removed, unless ``keep(seed, label, run_dir)`` says it holds a finished run to
    reuse): yields (seed, label, run_dir) under a progress bar titled ``title``."""
    with Progress(TextColumn(f"[bold]{title}[/] {{task.fields[run]}}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("runs", total=len(jobs), run="")
        for seed, label in jobs:
            progress.update(bar, run=f"{label} seed {seed}")
            run_dir = out_root / f"{label}-seed{seed}"
            if keep is None or not keep(seed, label, run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
            yield seed, label, run_dir
            progress.update(bar, advance=1)


def _plot(records: dict[str, list[RunRecord]], target: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, runs in records.items():
        # the mean curve over seeds, at the evaluations they share
        n = min(len(r.curve) for r in runs)
        acc = [statistics.fmean(r.curve[i][2] for r in runs) for i in range(n)]
        wall = [statistics.fmean(r.curve[i][0] for r in runs) for i in range(n)]
        samples = [runs[0].curve[i][1] for i in range(n)]
        style = "--" if label in ("grpo", "grpo_g8") else "-"
        axes[0].plot(wall, acc, style, marker=".", label=label)
        axes[1].plot(samples, acc, style, marker=".", label=label)
    for ax, xlabel in zip(axes, ("training wall time (s)", "sampled completions")):
        if target is not None:
            ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out greedy accuracy (mean over seeds)")
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean(runs: list[RunRecord], name: str) -> float:
    return statistics.fmean(getattr(r, name) for r in runs)


def _time_cell(runs: list[RunRecord], target: float) -> str:
    """Mean time to target over the seeds with its interval (and with stage 1, for A*-PO)."""
    times = [r.time_to(target) for r in runs]
    if None in times:
        return f"not reached ({len(times) - times.count(None)}/{len(times)} seeds)"
    text = str(mean_ci(times))
    if runs[0].stage1_s:
        text += f"; {mean_ci([r.time_to(target, with_stage1=True) for r in runs])} with stage 1"
    return text


def run(cfg: Config, opts: TrainOptions, command: str, console: Console) -> dict:
    """Train every ``bench.runs`` label for every seed; write train.md and train.png; merge the
    ratios (``RATIOS``, each with its interval: KEY, KEY_ci_low, KEY_ci_high; None where it cannot
    be measured) into summary.json and return them."""
    unknown = [label for label in opts.runs if label not in RUNS]
    if unknown or not opts.runs or not opts.seeds:
        raise ValueError(f"bench.runs={opts.runs} must name some of {list(RUNS)} and bench.seeds some seeds")
    if opts.target_run not in opts.runs:
        raise ValueError(f"bench.target_run={opts.target_run} is not among bench.runs={opts.runs}: the target "
                         "accuracy is read from that run's final accuracy; add it to bench.runs or choose one of them")
    # every run checked before the model is built or any run starts
    plans = {label: _plan(label, opts, changed_options(cfg)) for label in opts.runs}
    model = Path(cfg.model.name_or_path or resolve_model_path(cfg, console)).resolve()
    out_root = Path(cfg.output_dir)
    records: dict[str, list[RunRecord]] = {label: [] for label in opts.runs}
    jobs = [(seed, label) for seed in opts.seeds for label in opts.runs]
    for seed, label, run_dir in fresh_runs("bench train", jobs, out_root, console):
        plan = plans[label]
        options = [*plan.options, f"model.name_or_path={json.dumps(str(model))}", f"seed={seed}",
                   f"output_dir={run_dir}", f"max_steps={plan.steps}", f"eval_every={plan.eval_every}"]
        stage1 = {}
        if plan.cfg.algo.estimator == "astar":  # stage 1 apart, timed, into the run's own cache file
            options.append(f"algo.vstar_path={run_dir / 'vstar.json'}")
            seconds, samples = stage_one(load_config(plan.preset, options), run_dir / "vstar.log")
            stage1 = {"stage1_s": seconds, "stage1_samples": samples}
        seconds, rss = run_child("frugalrl.cli", ["train", "--config", plan.preset, *options], run_dir / "train.log")
        records[label].append(_record(label, seed, run_dir, seconds, rss, **stage1))

    start, target = target_accuracy(records, opts.target_run, opts.target_frac)
    ratios = {key: ratio(records, key, target) for key in RATIOS}
    summary = {}
    for key, (estimate, _) in ratios.items():
        summary.update(estimate.as_summary(key) if estimate
                       else dict.fromkeys([key, f"{key}_ci_low", f"{key}_ci_high"]))

    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{len(opts.seeds)} seeds x {opts.samples} sampled completions per run, from one SFT checkpoint "
             f"(start {start:.3f}); dotted: target {target:.3f}")
    _plot(records, target, results_dir / "train.png", title)

    rows = []
    for label, runs in records.items():
        plan = plans[label]
        stage1 = f"{_mean(runs, 'stage1_s'):.0f} s, {runs[0].stage1_samples} samples" if runs[0].stage1_s else "—"
        rows.append([label, RUNS[label][0], f"{plan.steps} x {plan.per_step}",
                     str(plan.eval_every), str(mean_ci([r.final for r in runs])), _time_cell(runs, target),
                     f"{_mean(runs, 'train_s'):.0f}", stage1, f"{_mean(runs, 'peak_rss_mb'):.0f}",
                     f"{_mean(runs, 'tokens_generated') / 1e6:.2f} M", f"{_mean(runs, 'tokens_trained') / 1e6:.2f} M"])
    claims = []
    for key, (estimate, why) in ratios.items():
        pair, figure = RATIOS[key]
        claims.append([f"{COMPARISONS[pair][2]}, {FIGURES[figure][0]}", str(estimate) if estimate else f"n/a: {why}",
                       AIMS.get(key, "—"), f"`{key}`"])
    compared = [(name, num, den) for num, den, name in COMPARISONS.values() if num in plans and den in plans]
    settings = [f"- {name} (`{num}` vs `{den}`): " + ("; ".join(differences(plans[num].cfg, plans[den].cfg))
                                                      or "same temperature, top-p, training prompts and data options")
                for name, num, den in compared]
    sections = [
        f"Every run starts from `{model.name}` (held-out greedy accuracy {start:.3f} on "
        f"{records[opts.target_run][0].eval_prompts} prompts, mean over runs) and trains on {opts.samples} "
        "sampled completions; "
        f"seeds {list(opts.seeds)}. Accuracy is read before training, then every {opts.eval_every_samples} "
        f"sampled completions (every run alike) and at the end. Target accuracy {target:.3f} = start + "
        f"{opts.target_frac:g} x (mean final accuracy of `{opts.target_run}` - start). Times are training wall "
        "clock in seconds (evaluation and start-up excluded; A*-PO's stage 1: its build alone); means over "
        "seeds, [95 % interval] where there are several. Protocol: `src/frugalrl/bench/train.py`.",
        table(["run", "preset", "steps x completions", "accuracy read every (steps)", "final accuracy",
               "time to target (s)", "training time (s)", "A*-PO stage 1", "peak RSS (MB)", "tokens generated",
               "tokens trained"], rows),
        "Ratios: the run's mean over seeds / its comparison's, [95 % bootstrap interval] resampling seeds (both "
        "runs of a seed together); n/a: not measurable, and why (null in summary.json, with its interval).",
        table(["ratio", "value", "aim", "summary.json"], claims),
        "Where a run samples or trains differently from its comparison (their resolved configs: "
        "rollout temperature and top-p, training prompts, data options):\n\n" + "\n".join(settings)
        if settings else "No comparison had both of its runs in `bench.runs`.",
    ]
    return publish(results_dir, "train", "Train bench: every preset, equal samples", command, sections, summary,
                   console)
