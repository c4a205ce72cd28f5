"""Run configuration: a tree of dataclasses, every option made with `opt()` (default, help line, choices, bounds).

A config is built from the defaults, then a YAML file, then `key=value` overrides (`algo.estimator=kae max_steps=200`).
pydantic checks each value as it is set (type, choices, bounds: YAML's leniency at the leaves, so that `1e-4` is a
number and `yes` a boolean); then the rules between options (`_check_consistency`) run. The machinery below the schema
is generic over any such tree (the benches' `bench.*` options use it too); every problem raises `ConfigError` (a
ValueError) saying what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError


def opt(default, help: str, choices: tuple | None = None, *, min=None, max=None, gt=None, lt=None, **kw):
    """A config option: its default, one help line, its allowed values; `min`/`max` are inclusive bounds and `gt`/`lt`
    exclusive ones (pydantic's ge/le/gt/lt), checked whenever a config is loaded."""
    bounds = {"min": min, "max": max, "gt": gt, "lt": lt}
    meta = {"help": help, **({"choices": tuple(choices)} if choices is not None else {}),
            **{k: v for k, v in bounds.items() if v is not None}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = opt("", "local Hugging Face model directory; empty = the embedded tiny model, warmed up by SFT "
                            "and cached under cache_dir")
    dtype: str = opt("float32", "weights dtype (use float32 on CPU: bf16 is ~19x slower there)",
                     choices=("float32", "bfloat16", "float16"))
    device: str = opt("auto", "where the policy lives and trains: auto = the GPU when torch sees one (cuda), else the "
                      "CPU", choices=("auto", "cpu", "cuda"))
    cache_dir: str = opt(".cache/frugalrl", "where the embedded model and its SFT checkpoint are cached")
    sft_steps: int = opt(3000, "embedded model: the most supervised warm-up steps on worked solutions (a cap: the "
                         "warm-up stops earlier once it reaches model.sft_target_accuracy)", min=0)
    sft_target_accuracy: float = opt(0.3, "embedded model: the warm-up stops at the first check whose greedy accuracy "
                                     "on training problems held out of the warm-up reaches this (0 = always train "
                                     "model.sft_steps)", min=0, max=1)
    sft_eval_every: int = opt(50, "embedded model: check the warm-up's accuracy every N steps", min=1)
    sft_eval_size: int = opt(256, "embedded model: training problems held out of the warm-up to check its accuracy (at "
                             "most a tenth of the training rows)", min=1)
    sft_lr: float = opt(2e-3, "embedded model: supervised warm-up learning rate", gt=0)
    sft_batch: int = opt(64, "embedded model: supervised warm-up batch size", min=1)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass instead of keeping them: "
                                       "less memory, about a third more compute per training step")


@dataclass
class LoraConfig:
    r: int = opt(0, "LoRA rank (0 = off: train every weight); the reference policy is then the model with its adapter "
                 "disabled, no second copy", min=0)
    alpha: float = opt(16.0, "LoRA scale: the adapter's output is multiplied by alpha / r", gt=0)
    dropout: float = opt(0.0, "dropout on the adapter's input, in the training passes only (sampling and the old and "
                         "reference log-probs run without dropout)", min=0, lt=1)
    target_modules: list[str] = opt(["all-linear"], "layers that get an adapter, by name (q_proj, v_proj, ...); "
                                    "[all-linear] = every linear layer but the output head")
    save: str = opt("merged", "what model/ holds: merged = the full model with the adapter folded in; adapter = the "
                    "adapter alone, plus the path of its base model", choices=("merged", "adapter"))


@dataclass
class DataConfig:
    source: str = opt("arithmetic", "where prompts come from: the built-in arithmetic task, a data file (jsonl: any "
                      "format data.train_path takes) or reasoning-gym",
                      choices=("arithmetic", "jsonl", "reasoning_gym"))
    train_path: str = opt("", "data file of prompt/answer rows: .jsonl, .csv, .parquet, or a directory written by "
                          "datasets' save_to_disk; setting it replaces the built-in task")
    eval_path: str = opt("", "data file for evaluation (same formats); empty = a held-out split")
    prompt_field: str = opt("prompt", "data files: the column holding the prompt, a string or a chat message list "
                            "(then the last user message is the prompt; a 'messages' column is used when this one is "
                            "missing)")
    answer_field: str = opt("answer", "data files: the column holding the reference answer (reward functions receive "
                            "it as answer=)")
    max_prompt_tokens: int = opt(0, "drop prompts longer than this many tokens, chat template included, and count them "
                                 "(0 = keep all)", min=0)
    chat_template: str = opt("auto", "wrap each prompt in the tokenizer's chat template as a user message: auto = when "
                             "the tokenizer has one", choices=("auto", "on", "off"))
    system_prompt: str = opt("", "system message put before each prompt when the chat template is used")
    difficulty: int = opt(2, "built-in task: number of operations after the first sum (1..3)", min=1, max=3)
    train_size: int = opt(20000, "built-in task: number of training problems", min=1)
    eval_size: int = opt(256, "held-out problems for evaluation (never trained on)", min=1)
    seed: int = opt(-1, "seed of the train/eval split (built-in task, reasoning-gym, a data file's held-out rows); -1 "
                    "= the run's seed. Fix it to vary a run's seed without changing its data", min=-1)
    sticky_steps: int = opt(1, "reuse each prompt mini-batch for this many consecutive steps (KAE needs >1: else a "
                            "prompt's past rewards rarely fall in its kernel window)", min=1)
    task: str | list[str] = opt("", "reasoning_gym: generator name (chain_sum), or a list [chain_sum, "
                                "basic_arithmetic] to mix several")
    task_weights: list[float] = opt([], "reasoning_gym: sampling weight of each data.task (empty = equal)")
    task_config: dict[str, Any] = opt({}, "reasoning_gym: generator options, e.g. {min_terms: 2, max_digits: 2}; with "
                                      "several tasks one mapping per task: {chain_sum: {...}}")
    size: int = opt(0, "reasoning_gym: training items to generate (0 = data.train_size)", min=0)
    answer_extract: str = opt("answer_tags", "reasoning_gym: where a completion's answer is read: <answer>..</answer>, "
                              "\\boxed{..}, the last line, or after the last '#' (marker)",
                              choices=("answer_tags", "boxed", "last_line", "marker"))
    prompt_template: str = opt("", "prompt text: for data files {prompt} and the row's other columns (e.g. '{prompt} "
                               "Put the final answer in \\boxed{{}}.'); for reasoning_gym {question} and metadata "
                               "fields (e.g. '{expression} ='); empty = the prompt as is (reasoning_gym: the question "
                               "plus a line on the answer format)")
    partial_credit: bool = opt(False, "reasoning_gym: reward = the task's score as is (partial credit for near "
                               "misses); false = 1 only for full marks, else 0")


@dataclass
class RolloutConfig:
    batch_prompts: int = opt(64, "prompts per rollout batch (train.ppo_epochs x train.mini_batches optimizer steps per "
                             "batch, one by default)", min=1)
    group_size: int = opt(4, "completions per prompt, G", min=1)
    temperature: float = opt(0.7, "sampling temperature (rollouts; log-probs are taken at the same temperature); "
                             "algo.estimator=astar needs 1.0, the temperature V* is estimated at", gt=0)
    top_p: float = opt(1.0, "nucleus sampling mass", gt=0, max=1)
    max_new_tokens: int = opt(48, "longest completion, in tokens", min=1)
    backend: str = opt("hf", "what samples the training rollouts: hf = in this process (frugalrl's fast loop for "
                       "Llama/Qwen2, else Hugging Face generate); vllm = a vLLM engine on the GPU that gets the "
                       "policy's weights before each rollout", choices=("hf", "vllm"))
    vllm_gpu_memory: float = opt(0.3, "vllm: share of the GPU's memory for the engine's weights and KV cache",
                                 gt=0, max=1)
    vllm_sleep: bool = opt(True, "vllm: release the engine's GPU memory between rollouts (sleep mode), for the "
                           "training step")
    allocation: str = opt("uniform", "which prompts a step rolls out and how many completions each gets, always "
                          "batch_prompts x group_size in all: uniform = the sampler's batch, G each; skip = skip "
                          "prompts whose groups are predicted all-equal (GRESO), drawing more to fill the batch; "
                          "budget = choose prompts and counts from rollout.candidates to maximise the expected "
                          "learning signal (Knapsack RL); see README", choices=("uniform", "skip", "budget"))
    candidates: int = opt(0, "budget: prompts considered per step (0 = 2 x batch_prompts)", min=0)
    min_per_prompt: int = opt(2, "budget: fewest completions of a prompt that is rolled out", min=1)
    max_per_prompt: int = opt(8, "budget: most completions of one prompt", min=1)
    skip_floor: float = opt(0.1, "skip: the least chance that a prompt is rolled out when considered, however sure the "
                            "prediction (so that a skipped prompt is re-checked)", gt=0, max=1)
    passrate_prior: str = opt("population", "prior of a prompt's pass rate before its history: population = the run's "
                              "mean reward; vstar = A*-PO's stage-1 pass rate; cross_prompt = the pass rates of the "
                              "most similar prompts (the starting policy's hidden states)",
                              choices=("population", "vstar", "cross_prompt"))
    passrate_strength: float = opt(2.0, "weight of the prior in a pass-rate estimate, in samples", gt=0)
    passrate_visits: float = opt(2.0, "pass-rate estimate: a prompt's k-th most recent visit weighs exp(-k / this), in "
                                 "visits (not steps: a prompt recurs once an epoch)", gt=0)
    prior_neighbors: int = opt(32, "cross_prompt prior: similar prompts it averages", min=1)
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop groups whose rewards are all equal and roll out "
                                 "more prompts until batch_prompts groups differ (their generation is paid for)")
    dynamic_max_rounds: int = opt(4, "dynamic_sampling: most rollout rounds per step (then the batch is filled with "
                                  "all-equal groups)", min=1)


