"""Profile bench: where a training step's time goes, by phase and by operator (``torch.profiler``).

Protocol of ``frugalrl bench profile``:

* The run config's model and task (the embedded default; ``--config configs/smollm2-arithmetic.yaml``
  profiles SmolLM2), trained in this process for ``bench.skip + bench.steps`` steps with evaluation
  and checkpoints off. The profiler records the last ``bench.steps`` steps (CPU activity, and CUDA's
  where the model is on a GPU); the first ``bench.skip`` pay for allocation and warm caches.
* Phases are the ranges that the trainer and the update mark (``frugalrl.profiling``): generate,
  reward, advantages, constants (the no-grad passes: old and reference log-probs), forward (the
  training forward pass and the loss), backward, optimizer (gradient clipping and the step). The
  table gives each one's seconds per step and share of the step (the profiler's step range);
  "other" is the rest of the step (metrics, the allocator, logging).
* Operators: the ``bench.top`` with the most self time per step (time inside the operator, not in
  those it calls), with calls per step.

The profiler adds a little time to every operator call, so a step here is slower than in training:
read shares, not absolute seconds. Absolute throughput is ``bench rollout``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch.profiler import ProfilerActivity, profile, schedule

from frugalrl.bench.options import ProfileOptions
from frugalrl.bench.report import fmt, publish, table
from frugalrl.config import Config
from frugalrl.profiling import PHASES
from frugalrl.trainer import train

TRAIN_DEFAULTS = ["output_dir=runs/bench-profile", "eval_every=0", "save_every=0", "max_wall_s=0"]


def _per_step(events, steps: int) -> dict[str, tuple[float, float, float]]:
    """name -> (inclusive s, self s, calls), each per step, of the profiler's averaged ``events``."""
    return {e.key: (e.cpu_time_total / 1e6 / steps, e.self_cpu_time_total / 1e6 / steps, e.count / steps)
            for e in events}


def run(cfg: Config, opts: ProfileOptions, command: str, console: Console) -> dict:
    """Profile, write profile[-LABEL].md, merge the phase shares into summary.json and return them."""
    cfg = cfg.model_copy(update={"max_steps": opts.skip + opts.steps})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    # step 0 of the schedule is everything before the first training step's end (loading, the
    # warm-up of the embedded model): left out with the skipped steps
    with profile(activities=activities, schedule=schedule(wait=opts.skip - 1, warmup=1, active=opts.steps,
                                                           repeat=1)) as prof:
        params = []

        def on_step(step, model, *_):
            params[:] = [sum(p.numel() for p in model.parameters())]
            prof.step()

        result = train(cfg, console, on_step=on_step)
    if result.steps != cfg.max_steps:
        raise RuntimeError(f"the run stopped after {result.steps} of {cfg.max_steps} steps: nothing to profile")
    times = _per_step(prof.key_averages(), opts.steps)
    step_s = sum(inclusive for name, (inclusive, _, _) in times.items() if name.startswith("ProfilerStep"))
    phases = {name: times.get(f"frugalrl.{name}", (0.0, 0.0, 0.0))[0] for name in PHASES}
    phases["other"] = step_s - sum(phases.values())
    operators = sorted(((name, t) for name, t in times.items()
                        if not name.startswith(("ProfilerStep", "frugalrl."))), key=lambda item: -item[1][1])
    prefix = f"profile_{opts.label}_" if opts.label else "profile_"
    summary = {f"{prefix}step_s": step_s, **{f"{prefix}{name}_share": s / step_s for name, s in phases.items()}}

    what = (f"model `{cfg.model.name_or_path or 'embedded'}`, {cfg.rollout.batch_prompts} prompts x G = "
            f"{cfg.rollout.group_size}, <= {cfg.rollout.max_new_tokens} new tokens, {cfg.algo.estimator}, "
            f"{'LoRA r = ' + str(cfg.lora.r) if cfg.lora.r else 'full fine-tuning'}, {torch.get_num_threads()} "
            f"torch threads, {params[0] / 1e6:.1f} M parameters")
    sections = [
        f"Steps {opts.skip + 1}-{opts.skip + opts.steps} of a run ({what}), recorded by torch.profiler; per step, "
        f"the mean of {opts.steps}. Protocol: `src/frugalrl/bench/profile.py`. Shares are what to read: the "
        "profiler slows every operator call a little.",
        table(["phase", "s / step", "share of the step"],
              [[name, fmt(s, 3), f"{s / step_s:.1%}"] for name, s in phases.items()] + [["step", fmt(step_s, 3),
                                                                                         "100%"]]),
        f"The {opts.top} operators with the most self time (time in the operator itself):",
        table(["operator", "self s / step", "share of the step", "calls / step"],
              [[f"`{name}`", fmt(self_s, 3), f"{self_s / step_s:.1%}", f"{calls:.0f}"]
               for name, (_, self_s, calls) in operators[:opts.top]]),
    ]
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    return publish(results_dir, opts.page("profile"), "Profile bench: where a training step's time goes", command,
                   sections, summary, console)
