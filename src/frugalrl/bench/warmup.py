"""Warm-up bench: does the embedded model's SFT warm-up end in the same place for every seed?

``frugalrl bench warmup`` builds the embedded SFT model (``models.build_embedded_sft``, as
``frugalrl train`` does when none is cached) for every seed of ``bench.seeds`` and every pool
size of ``bench.pools``, always anew, into ``model.cache_dir`` where runs of that seed and pool
then find it, and reports the steps it took, its wall time
(accuracy checks included), and its greedy accuracy on the training problems held out of it
(the stopping rule's reading) and on the evaluation split (the "accuracy before RL" of a run).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from rich.console import Console

from frugalrl.bench.options import WarmupOptions
from frugalrl.bench.probe import figure
from frugalrl.bench.report import fmt, publish, table
from frugalrl.config import Config
from frugalrl.models import build_embedded_sft, embedded_sft_path

TRAIN_DEFAULTS: list[str] = []


def _plot(results: list[dict], path: Path, target: float) -> None:
    pools = sorted({r["pool"] for r in results}, reverse=True)
    with figure(path, len(pools)) as axes:
        for ax, pool in zip(axes, pools):
            for r in (r for r in results if r["pool"] == pool):
                if r["curve"]:
                    steps, acc = zip(*r["curve"])
                    ax.plot(steps, acc, marker=".", label=f"seed {r['seed']}")
            ax.axhline(target, ls="--", color="grey", label="target")
            ax.set(xlabel="warm-up step", ylabel="greedy accuracy, held-out training problems",
                   title=f"pool of {pool} training problems")
            ax.legend(fontsize=8)


def run(cfg: Config, opts: WarmupOptions, command: str, console: Console) -> dict:
    """Warm up every (pool, seed); write warmup.md and warmup.png; merge the spread of the
    accuracy reached and the longest warm-up time into summary.json and return them."""
    if cfg.model.name_or_path:
        raise ValueError("bench warmup measures the embedded model's warm-up: leave model.name_or_path empty")
    results = []
    for pool in opts.pools:
        for seed in opts.seeds:
            run_cfg = cfg.model_copy(update={"seed": seed, "data": cfg.data.model_copy(update={"train_size": pool})})
            console.print(f"warm-up: pool {pool}, seed {seed}")
            info = build_embedded_sft(run_cfg, embedded_sft_path(run_cfg), console)
            results.append({"pool": pool, "seed": seed, **info})

    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    m = cfg.model
    _plot(results, results_dir / "warmup.png", m.sft_target_accuracy)
    rows = [[str(r["pool"]), str(r["seed"]), str(r["sft_steps"]), f"{r['seconds']:.0f}", fmt(r["check_accuracy"], 3),
             fmt(r["eval_accuracy"], 3), r["stopped"] if r["reached_target"] else f"**{r['stopped']}: short of it**"]
            for r in results]
    evals = [r["eval_accuracy"] for r in results]
    per_pool = [[str(pool), f"{statistics.mean(a):.3f} ± {statistics.stdev(a) if len(a) > 1 else 0:.3f}",
                 f"{min(a):.3f}", f"{max(a):.3f}"]
                for pool in opts.pools for a in [[r["eval_accuracy"] for r in results if r["pool"] == pool]]]
    sections = [
        f"The embedded model's SFT warm-up (`models.build_embedded_sft`) for seeds {opts.seeds} on pools of "
        f"{opts.pools} training problems: it stops at the first check (every {m.sft_eval_every} steps) whose greedy "
        f"accuracy on {m.sft_eval_size} training problems held out of it reaches {m.sft_target_accuracy:g} (target), "
        f"after {m.sft_patience} checks without a new best once halfway there (patience), after "
        f"{m.sft_max_wall_s:g} s (time) or at {m.sft_steps} steps (steps); 0 turns a rule off. Time includes the "
        "checks. \"Evaluation split\" is the held-out set a run's "
        "\"accuracy before RL\" is read on (never trained on, never used to stop). "
        f"{torch.get_num_threads()} torch threads.",
        table(["pool", "seed", "steps", "seconds", "accuracy: check problems", "accuracy: evaluation split",
               "stopped by"], rows),
        table(["pool", "evaluation accuracy: mean ± sd", "min", "max"], per_pool),
    ]
    summary = {"warmup_eval_accuracy_mean": statistics.mean(evals), "warmup_eval_accuracy_min": min(evals),
               "warmup_reached_target_frac": sum(r["reached_target"] for r in results) / len(results),
               "warmup_seconds_max": max(r["seconds"] for r in results)}
    return publish(results_dir, "warmup", "Warm-up bench: the embedded model's SFT across seeds and pools",
                   command, sections, summary, console)