@dataclass
class AlgoConfig:
    estimator: str = opt("rloo", "advantage estimator: each sample's reward minus a baseline (from its group, the "
                         "batch, its prompt's history (kae) or V* (astar))",
                         choices=("grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "kae", "astar"))
    loss: str = opt("auto", "policy loss: pg = policy gradient with the PPO clip; astar = A*-PO's regression on log(pi "
                    "/ pi_ref); ppo = pg with a learned critic whose per-token GAE advantages replace the estimator's "
                    "(configs/ppo.yaml); auto = astar under algo.estimator=astar, else pg",
                    choices=("auto", "pg", "astar", "ppo"))
    loss_agg: str = opt("seq-mean-token-sum", "how token losses become one number (seq-mean-token-sum-norm: token sums "
                        "/ rollout.max_new_tokens, Dr. GRPO's constant)",
                        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
    clip_low: float = opt(0.2, "PPO clip: lower bound 1-clip_low on the ratio", min=0)
    clip_high: float = opt(0.2, "PPO clip: upper bound 1+clip_high on the ratio", min=0)
    kae_kernel: str = opt("triangular", "KAE kernel", choices=("triangular", "exponential"))
    kae_bandwidth: float = opt(10.0, "KAE bandwidth h", gt=0)
    kae_bandwidth_mode: str = opt("window", "KAE distance: window (i-s)/h, relative (i-s)/(i*h), auto",
                                  choices=("window", "relative", "auto"))
    kae_auto_c: float = opt(1.0, "KAE auto bandwidth: h = kae_auto_c * N(x)^(-1/3)", gt=0)
    kae_scale: str = opt("none", "KAE: divide advantages by their batch std (unconfirmed in the paper)",
                         choices=("none", "batch"))
    reinforce_baseline: str = opt("loo", "REINFORCE baseline", choices=("loo", "none"))
    vstar_n: int = opt(8, "A*-PO stage 1: reference samples per training prompt (at temperature 1)", min=1)
    vstar_path: str = opt("", "A*-PO: V* cache file (JSON); empty = model.cache_dir/vstar-<hash of what it depends "
                          "on>.json")
    vstar_prompts: int = opt(0, "A*-PO: run stage 1 on, and train on, only the first N training prompts (stage 1 costs "
                             "vstar_n samples per prompt); 0 = all", min=0)
    vstar_drop_unsolved: bool = opt(False, "A*-PO: train only on prompts that some stage-1 sample solved (reward > 0)")
    astar_beta1: float = opt(0.5, "A*-PO: V* = beta1 * log mean exp(r / beta1) (0 = plain mean)", min=0)
    astar_beta2: float = opt(1e-3, "A*-PO: loss (beta2 * log(pi/pi_ref) - (r - V*))^2", gt=0)
    kl_coef: float = opt(0.0, "KL(pi || pi_ref) penalty in the loss (0 = off: no reference model is kept)", min=0)
    kl_estimator: str = opt("k3", "KL estimator per token: k1 = log ratio, k3 = low-variance, >= 0",
                            choices=("k1", "k3"))
    entropy_coef: float = opt(0.0, "entropy bonus: subtract this times the token entropy, aggregated like the loss "
                              "(algo.loss_agg), from the loss", min=0)
    gae_gamma: float = opt(1.0, "PPO: GAE discount over completion tokens", min=0, max=1)
    gae_lambda: float = opt(1.0, "PPO: GAE lambda (1 = Monte-Carlo returns minus values)", min=0, max=1)
    value_clip: float = opt(0.2, "PPO: the critic's prediction moves at most this far (reward units) per update in the "
                            "clipped value loss", gt=0)


@dataclass
class TrainConfig:
    lr: float = opt(2e-4, "AdamW learning rate (3e-4 collapses the embedded model; see README)", gt=0)
    warmup_steps: int = opt(10, "linear learning-rate warm-up, in optimizer steps (train.ppo_epochs x "
                            "train.mini_batches per rollout batch)", min=0)
    lr_schedule: str = opt("cosine", "learning rate after warm-up: constant, or cosine decay to 0 at the last "
                           "optimizer step (max_steps x train.ppo_epochs x train.mini_batches)",
                           choices=("constant", "cosine"))
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = opt(1.0, "gradient-norm clip (0 = off)", min=0)
    micro_batch: int = opt(16, "sequences per forward/backward pass (gradient accumulation; sets back-propagation's "
                           "memory)", min=1)
    filter_threshold: float = opt(0.0, "drop samples with |advantage| <= this before their forward pass (0 drops exact "
                                  "zeros only, and only where that leaves the update unchanged)", min=0)
    ppo_epochs: int = opt(1, "passes over each rollout batch (> 1 = off-policy updates with the PPO clip)", min=1)
    mini_batches: int = opt(1, "optimizer steps per pass over the rollout batch (> 1 = off-policy updates with the PPO "
                            "clip)", min=1)
    critic_lr: float = opt(1e-3, "PPO: AdamW learning rate of the critic (value head)", gt=0)
    max_bad_steps: int = opt(5, "a step whose loss or gradient is NaN/inf is skipped; stop with an error after this "
                             "many in a row", min=1)
    strategy: str = opt("ddp", "data parallelism under torchrun: ddp = every process holds the whole model, its "
                        "gradients and optimizer state; fsdp = torch's FSDP2 shards them over the processes (see "
                        "README, Scale-out)", choices=("ddp", "fsdp"))
    fsdp_reshard_after_forward: bool = opt(True, "fsdp: free each layer's gathered weights after its forward pass and "
                                           "gather them again for the backward (less memory, more traffic)")
    fsdp_cpu_offload: bool = opt(False, "fsdp on GPUs: keep the sharded weights, gradients and optimizer state in CPU "
                                 "memory and step the optimizer there (torch's CPUOffloadPolicy); no effect on the CPU")


@dataclass
class RewardConfig:
    funcs: list[str] = opt([], "reward functions, summed: math, format, arithmetic, module:function or "
                           "path/to/file.py:function (TRL signature); empty = the task's own reward")
    weights: list[float] = opt([], "weight of each of reward.funcs (empty = 1 each)")
    on_error: str = opt("raise", "a reward function that raises or times out: raise = stop with an error naming the "
                        "sample; zero = score it 0 and count it (reward_errors)", choices=("raise", "zero"))
    timeout_s: float = opt(0.0, "deadline per reward-function call, seconds (0 = none: called in this process); > 0 "
                           "calls the functions in a worker process, killed and restarted when a call runs past it",
                           min=0)


@dataclass
class EvalConfig:
    pass_k: int = opt(4, "k for pass@k (sampled at temperature eval.temperature); 0 = off", min=0)
    temperature: float = opt(1.0, "sampling temperature for pass@k", gt=0)
    log_examples: int = opt(4, "held-out prompts whose greedy completion, answer and reward go to the report_to "
                            "trackers as a table at each evaluation (0 = none)", min=0)


@dataclass
class Config:
    max_steps: int = opt(600, "training steps, one rollout batch each (and train.ppo_epochs x train.mini_batches "
                         "optimizer steps)", min=1)
    seed: int = opt(0, "random seed (python, numpy, torch, data)", min=-2**63, max=2**64 - 1)  # torch's range
    output_dir: str = opt("runs/latest", "run directory: config, metrics, plots, checkpoints, final model")
    resume: str = opt("", "run directory to continue from its newest complete checkpoint (what `frugalrl train "
                      "--resume DIR` sets; output_dir must be the same directory)")
    save_every: int = opt(0, "checkpoint every N steps and at the last step (0 = only the final model; SIGINT/SIGTERM "
                          "checkpoint anyway)", min=0)
    save_total_limit: int = opt(0, "keep only the newest N checkpoints (0 = keep all)", min=0)
    eval_every: int = opt(50, "evaluate every N steps (0 = off)", min=0)
    max_wall_s: float = opt(480.0, "stop after this many seconds of training, evaluation excluded (0 = no limit)",
                            min=0)
    threads: int = opt(0, "torch CPU threads (0 = torch's default)", min=0)
    log_every: int = opt(0, "when stdout is not a terminal (a log file), print one progress line every N steps (0 = "
                         "about 20 lines a run); a terminal shows a progress bar instead", min=0)
    report_to: str | list[str] = opt([], "experiment trackers that get every metrics row and, at each evaluation, a "
                                     "table of held-out completions: a list of tensorboard, wandb, mlflow, trackio, or "
                                     "one name (each: pip install 'frugalrl[NAME]'); [] or none = no tracker. Offline "
                                     "by default: see `frugalrl.tracking`")
    project: str = opt("frugalrl", "the trackers' project (W&B project, MLflow experiment, trackio project)")
    run_name: str = opt("", "the run's name in the trackers (empty = the name of output_dir)")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        _check_consistency(self)


# Estimators whose baseline comes from the prompt's own group: with one sample per prompt every advantage is 0
# (rloo refuses, grpo/dr_grpo would silently train nothing).
_GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
# How A*-PO stage 1 samples: the reference itself (the paper's setting), so V* is the value of pi_ref untempered.
# Stage 2 must sample the same way, or r - V* compares the rewards of one distribution with the value of another.
VSTAR_SAMPLING = {"temperature": 1.0, "top_p": 1.0}
# Values that an option takes no more, and what replaced them.
_RETIRED = {("algo.estimator", "gae"): "algo.estimator=gae is now algo.loss=ppo (PPO's critic and GAE are a loss, not "
            "an estimator): set algo.loss=ppo algo.estimator=reinforce algo.reinforce_baseline=none, as "
            "configs/ppo.yaml does"}


def _check_consistency(cfg: Config) -> None:
    """The rules between options (each option's own type and range are checked as it is set): ConfigError saying
    what to change."""
    ro, est = cfg.rollout, cfg.algo.estimator
    candidates = ro.candidates or 2 * ro.batch_prompts
    wrong = [k for k, v in VSTAR_SAMPLING.items() if getattr(ro, k) != v]
    rules = [
        (est in _GROUP_ESTIMATORS and ro.group_size < 2,
         f"algo.estimator={est} compares the completions of each prompt, so it needs rollout.group_size >= 2 "
         f"(got {ro.group_size}); raise it, or use algo.estimator=kae or reinforce, which work with one completion "
         "per prompt"),
        (ro.allocation == "budget" and ro.min_per_prompt > ro.max_per_prompt,
         f"rollout.min_per_prompt={ro.min_per_prompt} exceeds rollout.max_per_prompt={ro.max_per_prompt}; lower the "
         "first or raise the second"),
        (ro.allocation == "budget" and est in _GROUP_ESTIMATORS and ro.min_per_prompt < 2,
         f"algo.estimator={est} learns nothing from a prompt with one completion; set rollout.min_per_prompt >= 2"),
        (ro.allocation == "budget" and candidates * ro.max_per_prompt < ro.batch_prompts * ro.group_size,
         f"rollout.allocation=budget: {candidates} candidates x rollout.max_per_prompt={ro.max_per_prompt} cannot "
         f"spend the {ro.batch_prompts * ro.group_size} completions of a step; raise rollout.candidates or "
         "rollout.max_per_prompt"),
        (ro.dynamic_sampling and ro.allocation != "uniform",
         "rollout.dynamic_sampling replaces the allocation; it needs rollout.allocation=uniform "
         f"(got {ro.allocation})"),
        (ro.passrate_prior == "vstar" and est != "astar",
         "rollout.passrate_prior=vstar reads A*-PO's stage-1 samples, which only algo.estimator=astar makes; use "
         "population or cross_prompt"),
        (cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.funcs),
         f"reward.weights has {len(cfg.reward.weights)} entries for {len(cfg.reward.funcs)} reward.funcs; give one "
         "weight per function, or none (1 each)"),
        (est == "astar" and wrong,
         "algo.estimator=astar compares each reward with V*, the value of the reference sampled at "
         + " and ".join(f"{k} {v}" for k, v in VSTAR_SAMPLING.items()) + ", but "
         + " and ".join(f"rollout.{k}={getattr(ro, k)}" for k in wrong) + " samples another distribution; set "
         + " and ".join(f"rollout.{k}={VSTAR_SAMPLING[k]}" for k in wrong)),
        (cfg.resume and os.path.abspath(cfg.resume) != os.path.abspath(cfg.output_dir),
         f"resume={cfg.resume} continues that run in place, but output_dir={cfg.output_dir}; drop output_dir "
         "(`frugalrl train --resume DIR` sets it) or make them equal"),
    ]
    for broken, message in rules:
        if broken:
            raise ConfigError(message)
    from frugalrl import tracking  # here: tracking builds on this module

    try:
        tracking.backends(cfg.report_to)
    except ValueError as e:  # an unknown or uninstalled tracker: say so before any work
        raise ConfigError(str(e)) from None


# --- Machinery, generic over any tree of dataclasses made with `opt()` (a dataclass-typed field is a *section*, every
# other field an *option*): adding a field to the schema above needs no change below. pydantic validates the values.

class ConfigError(ValueError):
    """A configuration problem, with a short message that says what to change."""


_NULL_WORDS = ("null", "none", "~", "")
_UNION = (Union, types.UnionType)
_HINTS = {int: " (a whole number)", float: " (a number such as 0.5 or 1e-4)", bool: " (true/false, yes/no, 1/0)",
          list: " (YAML list such as [a, b])", dict: " (YAML mapping such as {a: 1})"}
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_hints = functools.cache(typing.get_type_hints)


@dataclass(frozen=True)
class FieldSpec:
    """One option of a config tree, flattened: `key` is dotted ("algo.estimator")."""

    key: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None

    @property
    def section(self) -> str:
        """The dotted section holding the option ("" for top-level options)."""
        return self.key.rpartition(".")[0]

    @property
    def type_name(self) -> str:
        return _type_name(self.type)

    def range_text(self) -> str:
        """The numeric bounds in words (">= 1", "> 0 and <= 1"), or "" when unbounded."""
        bounds = ((">", self.gt), (">=", self.min), ("<", self.lt), ("<=", self.max))
        return " and ".join(f"{op} {_fmt(bound)}" for op, bound in bounds if bound is not None)

    def describe(self) -> str:
        """One help line: `key (type, default X) help [choices: a|b] [range: >= 1]`."""
        choices = f" [choices: {'|'.join(map(_fmt, self.choices))}]" if self.choices else ""
        bounds = f" [range: {self.range_text()}]" if self.range_text() else ""
        return f"{self.key} ({self.type_name}, default {_fmt(self.default)}) {self.help}{choices}{bounds}"

    @functools.cached_property
    def validator(self) -> TypeAdapter:
        """pydantic's validator of the option: its type (the Literal of its choices, if any) and its bounds."""
        bounds = {k: v for k, v in dict(ge=self.min, le=self.max, gt=self.gt, lt=self.lt).items() if v is not None}
        return TypeAdapter(Literal[self.choices] if self.choices else _lenient(self.type, bounds))


@functools.cache
def _specs(cls) -> dict[str, FieldSpec]:
    """The options of the dataclass tree `cls` by dotted key, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        tp, meta = _hints(cls)[f.name], f.metadata
        if dataclasses.is_dataclass(tp):  # a section
            out.update({f"{f.name}.{k}": dataclasses.replace(s, key=f"{f.name}.{k}") for k, s in _specs(tp).items()})
            continue
        choices = meta.get("choices") or (typing.get_args(tp) if typing.get_origin(tp) is Literal else None)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = FieldSpec(f.name, tp, default, meta.get("help", ""), choices,
                                *(meta.get(bound) for bound in ("min", "max", "gt", "lt")))
    return out


def field_specs(cls=None) -> list[FieldSpec]:
    """Every option of the config tree `cls` (default `Config`), flattened to dotted keys, in declaration order
    (top-level options first as declared, then each section)."""
    return list(_specs(cls or Config).values())


def _as_int(value):
    """An int as YAML gives it: not a boolean; an integral float, or text such as '1e3' (a string to PyYAML)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not an int")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
        with contextlib.suppress(ValueError):
            number = float(value)
            return int(number) if number.is_integer() else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _as_str(value):
    """Text as YAML gives it: a number or a date (`output_dir: 2024-01-01`) is text, a boolean or null is not."""
    if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
        return str(value)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _refuse(kind):
    """A validator that refuses values of `kind`, which pydantic's lax mode would convert (true to 1.0, 1.0 to true)."""
    def refuse(value):
        if isinstance(value, kind):
            raise ValueError(f"{value!r} is refused")
        return value
    return BeforeValidator(refuse)


def _null(value):
    """'null', 'none', '~' or '' is None for an optional number."""
    return None if isinstance(value, str) and value.strip().lower() in _NULL_WORDS else value


_LEAVES = {int: Annotated[int, BeforeValidator(_as_int)], str: Annotated[str, BeforeValidator(_as_str)],
           float: Annotated[float, _refuse(bool), Field(allow_inf_nan=False)], bool: Annotated[bool, _refuse(float)]}


def _lenient(tp, bounds: dict | None = None):
    """Type `tp` for pydantic, lenient at its leaves as `_LEAVES` says, `bounds` (ge/le/gt/lt) on its numbers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION:
        union = Union[tuple(_lenient(arg, bounds) for arg in args)]
        return Annotated[union, BeforeValidator(_null)] if type(None) in args and str not in args else union
    if origin in (list, tuple, set, frozenset, dict):
        return origin[tuple(arg if arg is ... else _lenient(arg) for arg in args)]
    return Annotated[_LEAVES[tp], Field(**bounds)] if bounds and tp in (int, float) else _LEAVES.get(tp, tp)


def _check(spec: FieldSpec, value, where: str):
    """`value` validated for the option `spec`, or ConfigError saying what the option allows."""
    try:
        return spec.validator.validate_python(value)
    except ValidationError as e:
        error = e.errors()[0]
    if error["type"] == "literal_error" and isinstance(value, str) and (spec.key, value) in _RETIRED:
        raise ConfigError(f"{where}: {_RETIRED[spec.key, value]}")
    if error["type"] == "literal_error":
        kind = "" if typing.get_origin(spec.type) is Literal else f" ({spec.type_name})"
        why = f"expected one of {'|'.join(map(_fmt, spec.choices))}{kind}, got {_show(value)}"
        close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1)
        why += f"; did you mean {close[0]!r}?" if close else ""
    elif error["type"] in _BOUND_ERRORS:
        got = TypeAdapter(_lenient(spec.type)).validate_python(value)  # as converted: 1 for a float is 1.0
        why = f"expected {spec.type_name} {spec.range_text()}, got {_show(got)}"
    else:
        why = _expected(spec.type, error["loc"], error["input"] if error["loc"] else value, error["type"])
    raise ConfigError(f"{where}: bad value for '{spec.key}': {why}")


def _expected(tp, loc: tuple, value, error: str) -> str:
    """'expected TYPE, got VALUE', down to the item or key of a container that pydantic's error `loc` names."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if loc and args and origin in (list, tuple, set, frozenset, dict):
        if origin is dict:
            at_key = loc[1:2] == ("[key]",)
            inner, rest, what = args[0 if at_key else 1], loc[2 if at_key else 1:], f"at key {_show(loc[0])}"
        else:
            inner = args[loc[0]] if origin is tuple and args[-1] is not ... else args[0]
            rest, what = loc[1:], f"item {loc[0]}"
        return f"expected {_type_name(tp)}, but {what}: {_expected(inner, rest, value, error)}"
    if tp is float and type(value) is int:  # an int too large for a float
        return f"expected float, got {_show(value)}, which is too large"
    hint = f" ({len(args)} items)" if origin is tuple and args[-1:] != (...,) else _HINTS.get(origin or tp, "")
    hint = " (a finite number)" if error == "finite_number" and tp is float else hint
    quote = "; put it in quotes to mean the text" if tp is str and (value is None or isinstance(value, bool)) else ""
    return f"expected {_type_name(tp)}{hint}, got {_show(value)}{quote}"


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION:
        return " | ".join(map(_type_name, args))
    if origin is Literal:
        return "|".join(map(_fmt, args))
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is ... else _type_name(a) for a in args)}]"
    return {type(None): "None", Any: "any"}.get(tp) or getattr(tp, "__name__", str(tp))


