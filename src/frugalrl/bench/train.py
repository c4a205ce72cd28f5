"""Train bench: every preset from the same SFT checkpoint, several seeds, an equal budget of samples.

Protocol of ``frugalrl bench train``:

* Runs: ``bench.runs`` labels (``RUNS``: each preset of ``configs/``, plus ``grpo_g8``, the GRPO
  preset with 32 prompts x G = 8, the reference KAE with G = 2 is compared against), each for
  every seed of ``bench.seeds``. Runs are interleaved (seed 0 of every label, then seed 1, ...)
  so that drifts of a shared machine spread over all labels.
* Each run is its own process, ``frugalrl train --config configs/PRESET.yaml`` plus the bench's
  run options (``TRAIN_DEFAULTS``, then the command line's options), then ``seed``, ``max_steps``
  and ``output_dir``: its peak RSS is its own (its VmHWM: ``report.run_child``). Every run starts
  from the same model: ``model.name_or_path`` (default: the embedded SFT checkpoint of the base
  config, built once). The data split is fixed (``data.seed=0``), so seeds vary sampling and
  order only.
* Budget: ``bench.samples`` sampled completions for training, so a run makes
  ``bench.samples / (rollout.batch_prompts x rollout.group_size)`` steps. A*-PO's stage 1 (its n
  reference samples per prompt) runs first as its own process (``frugalrl vstar`` into the run
  directory), timed and reported apart: A*-PO's times are given with and without it.
* Accuracy: greedy, on ``data.eval_size`` held-out prompts, every ``eval_every`` steps; a run's
  final accuracy is its last reading. Time is the run's training wall clock (``wall_s`` in
  metrics.jsonl: generation, scoring, updates; evaluation and start-up excluded).
* Target: ``start + bench.target_frac x (final - start)``, where ``start`` is the starting
  model's accuracy and ``final`` the mean final accuracy of ``bench.target_run`` (GRPO with G = 8
  by default). A run's time to target is the wall clock of its first reading at or above it;
  a label's is the mean over its seeds, and "not reached" when a seed never got there.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from frugalrl.bench.options import TrainOptions
from frugalrl.bench.report import fmt, publish, run_child, table
from frugalrl.config import Config, changed_options, load_config
from frugalrl.models import resolve_model_path

TRAIN_DEFAULTS = ["output_dir=runs/bench-train", "max_wall_s=0", "eval_every=15", "eval.pass_k=0",
                  "data.eval_size=512", "data.seed=0"]
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


@dataclass
class RunRecord:
    """One finished run. ``curve``: (wall_s, samples, accuracy) of each evaluation."""

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

    def time_to(self, target: float) -> float | None:
        return next((wall for wall, _, acc in self.curve if acc >= target), None)


@dataclass
class LabelStats:
    """A label's runs over the seeds."""

    records: list[RunRecord] = field(default_factory=list)

    def mean(self, name: str) -> float:
        return statistics.fmean(getattr(r, name) for r in self.records)

    @property
    def final(self) -> list[float]:
        return [r.curve[-1][2] for r in self.records]

    def time_to(self, target: float, with_stage1: bool = False) -> float | None:
        """Mean time to ``target`` over the seeds; None when a seed never reached it."""
        times = [r.time_to(target) for r in self.records]
        if any(t is None for t in times):
            return None
        return statistics.fmean(t + (r.stage1_s if with_stage1 else 0.0) for t, r in zip(times, self.records))


def _child(argv: list[str], log: Path) -> tuple[float, float]:
    """``frugalrl ARGV`` in its own process: (seconds, peak RSS in MB)."""
    return run_child("frugalrl.cli", argv, log)


