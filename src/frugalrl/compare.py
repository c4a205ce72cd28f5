"""``frugalrl compare RUN_DIR [RUN_DIR ...]``: several runs side by side, a PNG and a table.

Each run directory's ``metrics.jsonl`` is read as it is on disk, so a run still in progress
works (a torn last line is dropped), and its ``config.yaml`` as plain YAML, so runs written by
older versions, with other options, load too; a key a row lacks is left out of what needs it.

The PNG (``plots.plot_compare``) has held-out greedy accuracy and sampled reward against step,
completions sampled, or training wall-clock seconds; the legend names each run by its estimator
and the options that differ between the runs. The table (Markdown) has per run: steps,
completions sampled, training wall time, final and best held-out accuracy, the completions and
wall time it took to first reach ``target`` accuracy, and the completions the zero-advantage
filter kept out of the training pass (``filtered_frac``: sampled and scored, but no forward or
backward pass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from frugalrl.bench.report import table as markdown_table
from frugalrl.config import flatten
from frugalrl.plots import plot_compare
from frugalrl.recovery import read_metrics

X_AXES = {"step": "step", "samples": "completions sampled", "wall_s": "training wall time (s)"}
# Options that name, place or display a run without changing what it learns: never in a legend.
_BOOKKEEPING = {"output_dir", "resume", "run_name", "project", "report_to", "log_every", "threads", "save_every",
                "save_total_limit", "eval.log_examples", "model.cache_dir"}


@dataclass
class Run:
    path: Path
    rows: list[dict]  # metrics.jsonl
    config: dict  # config.yaml, flattened to dotted keys ({} when missing)

    @property
    def steps(self) -> list[dict]:
        return [r for r in self.rows if "reward_mean" in r]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if "eval_accuracy" in r]

    def at(self, row: dict, key: str) -> float | None:
        """``row[key]``; an evaluation row without it (older runs) takes its step's training row's
        value, and the evaluation before training (step 0) takes 0."""
        if key in row:
            return row[key]
        same_step = [r[key] for r in self.steps if r["step"] == row["step"] and key in r]
        return same_step[0] if same_step else 0 if row["step"] == 0 else None


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise ValueError(f"{path}: no metrics.jsonl there; give run directories (the output_dir of frugalrl train)")
    config = {}
    if (path / "config.yaml").is_file():
        config = flatten(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {})
    return Run(path, read_metrics(path / "metrics.jsonl"), config)


def labels(runs: list[Run]) -> list[str]:
    """Each run's estimator and the options whose values differ between the runs (a run
    without config.yaml: its directory's name; options only some runs have are left out); the
    directory is added where runs read alike."""
    configured = [run for run in runs if run.config]
    # in config order; an option that some runs lack is newer than them, not a difference they chose
    keys = [k for k in (configured[0].config if configured else {}) if all(k in run.config for run in configured)]
    differ = [k for k in keys if k not in _BOOKKEEPING and k != "algo.estimator"
              and len({json.dumps(run.config.get(k), sort_keys=True) for run in configured}) > 1]

    def text(value) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    out = [", ".join([run.config.get("algo.estimator", "?")] + [f"{k}={text(run.config.get(k))}" for k in differ])
           if run.config else run.path.name for run in runs]
    names = [run.path.name for run in runs]
    where = names if len(set(names)) == len(names) else [str(run.path) for run in runs]
    return [f"{label} ({place})" if out.count(label) > 1 else label for label, place in zip(out, where)]


def summary(run: Run, target: float | None) -> dict:
    """The table's numbers for one run (None where the run has no such data)."""
    steps, evals = run.steps, run.evals
    last = steps[-1] if steps else {}
    best = max(evals, key=lambda r: r["eval_accuracy"], default=None)
    reached = next((r for r in evals if target is not None and r["eval_accuracy"] >= target), None)
    skipped, before = 0.0, 0
    for r in steps:  # completions whose training pass the filter skipped: a share of each step's new ones
        if "filtered_frac" in r and "samples" in r:
            skipped += r["filtered_frac"] * (r["samples"] - before)
        before = r.get("samples", before)
    return {"steps": last.get("step"), "samples": last.get("samples"), "wall_s": last.get("wall_s"),
            "final": evals[-1] if evals else None, "best": best,
            "samples_to_target": run.at(reached, "samples") if reached else None,
            "wall_to_target": run.at(reached, "wall_s") if reached else None,
            "skipped": round(skipped) if any("filtered_frac" in r for r in steps) else None}


def default_target(runs: list[Run]) -> float | None:
    """The best accuracy that every run with an evaluation reached: each run gets there."""
    bests = [max(r["eval_accuracy"] for r in run.evals) for run in runs if run.evals]
    return min(bests) if bests else None


def table(runs: list[Run], names: list[str], target: float | None) -> str:
    """The comparison as a Markdown table, one row a run."""
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def acc(row: dict | None) -> str:
        return "-" if row is None else f"{row['eval_accuracy']:.3f} ({row['step']})"

    goal = "-" if target is None else f"{target:.3f}"
    header = ["run", "steps", "completions", "wall s", "final accuracy (step)", "best accuracy (step)",
              f"completions to accuracy {goal}", f"wall s to accuracy {goal}", "completions skipped by the filter"]
    rows = []
    for run, name in zip(runs, names):
        s = summary(run, target)
        share = f" ({s['skipped'] / s['samples']:.0%})" if s["skipped"] is not None and s["samples"] else ""
        rows.append([f"{name} ({run.path})", num(s["steps"], "d"), num(s["samples"], "d"), num(s["wall_s"], ".0f"),
                     acc(s["final"]), acc(s["best"]), num(s["samples_to_target"], "d"),
                     num(s["wall_to_target"], ".0f"), num(s["skipped"], "d") + share])
    return markdown_table(header, rows)


def compare(paths: list[str | Path], x: str = "step", out: str | Path = "compare.png",
            target: float | None = None) -> str:
    """Write the PNG to ``out`` and return the table. ``x``: a key of ``X_AXES``; ``target``:
    the accuracy whose cost the table gives (default: ``default_target``)."""
    if x not in X_AXES:
        raise ValueError(f"--x {x}: choose from {', '.join(X_AXES)}")
    runs = [load_run(p) for p in paths]
    names = labels(runs)
    target = default_target(runs) if target is None else target
    curves = []
    for run, name in zip(runs, names):
        evals = [(run.at(r, x), r["eval_accuracy"]) for r in run.evals if run.at(r, x) is not None]
        steps = [(r[x], r["reward_mean"]) for r in run.steps if x in r]
        curves.append({"label": name, "accuracy": tuple(zip(*evals)) or ((), ()),
                       "reward": tuple(zip(*steps)) or ((), ())})
    plot_compare(curves, out, X_AXES[x])
    return table(runs, names, target)