def _fmt(value) -> str:
    """A value as a person would type it (YAML-ish): true, null, "", [a, b], 0.0001."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # as is where YAML reads it back as this very text, else as JSON (which YAML reads)
        with contextlib.suppress(Exception):
            if value and value.strip() == value and yaml.safe_load(value) == value:
                return value
        return json.dumps(value, ensure_ascii=False)
    with contextlib.suppress(Exception):
        flow = yaml.safe_dump(config_to_dict(value), default_flow_style=True, width=float("inf"), allow_unicode=True)
        return flow.strip().removesuffix("...").strip()
    return repr(value)


def _show(value, limit: int = 80) -> str:
    """A value given by the user, for an error message."""
    text = "an empty value (null)" if value is None else repr(value) if isinstance(value, str) else _fmt(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_to_dict(cfg) -> dict:
    """The config as nested plain dicts/lists/scalars (a deep copy; what `save_config` writes)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return [config_to_dict(v) for v in cfg] if isinstance(cfg, (list, tuple, set, frozenset)) else cfg


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (`config_to_dict`, or a run's config.yaml as read) as one level of dotted
    keys: {"algo": {"estimator": "kae"}} -> {"algo.estimator": "kae"}."""
    out = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value})
    return out


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = []  # a list: keys may be unhashable (SafeLoader reports those)
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, what: str):
    """`text` read as YAML, or ConfigError: "{what} at line L, column C: the problem"."""
    try:
        return yaml.load(text, Loader=_Loader)
    except Exception as e:  # YAMLError, and the odd ValueError/RecursionError on absurd input
        if not isinstance(e, yaml.MarkedYAMLError):
            raise ConfigError(f"{what}: " + " ".join(str(e).split())) from None
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        why = f"{e.problem} ({e.context})" if e.problem and e.context else e.problem or e.context or "syntax error"
        raise ConfigError(f"{what}{at}: {why}") from None


def _read_file(name: str) -> dict:
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        why = {FileNotFoundError: "does not exist", IsADirectoryError: "is a directory, not a YAML file",
               UnicodeDecodeError: "is not UTF-8 text"}.get(type(e))
        raise ConfigError(f"config file {name!r} {why}" if why
                          else f"cannot read config file {name!r}: {e.strerror or e}") from None
    data = _yaml(text, f"config file {name!r} is not valid YAML")
    if not isinstance(data, (dict, type(None))):
        kind = {list: "list", str: "string", int: "integer", float: "number", bool: "boolean"}.get(type(data))
        raise ConfigError(f"config file {name!r} must hold a mapping of options (such as 'max_steps: 100'), "
                          f"not a {kind or type(data).__name__}")
    return data or {}


def _parse_raw(text: str, tp, where: str):
    """An override's value text, for an option of type `tp`: str options take the text as is (so `output_dir=2024`
    or `name=0.10` stay text), except quoted or null text; everything else is read with YAML semantics (`1e-4`,
    `true`, `[a, b]`, `{a: 1}`)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in _UNION else (tp,)
    if str in args and type(None) in args and text.strip().lower() in _NULL_WORDS:
        return None
    if str in args and text.strip()[:1] not in ("'", '"'):
        return text
    value = _yaml(text, f"{where}: cannot parse value {_show(text)} as YAML")
    return text if str in args and not isinstance(value, str) else value


