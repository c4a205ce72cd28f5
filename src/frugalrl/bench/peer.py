"""Peer bench: frugalrl's GRPO against TRL's ``GRPOTrainer``, on the same model, task, G and budget.

Protocol of ``frugalrl bench peer``:

* Both sides train the same model directory (``model.name_or_path``; by default the embedded
  SFT model, resolved once by the bench) on the same rows and reward (``trainer.load_inputs``:
  the prompts as frugalrl formats them, the task's reward called with the same columns and
  scored as ``evaluation.score`` scores it), for ``bench.steps`` steps of
  ``rollout.batch_prompts`` (P) prompts x ``rollout.group_size`` (G) completions of at most
  ``rollout.max_new_tokens`` tokens, sampled at ``rollout.temperature`` and top-p
  ``rollout.top_p``, top-k off; one AdamW step per batch at ``train.lr`` with the run config's
  warm-up, schedule (constant or cosine), weight decay and gradient clip (Hugging Face's
  warm-up starts at lr 0, frugalrl's at lr / warmup_steps); no KL term and no reference model;
  weights in ``model.dtype`` with no mixed precision (TRL's default bf16 off), gradient
  checkpointing only with ``model.gradient_checkpointing`` (TRL's default on, off here); no
  evaluation, checkpoints or logging during the run.
* frugalrl: ``trainer.train`` as the run config says (by default the ``configs/grpo.yaml``
  settings: ``algo.estimator=grpo``, ``algo.loss_agg=seq-mean-token-mean``); samples whose
  advantage is 0 skip their forward and backward pass, as in every frugalrl run.
* TRL: ``GRPOTrainer`` with ``num_generations`` = G, ``generation_batch_size`` = P x G (one
  Hugging Face ``generate`` call per step, ``use_vllm=False``), ``per_device_train_batch_size``
  = ``train.micro_batch`` and gradient accumulation over the rest of the batch,
  ``num_iterations=1``, ``beta=0``, and the loss closest to frugalrl's (``trl_loss``): for grpo
  with seq-mean-token-mean, ``loss_type="grpo"`` (each completion's token mean, then the mean
  over completions) and ``scale_rewards="group"`` (A = (r - group mean) / (group std + 1e-4)).
* Each run is a process of its own (``python -m frugalrl.bench.peer SIDE ...``), so that its peak
  RSS (its VmHWM, ``report.run_child``; start-up to exit: imports, data, model, training, saving
  the final model) is its own. Both sides import frugalrl's loaders (torch, transformers,
  matplotlib); TRL's also imports trl, datasets and accelerate. Runs alternate frugalrl, TRL,
  frugalrl, TRL, ... for ``bench.rounds`` rounds, by default with one torch thread each
  (``threads=1``: see ``TRAIN_DEFAULTS``). Round i (0, 1, ...) runs both sides with seed
  ``seed`` + i: the same seed for the pair, another for each round, so that the rounds are
  independent draws of the training noise and the spread over them is an error bar. The data
  split stays the first round's (``data.seed`` pinned), so no round trains on held-out prompts.
* Seconds per step: each run timestamps the end of every step (perf_counter); s/step =
  (t_N - t_w) / (N - w), leaving out the first w = ``bench.warmup`` steps (lazy initialisation,
  allocator growth).
* Accuracy after equal samples: both sides sample N x P x G completions; each run's final model
  (``save_pretrained``) is evaluated by frugalrl in the bench's process (``evaluation.evaluate``:
  greedy, the held-out split), next to the starting model's accuracy.
* Statistics: each side's figure is its mean over rounds with a 95 % Student-t interval
  (``stats.mean_ci``); the frugalrl / TRL ratios of seconds per step and peak RSS are ratios of
  those means with a 95 % bootstrap interval resampling rounds as pairs (``stats.ratio_ci``);
  the accuracy gap is the mean of the per-round differences with its t interval. One round
  gives no interval (null bounds in summary.json).
* TRL's settings on the page are read back from the ``GRPOConfig`` each TRL run trained with
  (``trl_settings``, after ``GRPOTrainer`` was built), not from the run config.

What the above says is ``bench.trl=same``: TRL reproduces frugalrl's algorithm, so the ratios
measure implementations. ``bench.trl=defaults`` measures recipes, what a user of either gets out
of the box: frugalrl runs its run config as it is (e.g. ``--config configs/smollm2-arithmetic.yaml``:
RLOO, its learning rate and schedule), and TRL runs ``GRPOConfig``'s defaults except for the
budget, which both sides share: G (``num_generations``), completions per rollout batch
(``generation_batch_size`` = P x G), the token limit (``max_completion_length``), the rollout
batches, and float32 (TRL's bf16 trains ~19x slower on a CPU without AMX). TRL then takes an
optimizer step every ``per_device_train_batch_size`` (8) completions, so its ``max_steps`` is
the rollout batches x the steps per batch, and its seconds per step are per rollout batch.
Either way the run config's ``max_wall_s`` is set to 0 (equal samples on both sides).

``bench.eval_every`` > 0 reads the held-out accuracy every that many rollout batches on both
sides (TRL's from a callback, its time left out; frugalrl's in metrics.jsonl), and the page
gives each side's time to target: the training seconds at which its curve first reaches
``bench.target_frac`` x TRL's mean final accuracy (read between readings, ``stats.crossing``),
and frugalrl's over TRL's (``time_to_target_ratio_ours_vs_trl``, paired bootstrap interval),
with the curves in peer[-LABEL]-curves.png. ``bench.label`` writes peer-LABEL.md and keys
``LABEL_<key>`` with "ours_" dropped (``summary_key``: ``real_time_to_target_ratio_vs_trl``,
``real_peak_rss_ratio_vs_trl``). ``bench.resume`` reuses the run directories that hold a
finished run of the same config (and for TRL the same ``GRPOConfig``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from importlib.metadata import version
from pathlib import Path

import torch
from rich.console import Console

from frugalrl import checkpoint
from frugalrl.bench.options import PeerOptions
from frugalrl.bench.report import publish, run_child, table
from frugalrl.bench.stats import Estimate, crossing, mean_ci, ratio_ci
from frugalrl.bench.train import RunRecord, eval_curve
from frugalrl.bench.train import _plot as plot_curves
from frugalrl.config import Config, load_config, save_config
from frugalrl.data import Task, data_seed
from frugalrl.evaluation import evaluate, score
from frugalrl.models import cpu_threads, load_policy, policy_device, resolve_model_path
from frugalrl.recovery import read_metrics
from frugalrl.trainer import load_inputs, set_seed, train

# frugalrl's grpo preset, without evaluation, checkpoints or a time limit: the run is bench.steps steps.
# One torch thread: with more threads than free cores (a shared machine), OpenMP's barriers stall on
# descheduled threads; measured on 2 shared cores, TRL's generate call took 18-25 s instead of 0.25 s
# on some steps at 2 threads.
TRAIN_DEFAULTS = ["algo.estimator=grpo", "algo.loss_agg=seq-mean-token-mean", "max_wall_s=0", "eval_every=0",
                  "save_every=0", "threads=1", "output_dir=runs/bench-peer"]
SIDES = {"frugalrl": "frugalrl", "trl": "TRL GRPOTrainer"}
# frugalrl's estimator -> TRL's scale_rewards (both take the group mean as baseline)
SCALE_REWARDS = {"grpo": "group", "dr_grpo": "none"}
# frugalrl's algo.loss_agg -> TRL's loss_type (frugalrl normalises over the whole rollout batch, as these do)
LOSS_TYPES = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "seq-mean-token-sum-norm": "dr_grpo"}
# options TRL's GRPOTrainer has no counterpart of here, with the value both sides then share
SAME_AS_TRL = {"algo.kl_coef": 0.0, "algo.entropy_coef": 0.0, "train.ppo_epochs": 1, "train.mini_batches": 1,
               "train.filter_threshold": 0.0, "lora.r": 0, "data.sticky_steps": 1, "rollout.backend": "hf"}
# keyword arguments TRL gives reward functions besides the dataset's columns
_TRL_REWARD_ARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric")
# the GRPOConfig fields the page shows, read back from each TRL run (``trl_settings``)
TRL_SHOWN = ("loss_type", "scale_rewards", "beta", "num_iterations", "epsilon", "num_generations",
             "generation_batch_size", "steps_per_generation", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_completion_length", "temperature", "top_p", "top_k", "learning_rate",
             "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "use_vllm", "bf16", "fp16",
             "gradient_checkpointing", "max_steps", "seed")


def trl_loss(cfg: Config) -> tuple[str, str]:
    """TRL's ``(loss_type, scale_rewards)`` for the run config; a ValueError lists what TRL's
    GRPOTrainer cannot reproduce (and what to set instead)."""
    wrong = [f"{key}={value!r} (set {want!r})" for key, want in SAME_AS_TRL.items()
             if (value := functools.reduce(getattr, key.split("."), cfg)) != want]
    if cfg.algo.estimator not in SCALE_REWARDS:
        wrong.append(f"algo.estimator={cfg.algo.estimator} (set one of {', '.join(SCALE_REWARDS)})")
    if cfg.algo.loss_agg not in LOSS_TYPES:
        wrong.append(f"algo.loss_agg={cfg.algo.loss_agg} (set one of {', '.join(LOSS_TYPES)})")
    batch = cfg.rollout.batch_prompts * cfg.rollout.group_size
    if batch % min(cfg.train.micro_batch, batch):
        wrong.append(f"train.micro_batch={cfg.train.micro_batch} (set a divisor of the {batch} completions per "
                     "step: TRL accumulates whole micro-batches)")
    if wrong:
        raise ValueError("bench peer trains the same algorithm on both sides, and TRL's GRPOTrainer has no "
                         "equivalent of " + "; ".join(wrong))
    return LOSS_TYPES[cfg.algo.loss_agg], SCALE_REWARDS[cfg.algo.estimator]


def trl_settings(args) -> dict:
    """The ``TRL_SHOWN`` fields of TRL's GRPOConfig ``args`` as JSON values (an enum as its value)."""
    values = {key: getattr(args, key) for key in TRL_SHOWN}
    return {key: v.value if isinstance(v, Enum) else v for key, v in values.items()}


