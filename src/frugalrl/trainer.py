"""The RL loop, top to bottom: prompts -> rollout -> rewards -> advantages -> loss -> optimizer.

The trainer orchestrates; the math lives in ``advantages.py`` (estimators), ``losses.py``
(losses and their aggregation) and ``update.py`` (the optimizer steps). Before the first step,
A*-PO computes V* (``vstar.py``, stage 1, cached). One step:

1. draw ``rollout.batch_prompts`` prompts (``PromptSampler``; sticky for KAE),
2. sample ``rollout.group_size`` completions of each in one ``generate`` call (or one call of a
   vLLM engine that first receives the current weights, ``rollout.backend=vllm``),
3. score them with the task's reward function,
4. turn rewards into advantages with the configured estimator,
5. drop samples whose advantage is zero (or |A| <= train.filter_threshold) before their
   forward pass, back-propagate the rest in micro-batches of ``train.micro_batch`` with one
   loss normaliser for the whole rollout batch, and take one AdamW step (or
   ``train.ppo_epochs`` x ``train.mini_batches`` off-policy steps with the PPO clip); the
   learning-rate schedule advances once per optimizer step.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from frugalrl import checkpoint, distributed, recovery, sharding, vstar
from frugalrl.advantages import get_estimator
from frugalrl.config import Config, save_config
from frugalrl.data import PromptSampler, Task, load_task
from frugalrl.evaluation import evaluate, examples, score
from frugalrl.models import (check_prompt_lengths, cpu_threads, load_policy, policy_device, prepare_for_training,
                             resolve_model_path, sft_info)
from frugalrl.plots import plot_run
from frugalrl.progress import TrainProgress
from frugalrl.prompts import format_task
from frugalrl.rewards import build_reward
from frugalrl.rollout import Rollout, generate
from frugalrl.tracking import Trackers
from frugalrl.update import Learner, optimizer_steps
from frugalrl.vllm_rollout import VLLMRollout


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(cfg: Config, step: int) -> float:
    """Multiplier of ``train.lr`` after ``step`` optimizer steps (``optimizer_steps(cfg)`` per
    rollout batch): linear warm-up over ``train.warmup_steps``, then constant or a cosine decay
    that reaches 0 at the run's last optimizer step, ``max_steps`` x ``optimizer_steps(cfg)``."""
    warmup = max(1, cfg.train.warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.train.lr_schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, cfg.max_steps * optimizer_steps(cfg) - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_estimator(cfg: Config, v_star: dict[str, float] | None = None):
    """The advantage estimator named by ``cfg.algo.estimator`` with its options.

    ``v_star``: A*-PO's V* per prompt id (``vstar.prepare``). Under PPO (``gae``) the baseline
    is the critic's, per token, inside the update; the sequence-level estimator is then plain
    REINFORCE without a baseline (advantage = reward), which the update replaces by GAE.
    """
    a = cfg.algo
    if a.estimator == "gae":
        return get_estimator("reinforce", baseline="none")
    options = {
        "kae": dict(kernel=a.kae_kernel, bandwidth=a.kae_bandwidth, bandwidth_mode=a.kae_bandwidth_mode,
                    auto_c=a.kae_auto_c, scale=a.kae_scale),
        "reinforce": dict(baseline=a.reinforce_baseline),
        "astar": dict(v_star=v_star),
    }.get(a.estimator, {})
    return get_estimator(a.estimator, **options)


def kae_history_warning(cfg: Config, num_prompts: int) -> str | None:
    """Why KAE's baselines would never draw on a prompt's past rewards under this prompt
    schedule (KAE then behaves like rloo), or None when they can; ``num_prompts``: training prompts.

    A prompt comes back on the next step while its batch is sticky (``data.sticky_steps`` > 1),
    else after a pass over the prompts; its past counts only if that happens within the run and
    within the kernel's reach. "auto" bandwidths are set per prompt and not checked here.
    """
    a, sticky = cfg.algo, cfg.data.sticky_steps
    if a.estimator != "kae":
        return None
    lag = 1 if sticky > 1 else num_prompts // cfg.rollout.batch_prompts
    reuse = "set data.sticky_steps > 1 (e.g. 4) to reuse each prompt batch on the next steps"
    if cfg.max_steps <= lag:
        why = (f"a prompt comes back only after a pass over the {num_prompts} training prompts, {lag} steps "
               f"of rollout.batch_prompts={cfg.rollout.batch_prompts}, and the run ends first "
               f"(max_steps={cfg.max_steps})")
        fix = reuse
    elif a.kae_bandwidth_mode != "auto" and build_estimator(cfg).lag_weight(lag, cfg.max_steps) == 0:
        when = "on the next step" if lag == 1 else f"every {lag} steps"
        why = (f"a prompt comes back {when}, beyond the kernel's reach (algo.kae_bandwidth={a.kae_bandwidth:g}, "
               f"algo.kae_bandwidth_mode={a.kae_bandwidth_mode})")
        fix = "widen algo.kae_bandwidth or set algo.kae_bandwidth_mode=relative"
        fix = fix if sticky > 1 else f"{reuse}, or {fix}"
    else:
        return None
    return f"algo.estimator=kae: {why}, so its past rewards get no weight and KAE behaves like rloo; {fix}"


def load_inputs(cfg: Config, console: Console, task: Task | None = None):
    """``(task, model, tokenizer, dropped)`` for a command, every input checked before any work.

    The task (``cfg.data``, or ``task``) gets its reward (``cfg.reward.funcs``, else its own) and
    its prompts as the model will see them (chat template; prompts longer than
    ``data.max_prompt_tokens`` dropped, counted in ``dropped``: ``{"train": n, "eval": m}``).
    The model is the policy as loaded (``prepare_for_training`` comes later).
    """
    task = task or load_task(cfg)
    # before the model loads, so that a reward spec that does not load fails at once
    task = replace(task, reward_fn=build_reward(cfg.reward, task.reward_fn))
    model, tokenizer = load_policy(cfg, console)
    task, dropped = format_task(task, tokenizer, cfg.data)
    if any(dropped.values()):
        console.print(f"dropped {dropped['train']} training and {dropped['eval']} evaluation prompts longer than "
                      f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}")
    check_prompt_lengths(model, tokenizer, task.train_rows + task.eval_rows, cfg.rollout.max_new_tokens)
    return task, model, tokenizer, dropped


@dataclass
class RunResult:
    run_dir: Path
    accuracy_before: float | None
    accuracy_after: float | None
    steps: int
    wall_s: float


def _checkpoint_due(cfg: Config, step: int, stopping: bool) -> bool:
    """``save_every``'s schedule, plus the run's last step (so that it can be extended)."""
    return bool(cfg.save_every) and (step % cfg.save_every == 0 or step == cfg.max_steps or stopping)


def _summary(console: Console, cfg: Config, rows: list[dict], evals: list[dict], prompts: str) -> None:
    steps = [r for r in rows if "reward_mean" in r]
    k = max(1, min(10, len(steps) // 5))
    table = Table(title=f"frugalrl train: {cfg.algo.estimator}, {cfg.rollout.batch_prompts} prompts "
                        f"x G={cfg.rollout.group_size}", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("prompts: train / eval", prompts)
    if steps and "sft_steps" in steps[0]:
        check = steps[0]["sft_check_accuracy"]
        table.add_row("SFT warm-up: steps, accuracy on its check problems",
                      f"{steps[0]['sft_steps']}, {'-' if check is None else f'{check:.3f}'}")
    table.add_row("steps", str(len(steps)))
    table.add_row("samples", str(steps[-1]["samples"] if steps else 0))
    table.add_row("training wall time", f"{steps[-1]['wall_s']:.0f} s" if steps else "-")
    if steps:
        first = np.mean([r["reward_mean"] for r in steps[:k]])
        last = np.mean([r["reward_mean"] for r in steps[-k:]])
        table.add_row(f"sampled reward, first -> last {k} steps", f"{first:.3f} -> {last:.3f}")
    history = [r["kae_history_weight_mean"] for r in steps if "kae_history_weight_mean" in r]
    if history:  # 0 throughout: no baseline drew on a prompt's past, and KAE behaved like rloo
        table.add_row("KAE history weight (kae_history_weight_mean), mean over steps", f"{np.mean(history):.3f}")
    if evals:
        table.add_row("held-out greedy accuracy", f"{evals[0]['eval_accuracy']:.3f} -> {evals[-1]['eval_accuracy']:.3f}")
        for key in evals[-1]:
            if key.startswith("eval_pass@"):
                table.add_row(f"held-out {key[5:]}", f"{evals[0][key]:.3f} -> {evals[-1][key]:.3f}")
    console.print(table)


def train(cfg: Config, console: Console | None = None, task: Task | None = None,
          on_step: Callable[[int, Any, list[dict], Rollout, torch.Tensor], None] | None = None) -> RunResult:
    """Run RL as ``cfg`` says; write the run directory; return before/after accuracy.

    ``on_step(step, model, rows, rollout, rewards)``, when given, is called after each step's
    optimizer update and metrics row: ``rows`` are the step's prompt rows, ``rollout`` its
    samples and ``rewards`` their rewards (this rank's share under torchrun). Benchmarks use it
    to probe the policy along a run; its time is not counted in ``wall_s``.
    ``cfg.resume`` continues that run from its newest complete checkpoint (``recovery``).
    SIGINT/SIGTERM finish the current step, checkpoint it and raise ``TrainingInterrupted``;
    ``train.max_bad_steps`` non-finite steps in a row raise ``TrainingDiverged``.
    Under ``torchrun`` every rank runs this function (``distributed.py`` says how the work is
    split); rank 0 evaluates, logs and writes the run directory.
    """
    dist = distributed.init(policy_device(cfg), group=cfg.train.strategy == "fsdp")
    try:
        with cpu_threads(cfg.threads):
            return _train(cfg, console or Console(), task, on_step, dist)
    finally:
        distributed.close(dist)


def _train(cfg: Config, console: Console, task: Task | None, on_step, dist: distributed.Dist) -> RunResult:
    if not dist.is_main:  # rank 0 speaks for the run
        console = Console(quiet=True)
    shard = dist.shard(cfg.rollout.batch_prompts)  # this rank's prompts of each batch
    G, ro_cfg = cfg.rollout.group_size, cfg.rollout
    mine = slice(shard.start * G, shard.stop * G)  # and their samples
    run_dir = Path(cfg.output_dir)
    resume_from = dist.main_first(lambda: recovery.checkpoint_to_resume(cfg))

    set_seed(cfg.seed)
    task, model, tokenizer, dropped = dist.main_first(lambda: load_inputs(cfg, console, task))
    prompt_counts = f"{len(task.train_rows)} / {len(task.eval_rows)}"
    warmup = sft_info(resolve_model_path(cfg)) or {}  # the embedded model's warm-up, for the record
    if cfg.data.max_prompt_tokens:
        prompt_counts += f" ({dropped['train']} / {dropped['eval']} dropped: > {cfg.data.max_prompt_tokens} tokens)"
    v_star = None
    if cfg.algo.estimator == "astar":  # A*-PO stage 1, from the starting weights (cached)
        v_star, train_rows = dist.main_first(lambda: vstar.prepare(cfg, model, tokenizer, task, console))
        task = Task(train_rows, task.eval_rows, task.reward_fn)
    # Again: building the embedded SFT model or V* (or finding them cached) must not change
    # what the run draws.
    set_seed(cfg.seed)
    model = sharding.shard(prepare_for_training(model, cfg), cfg, dist)  # train.strategy=fsdp
    device = next(model.parameters()).device
    vllm_engine = VLLMRollout.create(resolve_model_path(cfg), tokenizer, cfg) if cfg.rollout.backend == "vllm" else None
    estimator = build_estimator(cfg, v_star)
    sampler = PromptSampler(task.train_rows, cfg.rollout.batch_prompts, cfg.data.sticky_steps, cfg.seed)
    no_history = kae_history_warning(cfg, len(task.train_rows))
    if no_history:
        console.print(f"warning: {no_history}", style="bold yellow", markup=False, highlight=False)
    trainable = [p for p in model.parameters() if p.requires_grad]  # under LoRA, the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    learner = Learner(model, optimizer, cfg, dist, scheduler)
    run = recovery.Resumable(model, tokenizer, optimizer, scheduler, learner, estimator, sampler, task.train_rows)
    wall, samples, start = 0.0, 0, 0
    if resume_from:
        state = recovery.restore_training_state(resume_from, run)
        wall, samples, start = state["wall_s"], state["samples"], state["step"]
        console.print(f"resuming from {resume_from} (step {start})")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(replace(cfg, resume=""), run_dir / "config.yaml")  # usable as --config for a fresh run
    metrics = recovery.MetricsLog(run_dir / "metrics.jsonl" if dist.is_main else None,
                                  keep_through=start if resume_from else None)
    trackers = Trackers.open(cfg, run_dir, start) if dist.is_main else Trackers()

    def log(row: dict) -> None:
        """A metrics row to metrics.jsonl and to every tracker (report_to)."""
        metrics.log(row)
        trackers.log(row)

    def run_eval(step: int) -> None:
        """Evaluate (rank 0); under train.strategy=fsdp every rank first gathers the whole weights."""
        with sharding.full_weights(model) as whole:
            evaluate_on_main(step, whole)

    def evaluate_on_main(step: int, model) -> None:
        """Rank 0 evaluates (the others wait); its sampling does not touch the shared RNG."""
        if dist.is_main:
            with distributed.private_rng(device):
                result = evaluate(model, tokenizer, task.eval_rows, task.reward_fn,
                                  max_new_tokens=ro_cfg.max_new_tokens, pass_k=cfg.eval.pass_k,
                                  temperature=cfg.eval.temperature)
                shown = (examples(model, tokenizer, task.eval_rows[:cfg.eval.log_examples], task.reward_fn,
                                  max_new_tokens=ro_cfg.max_new_tokens) if trackers and cfg.eval.log_examples else [])
            row = {"step": step, "wall_s": round(wall, 3), "samples": samples,
                   **{f"eval_{k}": v for k, v in result.items()}}
            log(row)
            evals.append(row)
            if shown:
                trackers.log_examples(shown, step)
        dist.barrier()

    evals = [r for r in metrics.rows if "eval_accuracy" in r]  # the earlier ones, when resuming
    step, bad_steps = start, 0
    with trackers, TrainProgress(console, cfg.max_steps, start, cfg.log_every, cfg.max_wall_s) as progress, \
            recovery.StopSignals() as stop:
        if cfg.eval_every and not resume_from:
            run_eval(0)
        for step in range(start + 1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            batch = sampler.next()  # the global batch: the same on every rank
            # one uniform per sample and token of the global batch: a sample's tokens do not
            # depend on which rank generates it
            uniforms = 1.0 - torch.rand(len(batch) * G, ro_cfg.max_new_tokens)
            rows, uniforms = batch[shard], uniforms[mine]
            prompts = [r["prompt"] for r in rows for _ in range(G)]
            sampling = dict(max_new_tokens=ro_cfg.max_new_tokens, temperature=ro_cfg.temperature, top_p=ro_cfg.top_p)
            with sharding.full_weights(model) as whole:  # fsdp: each rank gathers the weights to sample
                rollout = (vllm_engine.generate(whole, prompts, **sampling) if vllm_engine
                           else generate(whole, tokenizer, prompts, uniforms=uniforms, **sampling))
            t_gen = time.perf_counter() - t0
            rewards = score(task.reward_fn, rows, rollout.texts, G)
            all_rewards = dist.gather(rewards)  # the estimator sees the global batch
            est = estimator.estimate(all_rewards, [r["id"] for r in batch for _ in range(G)], step)
            update = learner.update(rollout, rewards, est.advantages[mine])  # steps the lr schedule too
            dist.sync_rng()
            # the slowest rank's time, so that every rank agrees on max_wall_s
            dt = dist.max([time.perf_counter() - t0])[0]
            wall += dt
            generated, truncated = dist.sum([rollout.completion_mask.sum().item(), rollout.truncated.sum().item()])
            samples += len(all_rewards)
            row = {"step": step, "reward_mean": all_rewards.mean().item(), "loss": update.pop("loss"),
                   "wall_s": round(wall, 3), "samples": samples, "step_s": round(dt, 3),
                   "gen_s": round(t_gen, 3), "lr": scheduler.get_last_lr()[0],
                   "tokens_generated": int(generated), "truncation_rate": truncated / len(all_rewards),
                   "baseline_mean": est.baselines.mean().item(), **update, **est.metrics,
                   # per-function means, errors and timeouts when reward.funcs combines several
                   **getattr(task.reward_fn, "last_stats", {})}
            if step == 1:  # the data this run trains on, once
                row.update(train_prompts=len(task.train_rows), eval_prompts=len(task.eval_rows),
                           prompts_dropped=dropped["train"] + dropped["eval"])
                if warmup:
                    row.update(sft_steps=warmup["sft_steps"], sft_check_accuracy=warmup.get("check_accuracy"))
            log(row)
            if on_step is not None:
                on_step(step, model, rows, rollout, rewards)
            bad_steps = bad_steps + 1 if update["bad_step"] else 0
            if bad_steps >= cfg.train.max_bad_steps:
                raise recovery.TrainingDiverged(bad_steps, step, run_dir)
            out_of_time = bool(cfg.max_wall_s) and wall >= cfg.max_wall_s
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time):
                run_eval(step)
            progress.update(step, row["reward_mean"], evals[-1] if evals else None, wall, last=out_of_time)
            # read once, and agreed on by every rank: a signal arriving later is handled after the next step
            signum = int(dist.max([stop.signum or 0])[0])
            saved = None
            if not bad_steps and (signum or _checkpoint_due(cfg, step, out_of_time)):  # never a bad step's
                if dist.is_main or sharding.is_sharded(model):  # fsdp: every rank writes its shard
                    saved = recovery.save_training_checkpoint(run_dir, step, run, {"wall_s": wall, "samples": samples},
                                                              keep=cfg.save_total_limit, dist=dist)
                dist.barrier()
            if signum:
                raise recovery.TrainingInterrupted(signum, step, run_dir, saved)
            if out_of_time:
                break

    with sharding.full_weights(model) as whole:  # fsdp: gathered on every rank, saved by rank 0
        if dist.is_main:
            checkpoint.save_model(run_dir / "model", whole, tokenizer, cfg.lora.save)
    if dist.is_main:
        plot_run(metrics.rows, run_dir / "training.png", title=f"{cfg.algo.estimator} on {cfg.data.source}")
        _summary(console, cfg, metrics.rows, evals, prompt_counts)
        console.print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, training.png, model/)")
    dist.barrier()
    return RunResult(run_dir, evals[0]["eval_accuracy"] if evals else None,
                     evals[-1]["eval_accuracy"] if evals else None, step, wall)
