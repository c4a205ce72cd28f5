"""Demo bench: does ``frugalrl demo`` gain what the README says for every seed, not only seed 0?

``frugalrl bench demo`` runs ``frugalrl demo seed=S`` for every seed of ``bench.seeds`` as a new
user first runs it (``fresh.fresh_run``: a process of its own, an empty model cache, so the
warm-up is built anew), with the run options of the bench's command line on top (none: the
demo as shipped). Per seed it reports the held-out greedy accuracy before and after RL and the
gain, the RL steps and their training seconds (a run that stopped at ``max_wall_s`` before
``max_steps`` had a busy machine: its gain is not the demo's), the warm-up (steps, seconds, what
stopped it) and the whole command's wall time; over the seeds, the mean gain with its 95 %
interval, the smallest, and the share of seeds that clear ``bench.min_gain``.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from frugalrl.bench.fresh import fresh_run
from frugalrl.bench.options import DemoOptions
from frugalrl.bench.report import fmt, publish, table
from frugalrl.bench.stats import mean_ci
from frugalrl.config import Config, changed_options

TRAIN_DEFAULTS: list[str] = []


def run(cfg: Config, opts: DemoOptions, command: str, console: Console) -> dict:
    """Run the demo for every seed; write demo.md; merge the gain's mean, interval, minimum and
    clearing share, and the longest command, into summary.json and return them."""
    if cfg.model.name_or_path:
        raise ValueError("bench demo measures the embedded model's demo: leave model.name_or_path empty")
    if not cfg.eval_every:
        raise ValueError("bench demo reads the held-out accuracy before and after RL: eval_every must not be 0")
    common = changed_options(cfg)
    Path(opts.results_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for seed in opts.seeds:
        console.print(f"demo: seed {seed}")
        r = fresh_run(["demo", *common, f"seed={seed}"], Path(opts.work_dir), f"seed{seed}")
        before, after = r["evals"][0]["eval_accuracy"], r["evals"][-1]["eval_accuracy"]
        results.append({"seed": seed, "before": before, "after": after, "gain": after - before,
                        "rl_steps": r["steps"][-1]["step"], "train_s": r["steps"][-1]["wall_s"],
                        "wall_s": r["wall_s"], "warmup": r["warmup"]})
        console.print(f"demo: seed {seed}: before {before:.3f} after {after:.3f} gain {after - before:+.3f}")

    rows = [[str(r["seed"]), f"{w['sft_steps']}, {w['seconds']:.0f} s, {w['stopped']}", fmt(w["check_accuracy"], 3),
             f"{r['before']:.3f} → {r['after']:.3f}", f"{r['gain']:+.3f}" if r["gain"] >= opts.min_gain
             else f"**{r['gain']:+.3f}**", f"{r['rl_steps']}{'' if r['rl_steps'] == cfg.max_steps else ' (time)'}",
             f"{r['train_s']:.0f}", f"{r['wall_s']:.0f}"] for r in results for w in [r["warmup"]]]
    gains = [r["gain"] for r in results]
    gain = mean_ci(gains)
    short = [r["seed"] for r in results if r["gain"] < opts.min_gain]
    busy = [r["seed"] for r in results if r["rl_steps"] < cfg.max_steps]
    sections = [
        f"`frugalrl demo seed=S` for seeds {opts.seeds}, one after another, each in a process of its own from an "
        "empty model cache, as on a clean clone: the embedded model is built and warmed up (`models."
        f"build_embedded_sft`), then trained with RL for {cfg.max_steps} steps or {cfg.max_wall_s:g} s of training, "
        f"whichever comes first. Accuracy: greedy, on the {cfg.data.eval_size} held-out problems, before and after "
        f"RL. Options on top of the defaults: {' '.join(common) or 'none'}.",
        table(["seed", "warm-up: steps, time, stopped by", "warm-up check accuracy", "accuracy before → after",
               "gain", "RL steps", "training s", "command wall s"], rows),
        f"Gain over {len(gains)} seeds: mean {gain}, smallest {min(gains):+.3f}; "
        f"{len(gains) - len(short)} of {len(gains)} seeds clear +{opts.min_gain:g}"
        + (f" (short: seeds {short})." if short else ".")
        + (f" Seeds {busy} stopped at max_wall_s before max_steps: the machine was busy, and their gains are "
           "not the demo's." if busy else ""),
    ]
    summary = {**gain.as_summary("demo_gain_mean"), "demo_gain_min": min(gains),
               "demo_gain_clear_frac": 1 - len(short) / len(gains),
               "demo_accuracy_before_mean": sum(r["before"] for r in results) / len(results),
               "demo_accuracy_after_mean": sum(r["after"] for r in results) / len(results),
               "demo_wall_s_max": max(r["wall_s"] for r in results)}
    return publish(opts.results_dir, "demo", "Demo bench: `frugalrl demo` over seeds, from an empty cache", command,
                   sections, summary, console)