def trl_settings_line(settings: dict) -> str:
    """The page's list of TRL's settings (``trl_settings``), the seed left out: it changes per round."""
    return ", ".join(f"`{key}={value!r}`" for key, value in settings.items() if key != "seed")


@dataclass
class Record:
    """What a run reports: ``step_end_s``, the perf_counter time (s) at the end of each step;
    ``reward_mean``, each step's mean sampled reward; ``completions``, the completions sampled;
    ``trl_settings``, the GRPOConfig a TRL run trained with (``trl_settings``; empty for frugalrl);
    ``curve``, the run's held-out accuracy readings when the run config has ``eval_every`` > 0:
    (training seconds, completions, accuracy), as frugalrl's metrics.jsonl has them (before the
    first step and every ``eval_every`` rollout batches; evaluation time left out);
    ``steps_per_batch``, optimizer steps (and ``step_end_s`` entries) per rollout batch: 1 but
    for TRL's defaults, which step every ``per_device_train_batch_size`` completions."""

    step_end_s: list[float] = field(default_factory=list)
    reward_mean: list[float] = field(default_factory=list)
    completions: int = 0
    trl_settings: dict = field(default_factory=dict)
    curve: list[tuple[float, int, float]] = field(default_factory=list)
    steps_per_batch: int = 1

    def sampled(self, rewards: torch.Tensor) -> None:
        self.reward_mean.append(rewards.mean().item())
        self.completions += len(rewards)