def _record(label: str, seed: int, run_dir: Path, process_s: float, rss: float, **stage1) -> RunRecord:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    curve = [(r["wall_s"], r["samples"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    passes = load_config(run_dir / "config.yaml").train.ppo_epochs  # tokens_trained counts one pass
    return RunRecord(label, seed, curve, steps[-1]["wall_s"], process_s, rss,
                     sum(r["tokens_generated"] for r in steps), passes * sum(r["tokens_trained"] for r in steps),
                     steps[0]["eval_prompts"], **stage1)


def _plot(stats: dict[str, LabelStats], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for label, s in stats.items():
        # the mean curve over seeds, at the evaluation steps they share
        n = min(len(r.curve) for r in s.records)
        acc = [statistics.fmean(r.curve[i][2] for r in s.records) for i in range(n)]
        wall = [statistics.fmean(r.curve[i][0] for r in s.records) for i in range(n)]
        samples = [s.records[0].curve[i][1] for i in range(n)]
        style = "--" if label in ("grpo", "grpo_g8") else "-"
        axes[0].plot(wall, acc, style, marker=".", label=label)
        axes[1].plot(samples, acc, style, marker=".", label=label)
    for ax, xlabel in zip(axes, ("training wall time (s)", "sampled completions")):
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out greedy accuracy (mean over seeds)")
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def run(cfg: Config, opts: TrainOptions, command: str, console: Console) -> dict:
    """Train every ``bench.runs`` label for every seed; write train.md and train.png; merge the
    time and memory ratios into summary.json and return them (None: a side never reached the
    target in some seed, or was not run)."""
    unknown = [label for label in opts.runs if label not in RUNS]
    if unknown or not opts.runs or not opts.seeds:
        raise ValueError(f"bench.runs={opts.runs} must name some of {list(RUNS)} and bench.seeds some seeds")
    configs_dir = Path(opts.configs_dir)
    for label in opts.runs:
        if not (configs_dir / f"{RUNS[label][0]}.yaml").is_file():
            raise ValueError(f"bench.configs_dir={configs_dir}: no {RUNS[label][0]}.yaml there; run the bench from "
                             "the repository root or point bench.configs_dir at its configs/ directory")
    t0 = time.perf_counter()
    model = Path(cfg.model.name_or_path or resolve_model_path(cfg, console)).resolve()
    base = replace(cfg, model=replace(cfg.model, name_or_path=str(model)))
    common = changed_options(base)
    out_root = Path(cfg.output_dir)
    stats = {label: LabelStats() for label in opts.runs}
    start_acc: list[float] = []
    jobs = [(seed, label) for seed in opts.seeds for label in opts.runs]
    with Progress(TextColumn("[bold]bench train[/] {task.fields[run]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("runs", total=len(jobs), run="")
        for seed, label in jobs:
            progress.update(bar, run=f"{label} seed {seed}")
            preset, extra = RUNS[label]
            preset_path = str(configs_dir / f"{preset}.yaml")
            run_dir = out_root / f"{label}-seed{seed}"
            options = [*common, *extra, f"seed={seed}", f"output_dir={run_dir}"]
            run_cfg = load_config(preset_path, options)
            per_step = run_cfg.rollout.batch_prompts * run_cfg.rollout.group_size
            options.append(f"max_steps={max(1, opts.samples // per_step)}")
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            stage1 = {}
            if run_cfg.algo.estimator == "astar":  # stage 1 apart, timed, into the run's own cache file
                options.append(f"algo.vstar_path={run_dir / 'vstar.json'}")
                seconds, _ = _child(["vstar", "--config", preset_path, *options], run_dir / "vstar.log")
                meta = json.loads((run_dir / "vstar.json").read_text())["meta"]
                stage1 = {"stage1_s": seconds, "stage1_samples": meta["prompts"] * meta["n"]}
            seconds, rss = _child(["train", "--config", preset_path, *options], run_dir / "train.log")
            record = _record(label, seed, run_dir, seconds, rss, **stage1)
            stats[label].records.append(record)
            start_acc.append(record.curve[0][2])
            progress.update(bar, advance=1)
    wall = time.perf_counter() - t0

    start = statistics.fmean(start_acc)
    ref = stats.get(opts.target_run) or next(iter(stats.values()))
    target = start + opts.target_frac * (statistics.fmean(ref.final) - start)

    def tt(label: str, with_stage1: bool = False) -> float | None:
        return stats[label].time_to(target, with_stage1) if label in stats else None

    ratios = {
        "time_to_target_ratio_kae_g2_vs_grpo_g8": _ratio(tt("kae"), tt("grpo_g8")),
        "time_to_target_ratio_dash_vs_grpo": _ratio(tt("dash"), tt("grpo")),
        "time_ratio_astar_vs_ppo": _ratio(tt("astar", True), tt("ppo")),
        "time_ratio_astar_vs_ppo_no_stage1": _ratio(tt("astar"), tt("ppo")),
        "time_ratio_astar_vs_grpo": _ratio(tt("astar", True), tt("grpo")),
        "peak_rss_ratio_astar_vs_ppo": (_ratio(stats["astar"].mean("peak_rss_mb"), stats["ppo"].mean("peak_rss_mb"))
                                        if "astar" in stats and "ppo" in stats else None),
    }

    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{len(opts.seeds)} seeds x {opts.samples} sampled completions per run, from one SFT checkpoint "
             f"(start {start:.3f}); dotted: target {target:.3f}")
    _plot(stats, target, results_dir / "train.png", title)

    def cell_time(label: str) -> str:
        s = stats[label]
        reached = sum(r.time_to(target) is not None for r in s.records)
        value = s.time_to(target)
        text = "not reached" if value is None else f"{value:.0f} s"
        if reached < len(s.records):
            text += f" ({reached}/{len(s.records)} seeds)"
        if s.records[0].stage1_s:
            with_stage1 = s.time_to(target, True)
            text += f"; {with_stage1:.0f} s with stage 1" if with_stage1 is not None else ""
        return text

    rows = []
    for label, s in stats.items():
        final = s.final
        spread = statistics.stdev(final) if len(final) > 1 else 0.0
        stage1 = f"{s.mean('stage1_s'):.0f} s, {s.records[0].stage1_samples} samples" if s.records[0].stage1_s else "—"
        rows.append([label, RUNS[label][0], f"{statistics.fmean(final):.3f} ± {spread:.3f}", cell_time(label),
                     f"{s.mean('train_s'):.0f} s", stage1, f"{s.mean('peak_rss_mb'):.0f}",
                     f"{s.mean('tokens_generated') / 1e6:.2f} M", f"{s.mean('tokens_trained') / 1e6:.2f} M"])
    claims = table(["ratio (this run)", "value", "aim"], [
        ["KAE G=2 / GRPO G=8, time to target", fmt(ratios["time_to_target_ratio_kae_g2_vs_grpo_g8"], 3), "<= 0.5"],
        ["DASH / GRPO, time to target", fmt(ratios["time_to_target_ratio_dash_vs_grpo"], 3), "<= 0.5"],
        ["A*-PO / PPO, time to target (stage 1 included)", fmt(ratios["time_ratio_astar_vs_ppo"], 3), "<= 0.6"],
        ["A*-PO / PPO, time to target (without stage 1)", fmt(ratios["time_ratio_astar_vs_ppo_no_stage1"], 3), "—"],
        ["A*-PO / GRPO, time to target (stage 1 included)", fmt(ratios["time_ratio_astar_vs_grpo"], 3), "—"],
        ["A*-PO / PPO, peak RSS", fmt(ratios["peak_rss_ratio_astar_vs_ppo"], 3), "<= 1"],
    ])
    if None in ratios.values():
        claims += ("\n\nn/a: one side of the ratio was not run, or did not reach the target in every seed (its "
                   "time-to-target cell above says in how many); summary.json has null there.")
    sections = [
        f"Every run starts from `{model.name}` (held-out greedy accuracy {start:.3f} on "
        f"{ref.records[0].eval_prompts} "
        f"prompts) and trains on {opts.samples} sampled completions; seeds {list(opts.seeds)}. Target accuracy "
        f"{target:.3f} = start + {opts.target_frac:g} x (mean final accuracy of `{opts.target_run}` - start). "
        "Times are training wall clock (evaluation and start-up excluded), means over seeds. "
        "Protocol: `src/frugalrl/bench/train.py`.",
        table(["run", "preset", "final accuracy (mean ± std)", "time to target", "training time", "A*-PO stage 1",
               "peak RSS (MB)", "tokens generated", "tokens trained"], rows),
        claims,
        f"Bench wall time: {wall / 60:.0f} min.",
    ]
    return publish(results_dir, "train", "Train bench: every preset, equal samples", command, sections, ratios,
                   console)