def _unknown(specs: dict, sections: set, key: str, section: str, where: str) -> ConfigError:
    """ConfigError for the unknown `key`: the closest options or sections, else the keys of its `section`."""
    low, by_name = key.lower(), {}
    for k in specs:
        by_name.setdefault(k.rpartition(".")[2], []).append(k)
    close = by_name.get(low.rpartition(".")[2], []) + difflib.get_close_matches(low, [*specs, *sections], 3, 0.6)
    for name in difflib.get_close_matches(low.rpartition(".")[2], list(by_name), 2, 0.7):
        close += by_name[name]
    close = [k for k in dict.fromkeys(close) if not low.startswith(k + ".")][:5]  # not the section the key names
    if close:
        return ConfigError(f"{where}: unknown key {key!r}; did you mean "
                           + (close[0] if len(close) == 1 else "one of: " + ", ".join(close)) + "?")
    if section:
        keys = ", ".join(k for k in specs if k.startswith(section + "."))
        return ConfigError(f"{where}: unknown key {key!r}; section '{section}' has: {keys}")
    return ConfigError(f"{where}: unknown key {key!r}; run `frugalrl train --help` to list all options")


class _Assembly:
    """A config being assembled: the value of each option (by dotted key) and where each was set."""

    def __init__(self, cls, base):
        self.cls, self.specs, self.origin = cls, _specs(cls), {}
        self.values = {k: config_to_dict(functools.reduce(getattr, k.split("."), base)) for k in self.specs}
        self.sections = {k.rsplit(".", n)[0] for k in self.specs for n in range(1, k.count(".") + 1)}

    def set(self, key, value, where: str, seen: set, raw: str | None = None) -> None:
        """Set dotted `key` to `value`, or to the override text `raw` (parsed once the option's type is known).
        A section takes a mapping of its keys."""
        shown = (key if isinstance(key, str) else _fmt(key)).strip()
        key = ".".join(part.strip().replace("-", "_") for part in shown.split("."))
        if key in self.specs:
            value = value if raw is None else _parse_raw(raw, self.specs[key].type, where)
            if key in seen:
                raise ConfigError(f"{where}: '{key}' is set twice")
            seen.add(key)
            self.values[key], self.origin[key] = _check(self.specs[key], value, where), where
        elif key in self.sections:
            value = value if raw is None else _yaml(raw, f"{where}: cannot parse value {_show(raw)} as YAML")
            if isinstance(value, dict):
                for k, v in value.items():
                    self.set(f"{key}.{k if isinstance(k, str) else _fmt(k)}", v, where, seen)
            elif value is not None or raw is not None:  # `algo:` with nothing under it sets nothing
                keys = [k for k in self.specs if k.startswith(key + ".")]
                raise ConfigError(f"{where}: '{key}' is a section, not a single option; set its keys "
                                  f"(e.g. {keys[0]}=VALUE): " + ", ".join(keys))
        else:
            parts = key.split(".")
            above = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]  # the longest first
            option = next((k for k in above if k in self.specs), None)
            if option:
                raise ConfigError(f"{where}: '{option}' is an option, not a section, so {shown!r} is not a key; "
                                  f"write {option}=VALUE")
            raise _unknown(self.specs, self.sections, shown, next((k for k in above if k in self.sections), ""), where)

    def override(self, text) -> None:
        if not isinstance(text, str):
            raise ConfigError(f"override {text!r} must be a string of the form key=value")
        key, eq, raw = text.partition("=")
        if not eq or not key.strip():
            name = text.strip().lstrip("-").replace("-", "_")
            raise ConfigError(f"override {text!r} is not of the form key=value (e.g. max_steps=100)"
                              + ("; overrides are written without leading dashes" if text.lstrip()[:1] == "-" else "")
                              + (f"; to set {name!r}, write {name}=VALUE" if name in self.specs else ""))
        self.set(key, None, f"override {text!r}", set(), raw)

    def build(self, where: str):
        """The config, once the options nobody set (they come from the base) are checked too, `where` their origin."""
        for key in [k for k in self.specs if k not in self.origin]:
            self.values[key] = _check(self.specs[key], self.values[key], where)
        return self._make(self.cls, "")

    def _make(self, cls, prefix: str):
        hints = _hints(cls)
        return cls(**{f.name: self._make(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name])
                      else self.values[prefix + f.name] for f in dataclasses.fields(cls)})