def _train_frugalrl(cfg: Config, console: Console) -> Record:
    record = Record()

    def on_step(step, model, rows, rollout, rewards):
        record.sampled(rewards)
        record.step_end_s.append(time.perf_counter())

    train(cfg, console, on_step=on_step)  # writes output_dir/model
    if cfg.eval_every:
        record.curve = eval_curve(read_metrics(Path(cfg.output_dir) / "metrics.jsonl"))
    return record


def _trl_args(cfg: Config, trl: str = "same"):
    """TRL's GRPOConfig for the run config (see the protocol): ``trl`` "same" reproduces frugalrl's
    algorithm, "defaults" keeps GRPOConfig's defaults but for the budget."""
    from trl import GRPOConfig

    ro, tr = cfg.rollout, cfg.train
    batch = ro.batch_prompts * ro.group_size
    quiet = dict(eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True)
    # the budget: model precision (bf16 is ~19x slower than fp32 on a CPU without AMX), device,
    # completions per rollout batch and per prompt, their token limit, the rollout batches
    budget = dict(output_dir=cfg.output_dir, seed=cfg.seed, generation_batch_size=batch,
                  num_generations=ro.group_size, max_completion_length=ro.max_new_tokens, bf16=False, fp16=False,
                  use_cpu=policy_device(cfg) == "cpu", **quiet)
    if trl == "defaults":
        args = GRPOConfig(**budget)
        # one optimizer step per per_device_train_batch_size completions: max_steps counts those
        args.max_steps = cfg.max_steps * args.steps_per_generation // args.gradient_accumulation_steps
        return args
    loss_type, scale_rewards = trl_loss(cfg)
    micro = min(tr.micro_batch, batch)
    return GRPOConfig(
        **budget, max_steps=cfg.max_steps,
        # per_device_train_batch_size counts completions; one generation batch = one optimizer step
        per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        temperature=ro.temperature, top_p=ro.top_p, top_k=0, use_vllm=False,
        learning_rate=tr.lr, warmup_steps=tr.warmup_steps,
        lr_scheduler_type="cosine" if tr.lr_schedule == "cosine" else "constant_with_warmup",
        weight_decay=tr.weight_decay, max_grad_norm=tr.max_grad_norm,
        beta=0.0, num_iterations=1, loss_type=loss_type, scale_rewards=scale_rewards,
        gradient_checkpointing=cfg.model.gradient_checkpointing)


