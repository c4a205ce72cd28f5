"""The RL loop, top to bottom: prompts -> rollout -> rewards -> advantages -> loss -> optimizer.

The trainer orchestrates; the math lives in ``advantages.py`` (estimators), ``losses.py``
(losses and their aggregation) and ``update.py`` (the optimizer steps). Before the first step,
A*-PO computes V* (``vstar.py``, stage 1, cached). One step:

1. plan the rollout (``allocation.py``): ``rollout.batch_prompts`` prompts from the
   ``PromptSampler`` (sticky for KAE), ``rollout.group_size`` completions each, or, under
   ``rollout.allocation`` skip/budget, prompts and counts chosen from their pass rates p̂
   (``passrate.py``), the same number of completions in all,
2. sample the completions in one ``generate`` call (or one call of a vLLM engine that first
   receives the current weights, ``rollout.backend=vllm``),
3. score them with the task's reward function (``rollout.dynamic_sampling``: drop the groups
   whose rewards are all equal and repeat 2-3 on further prompts until the batch is full),
4. turn rewards into advantages with the configured estimator; then every completion generated
   (dynamic sampling's dropped groups too) joins the run's per-prompt history (``history.py``),
   which KAE's baselines and the next plans read, and the pass-rate prior is refitted,
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from frugalrl import checkpoint, distributed, recovery, sharding, vstar
from frugalrl.advantages import get_estimator
from frugalrl.allocation import Allocator, Plan, keep_varied
from frugalrl.config import Config, save_config
from frugalrl.data import PromptSampler, Task, load_task
from frugalrl.evaluation import evaluate, examples, score
from frugalrl.history import PromptHistory
from frugalrl.models import (check_prompt_lengths, cpu_threads, load_policy, policy_device, prepare_for_training,
                             resolve_model_path, sft_info)
from frugalrl.passrate import PassRateEstimator, prompt_embeddings
from frugalrl.plots import plot_run
from frugalrl.progress import TrainProgress
from frugalrl.profiling import phase
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

    ``v_star``: A*-PO's V* per prompt id (``vstar.prepare``). Under ``algo.loss=ppo`` the
    update replaces its advantages by the critic's per-token GAE.
    """
    a = cfg.algo
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
class StepSamples:
    """One step's samples. Global (the same on every rank): ``ids`` (N prompt ids), ``all_rewards``
    (N,), ``mine`` (N,) bool, which of them this rank holds, ``generated``, the completions
    generated for them (more than N when dynamic sampling dropped some). This rank's share, in
    global order: ``rows`` (one prompt row per sample), ``rollout``, ``rewards``."""

    ids: list[str]
    rows: list[dict]
    rollout: Rollout
    rewards: torch.Tensor
    all_rewards: torch.Tensor
    mine: torch.Tensor
    generated: int
    metrics: dict = field(default_factory=dict)

    def select(self, keep: torch.Tensor) -> StepSamples:
        """The samples where the global (N,) bool ``keep`` is True."""
        local = keep[self.mine]
        return StepSamples([k for k, b in zip(self.ids, keep.tolist()) if b],
                           [r for r, b in zip(self.rows, local.tolist()) if b], self.rollout.select(local),
                           self.rewards[local], self.all_rewards[keep], self.mine[keep], self.generated)

    @staticmethod
    def cat(parts: list[StepSamples], pad_id: int) -> StepSamples:
        return StepSamples([k for p in parts for k in p.ids], [r for p in parts for r in p.rows],
                           Rollout.cat([p.rollout for p in parts], pad_id), torch.cat([p.rewards for p in parts]),
                           torch.cat([p.all_rewards for p in parts]), torch.cat([p.mine for p in parts]),
                           sum(p.generated for p in parts))


