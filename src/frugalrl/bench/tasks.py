"""Tasks bench: does the embedded path work, in minutes, on reasoning-gym tasks nobody tuned it for?

``frugalrl bench tasks`` runs ``frugalrl train data.source=reasoning_gym data.task=T max_steps=2
eval_every=0`` (``TRAIN_DEFAULTS``, then the bench's command line) for every task of
``bench.tasks`` as a new user first runs it (``fresh.fresh_run``: a process of its own, an empty
model cache), and reports the whole command's wall time against ``bench.budget_s``, with the
warm-up's steps, seconds, what stopped it (``models.build_embedded_sft``) and its greedy
accuracy on its check problems and on the evaluation split (what RL starts from).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from frugalrl.bench.fresh import fresh_run
from frugalrl.bench.options import TasksOptions
from frugalrl.bench.report import fmt, publish, table
from frugalrl.config import Config, changed_options

TRAIN_DEFAULTS = ["data.source=reasoning_gym", "max_steps=2", "eval_every=0"]


def run(cfg: Config, opts: TasksOptions, command: str, console: Console) -> dict:
    """Run every task; write tasks.md; merge the longest command's wall time and the share of tasks
    within ``bench.budget_s`` into summary.json and return them."""
    if cfg.model.name_or_path:
        raise ValueError("bench tasks measures the embedded model's path: leave model.name_or_path empty")
    common = changed_options(cfg)
    Path(opts.results_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for task in opts.tasks:
        console.print(f"tasks: {task}")
        r = fresh_run(["train", *common, f"data.task={task}"], Path(opts.work_dir), task)
        results.append({"task": task, **r})
        console.print(f"tasks: {task}: {r['wall_s']:.0f} s, warm-up stopped by {r['warmup']['stopped']}")

    rows = [[f"`{r['task']}`", f"{r['wall_s']:.0f}" if r["wall_s"] <= opts.budget_s else f"**{r['wall_s']:.0f}**",
             f"{w['sft_steps']}", f"{w['seconds']:.0f}", w["stopped"], fmt(w["check_accuracy"], 3),
             fmt(w["eval_accuracy"], 3), f"{r['steps'][-1]['reward_mean']:.3f}", f"{r['peak_rss_mb']:.0f}"]
            for r in results for w in [r["warmup"]]]
    within = [r for r in results if r["wall_s"] <= opts.budget_s]
    sections = [
        f"`frugalrl train {' '.join(common)} data.task=T` for each task, one after another, each in a process of its "
        "own from an empty model cache, as on a clean clone: the embedded model is built and warmed up on the "
        "task's answers, then trained with RL for 2 steps. Wall time: the whole command, start-up to exit. "
        f"Warm-up accuracy: greedy, on {cfg.model.sft_eval_size} training problems held out of it (check) and "
        f"on the {cfg.data.eval_size} evaluation problems (what RL starts from). "
        f"Torch threads: {cfg.threads or torch.get_num_threads()}.",
        table(["task", "command wall s", "warm-up steps", "warm-up s", "stopped by", "check accuracy",
               "evaluation accuracy", "last RL step's reward", "peak RSS (MB)"], rows),
        f"{len(within)} of {len(results)} tasks within {opts.budget_s:g} s (bold: over it).",
    ]
    summary = {"tasks_wall_s_max": max(r["wall_s"] for r in results),
               "tasks_within_budget_frac": len(within) / len(results)}
    return publish(opts.results_dir, "tasks", "Tasks bench: reasoning-gym tasks nobody tuned for, from an empty cache",
                   command, sections, summary, console)