def _train_trl(cfg: Config, console: Console, trl: str = "same") -> Record:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    args = _trl_args(cfg, trl)
    set_seed(cfg.seed)
    task, model, tokenizer, _ = load_inputs(cfg, console)
    record = Record(steps_per_batch=args.steps_per_generation // args.gradient_accumulation_steps)
    every = cfg.eval_every * record.steps_per_batch  # accuracy every eval_every rollout batches

    def reward(prompts, completions, **kwargs):
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_REWARD_ARGS}
        rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}} for i, p in enumerate(prompts)]
        rewards = score(task.reward_fn, rows, completions)
        record.sampled(rewards)
        return rewards.tolist()

    clock = {"start": 0.0, "eval": 0.0}  # when training began; seconds spent evaluating since

    def read_accuracy(now: float) -> None:
        accuracy = evaluate(trainer.model, tokenizer, task.eval_rows, task.reward_fn,
                            max_new_tokens=cfg.rollout.max_new_tokens)["accuracy"]
        record.curve.append((now - clock["start"] - clock["eval"], record.completions, accuracy))
        clock["eval"] += time.perf_counter() - now

    class StepEnd(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["start"] = time.perf_counter()
            if cfg.eval_every:
                read_accuracy(clock["start"])

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            record.step_end_s.append(now)
            if every and (state.global_step % every == 0 or state.global_step == args.max_steps):
                read_accuracy(now)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(task.train_rows),
                          processing_class=tokenizer, callbacks=[StepEnd()])
    record.trl_settings = trl_settings(trainer.args)
    trainer.train()
    checkpoint.save_model(Path(cfg.output_dir) / "model", trainer.model, tokenizer)
    return record