def build_allocator(cfg: Config, sampler: PromptSampler, history: PromptHistory, estimator,
                    stage_one: dict[str, float] | None, embeddings) -> Allocator:
    """The run's ``rollout.allocation`` with its pass-rate estimate (``rollout.passrate_*``), valued by
    ``estimator``'s signal value. The estimate tracks the population prior too (skip compares with
    it, and its first-visit scores are logged next to any other prior's), and KAE's
    ``algo.kae_prior``, whose posterior KAE's baselines then shrink toward (with its fitted kappa)."""
    ro, kae_prior = cfg.rollout, cfg.algo.kae_prior
    rates = PassRateEstimator(history, prior=ro.passrate_prior, kinds=[kae_prior] * (kae_prior != "none"),
                              strength=ro.passrate_strength, memory=ro.passrate_memory, vstar_rates=stage_one,
                              embeddings=embeddings, neighbors=ro.prior_neighbors)
    if kae_prior != "none":
        estimator.use_prior(lambda ids: (rates.priors(ids, kae_prior), rates.strength(kae_prior)))
    return Allocator(ro, sampler, rates, gain=estimator.expected_gain_terms, seed=cfg.seed)


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
        table.add_row("SFT warm-up: steps, accuracy on its check problems, stopped by",
                      f"{steps[0]['sft_steps']}, {'-' if check is None else f'{check:.3f}'}, "
                      f"{steps[0].get('sft_stopped') or '-'}")
    table.add_row("steps", str(len(steps)))
    table.add_row("samples", str(steps[-1]["samples"] if steps else 0))
    table.add_row("training wall time", f"{steps[-1]['wall_s']:.0f} s" if steps else "-")
    if steps:
        first = np.mean([r["reward_mean"] for r in steps[:k]])
        last = np.mean([r["reward_mean"] for r in steps[-k:]])
        table.add_row(f"sampled reward, first -> last {k} steps", f"{first:.3f} -> {last:.3f}")
    ro = cfg.rollout
    if steps and (ro.allocation != "uniform" or ro.dynamic_sampling):
        rolled, considered = (sum(r[k] for r in steps) for k in ("prompts_rolled_out", "prompts_considered"))
        table.add_row(f"rollout.allocation={ro.allocation}: prompts rolled out / considered",
                      f"{rolled:.0f} / {considered:.0f}")
        table.add_row("completions per prompt: mean, max",
                      f"{np.mean([r['completions_per_prompt_mean'] for r in steps]):.2f}, "
                      f"{max(r['completions_per_prompt_max'] for r in steps):.0f}")
    if steps and ro.dynamic_sampling:
        trained = len(steps) * ro.batch_prompts * ro.group_size
        table.add_row("dynamic sampling: completions generated / trained", f"{steps[-1]['samples']} / {trained}")
    if steps and "all_equal_realised" in steps[0]:
        table.add_row("all-equal groups, predicted -> realised, mean over steps",
                      f"{np.mean([r['all_equal_predicted'] for r in steps]):.3f} -> "
                      f"{np.mean([r['all_equal_realised'] for r in steps]):.3f}")
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
    ro_cfg = cfg.rollout
    dist.shard(ro_cfg.batch_prompts)  # a batch must split evenly over the ranks
    run_dir = Path(cfg.output_dir)
    resume_from = dist.main_first(lambda: recovery.checkpoint_to_resume(cfg))

    set_seed(cfg.seed)
    task, model, tokenizer, dropped = dist.main_first(lambda: load_inputs(cfg, console, task))
    prompt_counts = f"{len(task.train_rows)} / {len(task.eval_rows)}"
    warmup = sft_info(resolve_model_path(cfg)) or {}  # the embedded model's warm-up, for the record
    if cfg.data.max_prompt_tokens:
        prompt_counts += f" ({dropped['train']} / {dropped['eval']} dropped: > {cfg.data.max_prompt_tokens} tokens)"
    v_star = stage_one = embeddings = None
    priors = (cfg.rollout.passrate_prior, cfg.algo.kae_prior)
    # A*-PO stage 1, from the starting weights (cached): V* for astar, pass rates for a vstar prior
    if cfg.algo.estimator == "astar" or "vstar" in priors:
        v_star, train_rows, stage_one = dist.main_first(
            lambda: (*vstar.prepare(cfg, model, tokenizer, task, console), vstar.pass_rates(cfg, task)))
        if cfg.algo.estimator == "astar":
            task = Task(train_rows, task.eval_rows, task.reward_fn)
    if "cross_prompt" in priors:  # from the starting weights: the same on every rank and resume
        embeddings = ([r["id"] for r in task.train_rows],
                      prompt_embeddings(model, tokenizer, [r["prompt"] for r in task.train_rows]))
    # Again: building the embedded SFT model or V* (or finding them cached) must not change
    # what the run draws.
    set_seed(cfg.seed)
    model = sharding.shard(prepare_for_training(model, cfg), cfg, dist)  # train.strategy=fsdp
    device = next(model.parameters()).device
    vllm_engine = VLLMRollout.create(resolve_model_path(cfg), tokenizer, cfg) if cfg.rollout.backend == "vllm" else None
    estimator = build_estimator(cfg, v_star)
    history = PromptHistory()  # every prompt's rewards: KAE's baselines and the allocator's p̂ read it
    estimator.use_history(history)
    sampler = PromptSampler(task.train_rows, cfg.rollout.batch_prompts, cfg.data.sticky_steps, cfg.seed)
    allocator = build_allocator(cfg, sampler, history, estimator, stage_one, embeddings)
    no_history = kae_history_warning(cfg, len(task.train_rows))
    if no_history:
        console.print(f"warning: {no_history}", style="bold yellow", markup=False, highlight=False)
    trainable = [p for p in model.parameters() if p.requires_grad]  # under LoRA, the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    learner = Learner(model, optimizer, cfg, dist, scheduler)
    run = recovery.Resumable(model, tokenizer, optimizer, scheduler, learner, estimator, sampler, task.train_rows,
                             history, allocator)
    wall, samples, start = 0.0, 0, 0
    if resume_from:
        state = recovery.restore_training_state(resume_from, run)
        wall, samples, start = state["wall_s"], state["samples"], state["step"]
        console.print(f"resuming from {resume_from} (step {start})")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # usable as --config for a fresh run
        save_config(cfg.model_copy(update={"resume": ""}), run_dir / "config.yaml")
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

    def generate_rows(sample_rows: list[dict]) -> StepSamples:
        """This rank's share of the completions of ``sample_rows`` (the global batch, one row per
        completion), generated and scored; the rewards of every rank gathered."""
        n = len(sample_rows)
        share = dist.shard(n, "completions per step (rollout.batch_prompts x rollout.group_size)")
        # one uniform per sample and token of the global batch: a sample's tokens do not
        # depend on which rank generates it
        uniforms = (1.0 - torch.rand(n, ro_cfg.max_new_tokens))[share]
        rows = sample_rows[share]
        sampling = dict(max_new_tokens=ro_cfg.max_new_tokens, temperature=ro_cfg.temperature, top_p=ro_cfg.top_p)
        prompts = [r["prompt"] for r in rows]
        with sharding.full_weights(model) as whole, phase("generate"):  # fsdp: each rank gathers the weights
            rollout = (vllm_engine.generate(whole, prompts, **sampling) if vllm_engine
                       else generate(whole, tokenizer, prompts, uniforms=uniforms, **sampling))
        with phase("reward"):
            rewards = score(task.reward_fn, rows, rollout.texts)
        mine = torch.zeros(n, dtype=torch.bool)
        mine[share] = True
        return StepSamples([r["id"] for r in sample_rows], rows, rollout, rewards, dist.gather(rewards), mine, n)

    def roll_out(plan: Plan) -> tuple[StepSamples, list[tuple[Plan, np.ndarray]]]:
        """The step's samples as ``plan`` says, and every round's (plan, rewards of all its
        completions) for the allocator's record; under rollout.dynamic_sampling, DAPO's rounds:
        keep the groups whose rewards differ, roll out further prompts until batch_prompts groups
        are kept (the last round fills up with all-equal ones). Every round's generation counts."""
        first = generate_rows(plan.sample_rows())
        rounds = [(plan, first.all_rewards.numpy())]
        if not ro_cfg.dynamic_sampling:
            return first, rounds
        G, kept, need, dropped = ro_cfg.group_size, [], ro_cfg.batch_prompts, 0
        generated, batch = 0, first
        for round_ in range(1, ro_cfg.dynamic_max_rounds + 1):
            if round_ > 1:
                extra = allocator.extra(ro_cfg.batch_prompts)
                batch = generate_rows(extra.sample_rows())
                rounds.append((extra, batch.all_rewards.numpy()))
            generated += batch.generated
            group_of = np.arange(len(batch.ids)) // G
            varied = keep_varied(batch.all_rewards.numpy(), group_of)
            order = np.flatnonzero(varied) if round_ < ro_cfg.dynamic_max_rounds else np.argsort(~varied, kind="stable")
            take = np.sort(order[:need])
            need, dropped = need - len(take), dropped + len(varied) - len(take)
            kept.append(batch.select(torch.from_numpy(np.isin(group_of, take))))
            if not need:
                break
        out = StepSamples.cat(kept, tokenizer.pad_token_id)
        out.generated = generated
        out.metrics = {"dynamic_rounds": round_, "dynamic_dropped_groups": dropped}
        return out, rounds

    evals = [r for r in metrics.rows if "eval_accuracy" in r]  # the earlier ones, when resuming
    step, bad_steps = start, 0
    with trackers, TrainProgress(console, cfg.max_steps, start, cfg.log_every, cfg.max_wall_s) as progress, \
            recovery.StopSignals() as stop:
        if cfg.eval_every and not resume_from:
            run_eval(0)
        for step in range(start + 1, cfg.max_steps + 1):
            t0 = time.perf_counter()
            plan = allocator.plan()  # the global batch: the same on every rank
            batch, rounds = roll_out(plan)
            rollout, rewards, all_rewards = batch.rollout, batch.rewards, batch.all_rewards
            t_gen = time.perf_counter() - t0
            with phase("advantages"):
                est = estimator.estimate(all_rewards, batch.ids, step)  # on the global batch
            # after the estimate, which reads the history as it was before this step
            allocated = allocator.record(rounds, step)
            update = learner.update(rollout, rewards, est.advantages[batch.mine])  # steps the lr schedule too
            dist.sync_rng()
            # the slowest rank's time, so that every rank agrees on max_wall_s
            dt = dist.max([time.perf_counter() - t0])[0]
            wall += dt
            generated, truncated = dist.sum([rollout.completion_mask.sum().item(), rollout.truncated.sum().item()])
            samples += batch.generated
            row = {"step": step, "reward_mean": all_rewards.mean().item(), "loss": update.pop("loss"),
                   "wall_s": round(wall, 3), "samples": samples, "step_s": round(dt, 3),
                   "gen_s": round(t_gen, 3), "lr": scheduler.get_last_lr()[0],
                   "tokens_generated": int(generated), "truncation_rate": truncated / len(all_rewards),
                   "baseline_mean": est.baselines.mean().item(), **update, **est.metrics,
                   **allocated, **batch.metrics,  # the allocation's (and dynamic sampling's) figures
                   # per-function means, errors and timeouts when reward.funcs combines several
                   **getattr(task.reward_fn, "last_stats", {})}
            if step == 1:  # the data this run trains on, once
                row.update(train_prompts=len(task.train_rows), eval_prompts=len(task.eval_rows),
                           prompts_dropped=dropped["train"] + dropped["eval"])
                if warmup:
                    row.update(sft_steps=warmup["sft_steps"], sft_check_accuracy=warmup.get("check_accuracy"),
                               sft_stopped=warmup.get("stopped"))  # target, patience, time or steps
            log(row)
            if on_step is not None:
                on_step(step, model, batch.rows, rollout, rewards)
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