def load_config(path: str | os.PathLike | None = None, overrides=(), base=None):
    """The config: `base` (default: the defaults of `Config`), then the YAML file `path` (nested mappings
    `algo: {estimator: kae}` and/or dotted keys `algo.estimator: kae`), then `key=value` overrides in order, each
    value read with YAML semantics for its option's type. Everything is validated; any problem raises ConfigError.
    `base` may be any dataclass tree built with `opt()`; it is not modified."""
    cls = Config if base is None else type(base)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"base must be a dataclass instance, got {base!r}")
    config = _Assembly(cls, cls() if base is None else base)
    if path is not None:
        where, seen = f"config file {os.fspath(path)!r}", set()
        for key, value in _read_file(os.fspath(path)).items():
            config.set(key, value, where, seen)
    for text in [overrides] if isinstance(overrides, str) else overrides or ():
        config.override(text)
    return config.build("base config" if base is not None else "default value")


def apply_overrides(cfg, overrides=()):
    """A copy of `cfg` with `key=value` overrides applied in order (`cfg` is not changed)."""
    return load_config(None, overrides, base=cfg)


def validate_config(cfg) -> None:
    """Raise ConfigError if any option of `cfg` has a wrong type, a value outside its choices, or a value out of
    range."""
    load_config(None, (), base=cfg)


def changed_options(cfg, base=None) -> list[str]:
    """The `key=value` overrides (values as JSON, which YAML reads back) that turn `base` (default: the defaults of
    `cfg`'s class) into `cfg`: to hand a config to a subprocess on top of some other file."""
    new, old = (_Assembly(type(cfg), c).values for c in (cfg, type(cfg)() if base is None else base))
    return [f"{key}={json.dumps(value)}" for key, value in new.items() if value != old[key]]


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML (every option, nested by section); `load_config(path)` reads it back to an equal config.
    Parent directories are created."""
    path = os.fspath(path)
    try:
        # allow_unicode=False: PyYAML folds line-break characters such as U+0085 inside a
        # single-quoted scalar, so such text would not read back; escapes always round-trip.
        text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=False, width=100)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot write config to {path!r}: {e}") from None
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def format_help(cls=None) -> str:
    """Every option, grouped by section, one `key (type, default X) help [choices: a|b]` line each (for
    `frugalrl train --help`)."""
    groups: dict[str, list[str]] = {}
    for spec in field_specs(cls):
        groups.setdefault(f"{spec.section or 'general'} options:", []).append("  " + spec.describe())
    return "\n\n".join("\n".join([title, *lines]) for title, lines in groups.items()) + "\n"