@dataclass
class Run:
    """One finished run, as the bench reads it: ``seed``, the run config's seed it trained with;
    ``trl_settings``, its Record's (TRL runs only); ``curve``, its Record's accuracy readings."""

    seed: int
    s_per_step: float
    peak_rss_mb: float
    completions: int
    accuracy: float
    reward_first: float
    reward_last: float
    trl_settings: dict
    curve: list[tuple[float, int, float]]


def _finished(run_dir: Path, cfg: Config, side: str, trl: str) -> bool:
    """Whether ``run_dir`` holds a finished run of ``side`` with exactly ``cfg`` (``bench.resume``);
    a TRL run's also with the GRPOConfig that this bench builds now."""
    result, config = run_dir / "peer-result.json", run_dir / "peer-config.yaml"
    if not (result.is_file() and (run_dir / "peer.log.peak_mb").is_file() and config.is_file()
            and load_config(config) == cfg):
        return False
    settings = json.loads(result.read_text())["trl_settings"]
    return side != "trl" or settings == json.loads(json.dumps(trl_settings(_trl_args(cfg, trl))))


def _run(side: str, cfg: Config, run_dir: Path, warmup: int, task: Task, trl: str = "same",
         resume: bool = False) -> Run:
    """Train ``side`` in a process of its own into ``run_dir`` (or, with ``resume``, reuse the
    finished run there), then evaluate its final model."""
    cfg = cfg.model_copy(update={"output_dir": str(run_dir)})
    config_path, result, log = run_dir / "peer-config.yaml", run_dir / "peer-result.json", run_dir / "peer.log"
    if resume and _finished(run_dir, cfg, side, trl):
        rss = float(log.with_name(log.name + ".peak_mb").read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing of an earlier bench run mixes in
        run_dir.mkdir(parents=True)
        save_config(cfg, config_path)
        _, rss = run_child("frugalrl.bench.peer", [side, str(config_path), str(result), trl], log)
    record = Record(**json.loads(result.read_text()))
    t = record.step_end_s[record.steps_per_batch - 1::record.steps_per_batch]  # at the end of each rollout batch
    if len(t) != cfg.max_steps:
        raise RuntimeError(f"the {side} run in {run_dir} made {len(t)} steps instead of {cfg.max_steps}")
    model_cfg = cfg.model.model_copy(update={"name_or_path": str(run_dir / "model")})
    model, tokenizer = load_policy(cfg.model_copy(update={"model": model_cfg}))
    accuracy = evaluate(model, tokenizer, task.eval_rows, task.reward_fn,
                        max_new_tokens=cfg.rollout.max_new_tokens)["accuracy"]
    return Run(cfg.seed, (t[-1] - t[warmup - 1]) / (len(t) - warmup), rss, record.completions, accuracy,
               record.reward_mean[0], record.reward_mean[-1], record.trl_settings, [tuple(c) for c in record.curve])


@dataclass
class SideStats:
    """A side's runs, one per round."""

    runs: list[Run]

    def values(self, name: str) -> list[float]:
        return [getattr(r, name) for r in self.runs]

    def estimate(self, name: str) -> Estimate:
        """The mean over rounds with its 95 % interval."""
        return mean_ci(self.values(name))


def _plot(estimates: list[tuple[str, dict[str, Estimate]]], start: float, path: Path, title: str) -> None:
    """One bar chart per figure (``estimates``: (y label, side -> Estimate)), error bars the 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(estimates), figsize=(3 * len(estimates), 3.4))
    for ax, (ylabel, by_side) in zip(axes, estimates):
        values = [e.value for e in by_side.values()]
        errors = [[e.value - e.low for e in by_side.values()], [e.high - e.value for e in by_side.values()]]
        ax.bar([SIDES[side] for side in by_side], values, yerr=errors, capsize=4, color=["tab:blue", "tab:orange"])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[-1].axhline(start, ls="--", color="grey", label="start")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_key(name: str, label: str) -> str:
    """A figure's summary.json key: ``name`` (e.g. ``step_time_ratio_ours_vs_trl``) on the default
    page; with ``bench.label``, ``LABEL_`` and ``name`` without "ours_" (``real_step_time_ratio_vs_trl``)."""
    return f"{label}_{name.replace('_ours_vs_', '_vs_')}" if label else name


def _time_to_target(ours: SideStats, trl: SideStats, frac: float) -> tuple[float, Estimate | None, str]:
    """(target, frugalrl's mean training seconds to it / TRL's with a paired interval, or None and
    why): target = ``frac`` x TRL's mean final accuracy, each run's time read on its curve
    (``stats.crossing``)."""
    target = frac * statistics.fmean(r.curve[-1][2] for r in trl.runs)
    times = [[crossing(r.curve, target, 0) for r in side.runs] for side in (ours, trl)]
    missed = [f"{SIDES[side]} in {sum(t is None for t in ts)} of {len(ts)} rounds"
              for side, ts in zip(SIDES, times) if None in ts]
    if missed:
        return target, None, "target not reached by " + " and ".join(missed)
    if not any(times[1]):
        return target, None, "TRL was at the target before training in every round"
    return target, ratio_ci(*times, paired=True), ""


def run(cfg: Config, opts: PeerOptions, command: str, console: Console) -> dict:
    """Alternate frugalrl and TRL runs; write peer[-LABEL].md and its plots; merge the ours/TRL
    ratios of seconds per step, peak RSS and (with ``bench.eval_every``) time to target with
    their intervals, and each side's figures, into summary.json and return them."""
    if importlib.util.find_spec("trl") is None:
        raise ValueError("bench peer needs TRL: pip install 'frugalrl[bench]'")
    if opts.steps <= opts.warmup:
        raise ValueError(f"bench.steps={opts.steps} leaves no step after bench.warmup={opts.warmup}; raise it")
    # equal samples on both sides: a run config's time limit would cut a run short
    cfg = cfg.model_copy(update={"max_steps": opts.steps, "max_wall_s": 0.0, "eval_every": opts.eval_every})
    if opts.trl == "same":
        trl_loss(cfg)  # refuses what TRL cannot run, before any work
    set_seed(cfg.seed)
    task, model, tokenizer, _ = load_inputs(cfg, console)  # builds the embedded model when it is not cached
    start = evaluate(model, tokenizer, task.eval_rows, task.reward_fn,
                     max_new_tokens=cfg.rollout.max_new_tokens)["accuracy"]
    params = sum(p.numel() for p in model.parameters())
    del model
    # both sides load this very directory; every round trains on the split that `start` and each
    # run's accuracy are read on, whatever its seed
    cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"name_or_path": str(resolve_model_path(cfg).resolve())}),
        "data": cfg.data.model_copy(update={"seed": data_seed(cfg)})})
    runs: dict[str, list[Run]] = {side: [] for side in SIDES}
    for round_ in range(opts.rounds):
        for side, name in SIDES.items():
            r = _run(side, cfg.model_copy(update={"seed": cfg.seed + round_}),
                     Path(cfg.output_dir) / f"{side}-{round_ + 1}", opts.warmup, task, opts.trl, opts.resume)
            runs[side].append(r)
            console.print(f"peer bench, round {round_ + 1}/{opts.rounds} (seed {r.seed}): {name}: "
                          f"{r.s_per_step:.3f} s/step, peak RSS {r.peak_rss_mb:.0f} MB, "
                          f"accuracy {start:.3f} -> {r.accuracy:.3f}")
    stats = {side: SideStats(rs) for side, rs in runs.items()}
    ours, trl = stats["frugalrl"], stats["trl"]
    shown = {json.dumps({k: v for k, v in r.trl_settings.items() if k != "seed"}, sort_keys=True) for r in trl.runs}
    if len(shown) > 1:
        raise RuntimeError(f"TRL's GRPOConfig differed between rounds beyond the seed: {sorted(shown)}")
    step_ratio, rss_ratio = (ratio_ci(ours.values(name), trl.values(name), paired=True)
                             for name in ("s_per_step", "peak_rss_mb"))
    gap = mean_ci([a - b for a, b in zip(ours.values("accuracy"), trl.values("accuracy"))])
    figures = {name: {side: s.estimate(name) for side, s in stats.items()}
               for name in ("s_per_step", "peak_rss_mb", "accuracy")}
    summary = {**step_ratio.as_summary("step_time_ratio_ours_vs_trl"),
               **rss_ratio.as_summary("peak_rss_ratio_ours_vs_trl"),
               **{key: value for name, by_side in figures.items()
                  for side, short in (("frugalrl", "ours"), ("trl", "trl"))
                  for key, value in by_side[side].as_summary(f"peer_{short}_{name}").items()},
               **gap.as_summary("peer_accuracy_gap_ours_minus_trl"),
               "peer_accuracy_start": start, "peer_completions": runs["frugalrl"][-1].completions,
               "peer_rounds": opts.rounds}
    page = opts.page("peer")
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    ro, tr = cfg.rollout, cfg.train
    model_name = f"{params / 1e6:.2f} M-parameter model"
    title = f"{model_name}, {ro.batch_prompts} prompts x G={ro.group_size}, {opts.steps} steps, {opts.rounds} rounds"
    to_target = ""
    if opts.eval_every:
        target, time_ratio, why = _time_to_target(ours, trl, opts.target_frac)
        key = "time_to_target_ratio_ours_vs_trl"
        summary.update(time_ratio.as_summary(key) if time_ratio else dict.fromkeys([key, f"{key}_ci_low",
                                                                                      f"{key}_ci_high"]))
        to_target = (f" Training seconds to {target:.3f} held-out accuracy ({opts.target_frac:g} x TRL's mean final "
                     f"accuracy, read between readings every {opts.eval_every} steps), frugalrl / TRL: "
                     f"**{time_ratio if time_ratio else f'n/a: {why}'}**.")
        plot_curves({SIDES[side]: [RunRecord(SIDES[side], r.seed, r.curve, r.curve[-1][0], 0.0, r.peak_rss_mb, 0, 0, 0)
                                   for r in s.runs] for side, s in stats.items()},
                    target, results_dir / f"{page}-curves.png", title)
    summary = {summary_key(key, opts.label): value for key, value in summary.items()}
    _plot([("seconds per step", figures["s_per_step"]), ("peak RSS (MB)", figures["peak_rss_mb"]),
           ("held-out accuracy after", figures["accuracy"])], start, results_dir / f"{page}.png", title)
    rows = [[SIDES[side], str(figures["s_per_step"][side]), str(figures["peak_rss_mb"][side]),
             str(s.runs[-1].completions), f"{start:.3f}", str(figures["accuracy"][side]),
             f"{statistics.fmean(s.values('reward_first')):.3f} -> {statistics.fmean(s.values('reward_last')):.3f}"]
            for side, s in stats.items()]
    per_round = [[str(i + 1), str(a.seed), str(b.trl_settings["seed"]), f"{a.s_per_step:.3f}", f"{b.s_per_step:.3f}",
                  f"{a.peak_rss_mb:.0f}", f"{b.peak_rss_mb:.0f}", f"{a.accuracy:.3f}", f"{b.accuracy:.3f}"]
                 for i, (a, b) in enumerate(zip(ours.runs, trl.runs))]
    if opts.trl == "same":
        what = (f"frugalrl's `{cfg.algo.estimator}` ({cfg.algo.loss_agg}) against TRL {version('trl')}'s "
                "`GRPOTrainer` set to the same algorithm")
        targets = "(target <= 0.5)", "(target <= 0.7)"
    else:
        what = (f"frugalrl's run config as it is (`{cfg.algo.estimator}`) against TRL {version('trl')}'s "
                "`GRPOTrainer` with `GRPOConfig`'s defaults but for the budget (G, completions per step, token "
                "limit, rollout batches, float32)")
        targets = "", "(target <= 0.5)"
        to_target += " (target <= 0.2)" if to_target else ""
    sections = [
        f"{what}, on the same {model_name} and task; frugalrl's run config: {ro.batch_prompts} prompts x "
        f"G={ro.group_size} = {ro.batch_prompts * ro.group_size} completions per step of at most "
        f"{ro.max_new_tokens} tokens, temperature {ro.temperature:g}, top-p {ro.top_p:g}, lr {tr.lr:g} "
        f"({tr.lr_schedule}, {tr.warmup_steps} warm-up steps), {tr.ppo_epochs * tr.mini_batches} optimizer "
        f"step(s) per batch, {cfg.model.dtype}, {opts.steps} steps (rollout batches) per run. "
        f"{opts.rounds} rounds, each a frugalrl run then a TRL run, each its own process, both with seed "
        f"{cfg.seed} + round - 1 and the same data split (data.seed={cfg.data.seed}); torch threads: "
        f"{torch.get_num_threads()}. Seconds per step (rollout batch) over steps "
        f"{opts.warmup + 1}-{opts.steps} (the first {opts.warmup} left out); peak RSS of the whole process; "
        f"accuracy: greedy, {len(task.eval_rows)} held-out prompts. Each figure: mean over rounds [95 % "
        "interval]. Protocol: `src/frugalrl/bench/peer.py`.",
        table(["side", "s/step", "peak RSS MB", "completions", "accuracy before", "accuracy after",
               "sampled reward, first -> last step"], rows),
        f"frugalrl / TRL, ratio of the means [95 % bootstrap interval over rounds, paired]: seconds per step "
        f"**{step_ratio}** {targets[0]}, peak RSS **{rss_ratio}** {targets[1]}. Held-out accuracy after, "
        f"frugalrl - TRL: {gap} (mean of the per-round differences [95 % t interval]).{to_target}",
        "TRL settings, read back from the `GRPOConfig` its runs trained with: "
        f"{trl_settings_line(trl.runs[0].trl_settings)}; its seed per round below. frugalrl: micro-batches of "
        f"{tr.micro_batch}; samples with advantage 0 (groups of equal rewards) skip their forward pass.",
        "Per round:",
        table(["round", "seed: frugalrl", "seed: TRL", "s/step: frugalrl", "s/step: TRL", "peak RSS MB: frugalrl",
               "peak RSS MB: TRL", "accuracy: frugalrl", "accuracy: TRL"], per_round),
    ]
    return publish(results_dir, page, "Peer bench: frugalrl vs TRL's GRPOTrainer", command, sections, summary,
                   console)


def _child(side: str, config_path: str, result_path: str, trl: str = "same") -> None:
    """One run of ``side`` as the config file says (TRL's settings as ``trl`` says); its Record as
    JSON in ``result_path``."""
    cfg = load_config(config_path)
    with cpu_threads(cfg.threads):
        record = _train_frugalrl(cfg, Console()) if side == "frugalrl" else _train_trl(cfg, Console(), trl)
    Path(result_path).write_text(json.dumps(asdict(record)))


if __name__ == "__main__":
    _child(*sys.argv[1:])
