"""Run configuration: nested dataclasses, every field with a default and a help line.

A config is built from the defaults, then a YAML file, then `key=value` overrides
(`algo.estimator=kae max_steps=200`), and validated before any work starts.
Each field carries `metadata={"help": ..., "choices": ..., "min"/"max"/"gt"/"lt": ...}`;
`choices` lists the allowed values of an option, `min`/`max` are inclusive numeric bounds and
`gt`/`lt` exclusive ones.

The machinery below the schema is generic over any such dataclass tree: `field_specs`,
`load_config`, `apply_overrides`, `validate_config`, `config_to_dict`, `save_config`,
`format_help`; every problem raises `ConfigError` (a ValueError) with an actionable message.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


def opt(default, help: str, choices: tuple | None = None, *, min=None, max=None, gt=None, lt=None, **kw):
    """A config field: default value, one help line, optional allowed values.

    `min`/`max` are inclusive bounds, `gt`/`lt` exclusive ones, checked on numeric values
    whenever a config is loaded.
    """
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    for name, bound in (("min", min), ("max", max), ("gt", gt), ("lt", lt)):
        if bound is not None:
            meta[name] = bound
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = opt("", "local Hugging Face model directory; empty = the embedded tiny model, "
                            "warmed up by SFT and cached under cache_dir")
    dtype: str = opt("float32", "weights dtype (use float32 on CPU: bf16 is ~19x slower there)",
                     choices=("float32", "bfloat16", "float16"))
    device: str = opt("auto", "where the policy lives and trains: auto = the GPU when torch sees one (cuda), "
                      "else the CPU", choices=("auto", "cpu", "cuda"))
    cache_dir: str = opt(".cache/frugalrl", "where the embedded model and its SFT checkpoint are cached")
    sft_steps: int = opt(3000, "embedded model: the most supervised warm-up steps on worked solutions (a cap: "
                         "the warm-up stops earlier once it reaches model.sft_target_accuracy)", min=0)
    sft_target_accuracy: float = opt(0.3, "embedded model: the warm-up stops at the first check whose greedy "
                                     "accuracy on training problems held out of the warm-up reaches this "
                                     "(0 = always train model.sft_steps)", min=0, max=1)
    sft_eval_every: int = opt(50, "embedded model: check the warm-up's accuracy every N steps", min=1)
    sft_eval_size: int = opt(256, "embedded model: training problems held out of the warm-up to check its "
                             "accuracy (at most a tenth of the training rows)", min=1)
    sft_lr: float = opt(2e-3, "embedded model: supervised warm-up learning rate", gt=0)
    sft_batch: int = opt(64, "embedded model: supervised warm-up batch size", min=1)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass instead of keeping "
                                       "them: less memory, about a third more compute per training step")


@dataclass
class LoraConfig:
    r: int = opt(0, "LoRA rank (0 = off: train every weight); the reference policy is then the model with "
                 "its adapter disabled, no second copy", min=0)
    alpha: float = opt(16.0, "LoRA scale: the adapter's output is multiplied by alpha / r", gt=0)
    dropout: float = opt(0.0, "dropout on the adapter's input, in the training passes only (sampling and the "
                         "old and reference log-probs run without dropout)", min=0, lt=1)
    target_modules: list[str] = opt(["all-linear"], "layers that get an adapter, by name (q_proj, v_proj, ...); "
                                    "[all-linear] = every linear layer but the output head")
    save: str = opt("merged", "what model/ holds: merged = the full model with the adapter folded in; "
                    "adapter = the adapter alone, plus the path of its base model", choices=("merged", "adapter"))


@dataclass
class DataConfig:
    source: str = opt("arithmetic", "where prompts come from: the built-in arithmetic task, a data file "
                      "(jsonl: any format data.train_path takes) or reasoning-gym",
                      choices=("arithmetic", "jsonl", "reasoning_gym"))
    train_path: str = opt("", "data file of prompt/answer rows: .jsonl, .csv, .parquet, or a directory written "
                          "by datasets' save_to_disk; setting it replaces the built-in task")
    eval_path: str = opt("", "data file for evaluation (same formats); empty = a held-out split")
    prompt_field: str = opt("prompt", "data files: the column holding the prompt, a string or a chat message "
                            "list (then the last user message is the prompt; a 'messages' column is used "
                            "when this one is missing)")
    answer_field: str = opt("answer", "data files: the column holding the reference answer (reward functions "
                            "receive it as answer=)")
    max_prompt_tokens: int = opt(0, "drop prompts longer than this many tokens, chat template included, and "
                                 "count them (0 = keep all)", min=0)
    chat_template: str = opt("auto", "wrap each prompt in the tokenizer's chat template as a user message: "
                             "auto = when the tokenizer has one", choices=("auto", "on", "off"))
    system_prompt: str = opt("", "system message put before each prompt when the chat template is used")
    difficulty: int = opt(2, "built-in task: number of operations after the first sum (1..3)", min=1, max=3)
    train_size: int = opt(20000, "built-in task: number of training problems", min=1)
    eval_size: int = opt(256, "held-out problems for evaluation (never trained on)", min=1)
    seed: int = opt(-1, "seed of the train/eval split (built-in task, reasoning-gym, a data file's held-out rows); "
                    "-1 = the run's seed. Fix it to vary a run's seed without changing its data", min=-1)
    sticky_steps: int = opt(1, "reuse each prompt mini-batch for this many consecutive steps (KAE needs >1: "
                            "else a prompt's past rewards rarely fall in its kernel window)", min=1)
    task: str | list[str] = opt("", "reasoning_gym: generator name (chain_sum), or a list [chain_sum, "
                                "basic_arithmetic] to mix several")
    task_weights: list[float] = opt([], "reasoning_gym: sampling weight of each data.task (empty = equal)")
    task_config: dict[str, Any] = opt({}, "reasoning_gym: generator options, e.g. {min_terms: 2, max_digits: 2}; "
                                      "with several tasks one mapping per task: {chain_sum: {...}}")
    size: int = opt(0, "reasoning_gym: training items to generate (0 = data.train_size)", min=0)
    answer_extract: str = opt("answer_tags", "reasoning_gym: where a completion's answer is read: "
                              "<answer>..</answer>, \\boxed{..}, the last line, or after the last '#' (marker)",
                              choices=("answer_tags", "boxed", "last_line", "marker"))
    prompt_template: str = opt("", "prompt text: for data files {prompt} and the row's other columns (e.g. "
                               "'{prompt} Put the final answer in \\boxed{{}}.'); for reasoning_gym {question} "
                               "and metadata fields (e.g. '{expression} ='); empty = the prompt as is "
                               "(reasoning_gym: the question plus a line on the answer format)")
    partial_credit: bool = opt(False, "reasoning_gym: reward = the task's score as is (partial credit for near "
                               "misses); false = 1 only for full marks, else 0")


@dataclass
class RolloutConfig:
    batch_prompts: int = opt(64, "prompts per rollout batch (train.ppo_epochs x train.mini_batches optimizer "
                             "steps per batch, one by default)", min=1)
    group_size: int = opt(4, "completions per prompt, G", min=1)
    temperature: float = opt(0.7, "sampling temperature (rollouts; log-probs are taken at the same temperature); "
                             "algo.estimator=astar needs 1.0, the temperature V* is estimated at", gt=0)
    top_p: float = opt(1.0, "nucleus sampling mass", gt=0, max=1)
    max_new_tokens: int = opt(48, "longest completion, in tokens", min=1)
    backend: str = opt("hf", "what samples the training rollouts: hf = in this process (frugalrl's fast loop "
                       "for Llama/Qwen2, else Hugging Face generate); vllm = a vLLM engine on the GPU that gets "
                       "the policy's weights before each rollout", choices=("hf", "vllm"))
    vllm_gpu_memory: float = opt(0.3, "vllm: share of the GPU's memory for the engine's weights and KV cache",
                                 gt=0, max=1)
    vllm_sleep: bool = opt(True, "vllm: release the engine's GPU memory between rollouts (sleep mode), for the "
                           "training step")
    allocation: str = opt("uniform", "which prompts a step rolls out and how many completions each gets, "
                          "always batch_prompts x group_size in all: uniform = the sampler's batch, G each; skip = "
                          "skip prompts whose groups are predicted all-equal (GRESO), drawing more to fill the batch; "
                          "budget = choose prompts and counts from rollout.candidates to maximise the expected "
                          "learning signal (Knapsack RL); see README", choices=("uniform", "skip", "budget"))
    candidates: int = opt(0, "budget: prompts considered per step (0 = 2 x batch_prompts)", min=0)
    min_per_prompt: int = opt(2, "budget: fewest completions of a prompt that is rolled out", min=1)
    max_per_prompt: int = opt(8, "budget: most completions of one prompt", min=1)
    skip_floor: float = opt(0.1, "skip: the least chance that a prompt is rolled out when considered, however "
                            "sure the prediction (so that a skipped prompt is re-checked)", gt=0, max=1)
    passrate_prior: str = opt("population", "prior of a prompt's pass rate before its history: population = the "
                              "run's mean reward; vstar = A*-PO's stage-1 pass rate; cross_prompt = the pass rates of "
                              "the most similar prompts (the starting policy's hidden states)",
                              choices=("population", "vstar", "cross_prompt"))
    passrate_strength: float = opt(2.0, "weight of the prior in a pass-rate estimate, in samples", gt=0)
    passrate_visits: float = opt(2.0, "pass-rate estimate: a prompt's k-th most recent visit weighs "
                                 "exp(-k / this), in visits (not steps: a prompt recurs once an epoch)", gt=0)
    prior_neighbors: int = opt(32, "cross_prompt prior: similar prompts it averages", min=1)
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop groups whose rewards are all equal and roll "
                                 "out more prompts until batch_prompts groups differ (their generation is paid for)")
    dynamic_max_rounds: int = opt(4, "dynamic_sampling: most rollout rounds per step (then the batch is filled with "
                                  "all-equal groups)", min=1)


@dataclass
class AlgoConfig:
    estimator: str = opt("rloo", "advantage estimator (gae: PPO with a learned critic, see README)",
                         choices=("grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "kae", "astar", "gae"))
    loss_agg: str = opt("seq-mean-token-sum", "how token losses become one number (seq-mean-token-sum-norm: "
                        "token sums / rollout.max_new_tokens, Dr. GRPO's constant)",
                        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"))
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
    vstar_path: str = opt("", "A*-PO: V* cache file (JSON); empty = model.cache_dir/vstar-<hash of what it "
                          "depends on>.json")
    vstar_prompts: int = opt(0, "A*-PO: run stage 1 on, and train on, only the first N training prompts "
                             "(stage 1 costs vstar_n samples per prompt); 0 = all", min=0)
    vstar_drop_unsolved: bool = opt(False, "A*-PO: train only on prompts that some stage-1 sample solved "
                                    "(reward > 0)")
    astar_beta1: float = opt(0.5, "A*-PO: V* = beta1 * log mean exp(r / beta1) (0 = plain mean)", min=0)
    astar_beta2: float = opt(1e-3, "A*-PO: loss (beta2 * log(pi/pi_ref) - (r - V*))^2", gt=0)
    kl_coef: float = opt(0.0, "KL(pi || pi_ref) penalty in the loss (0 = off: no reference model is kept)",
                         min=0)
    kl_estimator: str = opt("k3", "KL estimator per token: k1 = log ratio, k3 = low-variance, >= 0",
                            choices=("k1", "k3"))
    entropy_coef: float = opt(0.0, "entropy bonus: subtract this times the token entropy, aggregated like the "
                              "loss (algo.loss_agg), from the loss", min=0)
    gae_gamma: float = opt(1.0, "PPO: GAE discount over completion tokens", min=0, max=1)
    gae_lambda: float = opt(1.0, "PPO: GAE lambda (1 = Monte-Carlo returns minus values)", min=0, max=1)
    value_clip: float = opt(0.2, "PPO: the critic's prediction moves at most this far (reward units) per "
                            "update in the clipped value loss", gt=0)


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
    # 16, not 64: on the embedded model 64 raised peak RSS from 545 to 730 MB for no speed
    # (1.07 vs 1.13 s per GRPO step, 1 thread); the update does not depend on the split
    micro_batch: int = opt(16, "sequences per forward/backward pass (gradient accumulation; sets "
                           "back-propagation's memory)", min=1)
    filter_threshold: float = opt(0.0, "drop samples with |advantage| <= this before their forward pass "
                                  "(0 drops exact zeros only, and only where that leaves the update "
                                  "unchanged)", min=0)
    ppo_epochs: int = opt(1, "passes over each rollout batch (> 1 = off-policy updates with the PPO clip)",
                          min=1)
    mini_batches: int = opt(1, "optimizer steps per pass over the rollout batch (> 1 = off-policy updates "
                            "with the PPO clip)", min=1)
    critic_lr: float = opt(1e-3, "PPO: AdamW learning rate of the critic (value head)", gt=0)
    max_bad_steps: int = opt(5, "a step whose loss or gradient is NaN/inf is skipped; stop with an error after "
                             "this many in a row", min=1)
    strategy: str = opt("ddp", "data parallelism under torchrun: ddp = every process holds the whole model, its "
                        "gradients and optimizer state; fsdp = torch's FSDP2 shards them over the processes "
                        "(see README, Scale-out)", choices=("ddp", "fsdp"))
    fsdp_reshard_after_forward: bool = opt(True, "fsdp: free each layer's gathered weights after its forward pass "
                                           "and gather them again for the backward (less memory, more traffic)")
    fsdp_cpu_offload: bool = opt(False, "fsdp on GPUs: keep the sharded weights, gradients and optimizer state in "
                                 "CPU memory and step the optimizer there (torch's CPUOffloadPolicy); no effect "
                                 "on the CPU")


@dataclass
class RewardConfig:
    funcs: list[str] = opt([], "reward functions, summed: math, format, arithmetic, module:function or "
                           "path/to/file.py:function (TRL signature); empty = the task's own reward")
    weights: list[float] = opt([], "weight of each of reward.funcs (empty = 1 each)")
    on_error: str = opt("raise", "a reward function that raises or times out: raise = stop with an error "
                        "naming the sample; zero = score it 0 and count it (reward_errors)",
                        choices=("raise", "zero"))
    timeout_s: float = opt(0.0, "deadline per reward-function call, seconds (0 = none: called in this process); "
                           "> 0 calls the functions in a worker process, killed and restarted when a call "
                           "runs past it", min=0)


@dataclass
class EvalConfig:
    pass_k: int = opt(4, "k for pass@k (sampled at temperature eval.temperature); 0 = off", min=0)
    temperature: float = opt(1.0, "sampling temperature for pass@k", gt=0)
    log_examples: int = opt(4, "held-out prompts whose greedy completion, answer and reward go to the report_to "
                            "trackers as a table at each evaluation (0 = none)", min=0)


@dataclass
class Config:
    max_steps: int = opt(600, "training steps, one rollout batch each (and train.ppo_epochs x "
                         "train.mini_batches optimizer steps)", min=1)
    seed: int = opt(0, "random seed (python, numpy, torch, data)", min=-2**63, max=2**64 - 1)  # torch's range
    output_dir: str = opt("runs/latest", "run directory: config, metrics, plots, checkpoints, final model")
    resume: str = opt("", "run directory to continue from its newest complete checkpoint (what "
                      "`frugalrl train --resume DIR` sets; output_dir must be the same directory)")
    save_every: int = opt(0, "checkpoint every N steps and at the last step (0 = only the final model; "
                          "SIGINT/SIGTERM checkpoint anyway)", min=0)
    save_total_limit: int = opt(0, "keep only the newest N checkpoints (0 = keep all)", min=0)
    eval_every: int = opt(50, "evaluate every N steps (0 = off)", min=0)
    max_wall_s: float = opt(480.0, "stop after this many seconds of training, evaluation excluded (0 = no limit)", min=0)
    threads: int = opt(0, "torch CPU threads (0 = torch's default)", min=0)
    log_every: int = opt(0, "when stdout is not a terminal (a log file), print one progress line every N steps "
                         "(0 = about 20 lines a run); a terminal shows a progress bar instead", min=0)
    report_to: str | list[str] = opt([], "experiment trackers that get every metrics row and, at each evaluation, "
                                     "a table of held-out completions: a list of tensorboard, wandb, mlflow, "
                                     "trackio, or one name (each: pip install 'frugalrl[NAME]'); [] or none = "
                                     "no tracker. Offline by default: see `frugalrl.tracking`")
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


# Estimators whose baseline comes from the prompt's own group: with one sample per prompt
# every advantage is 0 (rloo refuses, grpo/dr_grpo would silently train nothing).
_GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
# How A*-PO stage 1 samples: the reference itself (the paper's setting), so V* is the value of
# pi_ref untempered. Stage 2 must sample the same way, or r - V* compares the rewards of one
# distribution with the value of another.
VSTAR_SAMPLING = {"temperature": 1.0, "top_p": 1.0}


def _check_allocation(cfg: Config) -> None:
    ro, estimator = cfg.rollout, cfg.algo.estimator
    if ro.allocation == "budget":
        if ro.min_per_prompt > ro.max_per_prompt:
            raise ConfigError(f"rollout.min_per_prompt={ro.min_per_prompt} exceeds rollout.max_per_prompt="
                              f"{ro.max_per_prompt}; lower the first or raise the second")
        if estimator in _GROUP_ESTIMATORS and ro.min_per_prompt < 2:
            raise ConfigError(f"algo.estimator={estimator} learns nothing from a prompt with one completion; set "
                              "rollout.min_per_prompt >= 2")
        candidates = ro.candidates or 2 * ro.batch_prompts
        if candidates * ro.max_per_prompt < ro.batch_prompts * ro.group_size:
            raise ConfigError(f"rollout.allocation=budget: {candidates} candidates x rollout.max_per_prompt="
                              f"{ro.max_per_prompt} cannot spend the {ro.batch_prompts * ro.group_size} completions of "
                              "a step; raise rollout.candidates or rollout.max_per_prompt")
    if ro.dynamic_sampling and ro.allocation != "uniform":
        raise ConfigError(f"rollout.dynamic_sampling replaces the allocation; it needs rollout.allocation=uniform "
                          f"(got {ro.allocation})")
    if ro.passrate_prior == "vstar" and estimator != "astar":
        raise ConfigError("rollout.passrate_prior=vstar reads A*-PO's stage-1 samples, which only "
                          "algo.estimator=astar makes; use population or cross_prompt")


def _check_consistency(cfg: Config) -> None:
    """Rules that involve several options (each option's own type and range are checked as
    it is set); raise ConfigError saying what to change."""
    if cfg.algo.estimator in _GROUP_ESTIMATORS and cfg.rollout.group_size < 2:
        raise ConfigError(f"algo.estimator={cfg.algo.estimator} compares the completions of each prompt, so it "
                          f"needs rollout.group_size >= 2 (got {cfg.rollout.group_size}); raise it, or use "
                          "algo.estimator=kae or reinforce, which work with one completion per prompt")
    _check_allocation(cfg)
    if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.funcs):
        raise ConfigError(f"reward.weights has {len(cfg.reward.weights)} entries for {len(cfg.reward.funcs)} "
                          "reward.funcs; give one weight per function, or none (1 each)")
    wrong = [k for k, v in VSTAR_SAMPLING.items() if getattr(cfg.rollout, k) != v]
    if cfg.algo.estimator == "astar" and wrong:
        raise ConfigError("algo.estimator=astar compares each reward with V*, the value of the reference sampled at "
                          + " and ".join(f"{k} {v}" for k, v in VSTAR_SAMPLING.items()) + ", but "
                          + " and ".join(f"rollout.{k}={getattr(cfg.rollout, k)}" for k in wrong)
                          + " samples another distribution; set "
                          + " and ".join(f"rollout.{k}={VSTAR_SAMPLING[k]}" for k in wrong))
    if cfg.resume and os.path.abspath(cfg.resume) != os.path.abspath(cfg.output_dir):
        raise ConfigError(f"resume={cfg.resume} continues that run in place, but output_dir={cfg.output_dir}; "
                          "drop output_dir (`frugalrl train --resume DIR` sets it) or make them equal")
    from frugalrl import tracking  # here: tracking builds on this module

    try:
        tracking.backends(cfg.report_to)
    except ValueError as e:  # an unknown or uninstalled tracker: say so before any work
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------
# Machinery: generic over any tree of dataclasses whose fields are made with `opt()`
# (a field whose type is itself a dataclass is a *section*; every other field is an
# *option*). Adding a field to the schema above needs no change below.
# ---------------------------------------------------------------------------------------

__all__ = [
    "Config", "ModelConfig", "LoraConfig", "DataConfig", "RolloutConfig", "AlgoConfig", "TrainConfig",
    "RewardConfig", "EvalConfig",
    "ConfigError", "FieldSpec", "opt", "field_specs", "load_config", "apply_overrides",
    "validate_config", "config_to_dict", "flatten", "save_config", "format_help",
]

_HELP_HINT = "run `frugalrl train --help` to list all options"
_TRUE = frozenset({"true", "yes", "on", "1", "y"})
_FALSE = frozenset({"false", "no", "off", "0", "n"})
_NULL_WORDS = frozenset({"null", "none", "~", ""})
_UNION_TYPES = (Union, types.UnionType)


class ConfigError(ValueError):
    """A configuration problem, with a short message that says what to change."""


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
        parts = []
        if self.gt is not None:
            parts.append(f"> {_fmt(self.gt)}")
        if self.min is not None:
            parts.append(f">= {_fmt(self.min)}")
        if self.lt is not None:
            parts.append(f"< {_fmt(self.lt)}")
        if self.max is not None:
            parts.append(f"<= {_fmt(self.max)}")
        return " and ".join(parts)

    def describe(self) -> str:
        """One help line: `key (type, default X) help [choices: a|b] [range: >= 1]`."""
        line = f"{self.key} ({self.type_name}, default {_fmt(self.default)}) {self.help}"
        if self.choices:
            line += f" [choices: {'|'.join(_fmt(c) for c in self.choices)}]"
        if self.range_text():
            line += f" [range: {self.range_text()}]"
        return line


class _BadValue(Exception):
    """Internal: a value that does not fit its option; the message starts with 'expected'."""


# --- schema introspection -------------------------------------------------------------

def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (Field, resolved type) for the init fields of dataclass `cls`."""
    if not _is_section(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


@functools.lru_cache(maxsize=None)
def _specs(cls) -> tuple[FieldSpec, ...]:
    out = []

    def walk(c, prefix):
        for name, (f, tp) in _fields(c).items():
            if _is_section(tp):
                walk(tp, f"{prefix}{name}.")
                continue
            meta = f.metadata
            out.append(FieldSpec(
                key=prefix + name, type=tp, default=_field_default(f), help=meta.get("help", ""),
                choices=tuple(meta["choices"]) if meta.get("choices") is not None else _literal_choices(tp),
                min=meta.get("min"), max=meta.get("max"), gt=meta.get("gt"), lt=meta.get("lt"),
            ))

    walk(cls, "")
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _spec_map(cls) -> dict[str, FieldSpec]:
    return {s.key: s for s in _specs(cls)}


@functools.lru_cache(maxsize=None)
def _section_keys(cls) -> tuple[str, ...]:
    out = []

    def walk(c, prefix):
        for name, (_, tp) in _fields(c).items():
            if _is_section(tp):
                out.append(prefix + name)
                walk(tp, f"{prefix}{name}.")

    walk(cls, "")
    return tuple(out)


def field_specs(cls=None) -> list[FieldSpec]:
    """Every option of the config tree `cls` (default `Config`), flattened to dotted keys,
    in declaration order (top-level options first as declared, then each section)."""
    return list(_specs(Config if cls is None else cls))


# --- type names, value display ----------------------------------------------------------

def _literal_choices(tp):
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None


def _type_name(tp) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(_fmt(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{inner}]" if inner else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _fmt(value) -> str:
    """A value as a person would type it (YAML-ish): true, null, "", [a, b], 0.0001."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        try:
            plain = value != "" and value.strip() == value and yaml.safe_load(value) == value
        except Exception:
            plain = False
        return value if plain else json.dumps(value, ensure_ascii=False)
    try:
        return yaml.safe_dump(_plain(value), default_flow_style=True, width=float("inf"),
                              allow_unicode=True).strip().removesuffix("...").strip()
    except Exception:
        return repr(value)


def _show(value, limit: int = 80) -> str:
    """A value given by the user, for an error message."""
    if value is None:
        return "an empty value (null)"
    text = repr(value) if isinstance(value, str) else _fmt(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    if value is None:
        return "empty value"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), type(value).__name__)


# --- coercion -----------------------------------------------------------------------------

def _coerce(value, tp):
    """`value` (as parsed by YAML) converted to type `tp`, or _BadValue."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if origin in _UNION_TYPES:
        arms = [a for a in args if a is not type(None)]
        nullable = len(arms) < len(args)
        if value is None:
            if nullable:
                return None
            raise _BadValue(f"expected {_type_name(tp)}, got {_show(value)}")
        if nullable and str not in arms and isinstance(value, str) and value.strip().lower() in _NULL_WORDS:
            return None
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm)
            except _BadValue as e:
                errors.append(e)
        if len(arms) == 1 and typing.get_origin(arms[0]) is not None:
            raise errors[0]  # a container: keep the detailed message (which element is wrong)
        raise _BadValue(f"expected {_type_name(tp)}, got {_show(value)}")

    if origin is Literal:
        for choice in args:
            try:
                if _coerce(value, type(choice)) == choice:
                    return choice
            except _BadValue:
                pass
        raise _BadValue(f"expected one of {_type_name(tp)}, got {_show(value)}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _BadValue(f"expected bool (true/false, yes/no, 1/0), got {_show(value)}")

    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value.strip())
                except ValueError:
                    number = None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise _BadValue(f"expected int (a whole number), got {_show(value)}")

    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is not None:
            try:
                number = float(number)
            except OverflowError:
                raise _BadValue(f"expected float, got {_show(value)}, which is too large") from None
            if math.isfinite(number):
                return number
            raise _BadValue(f"expected float (a finite number), got {_show(value)}")
        raise _BadValue(f"expected float (a number such as 0.5 or 1e-4), got {_show(value)}")

    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        hint = "; put it in quotes to mean the text" if isinstance(value, bool) or value is None else ""
        raise _BadValue(f"expected str, got {_show(value)}{hint}")

    container = origin or tp
    if container in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise _BadValue(f"expected {_type_name(tp)} (YAML list such as [a, b]), got {_show(value)}")
        items = list(value)
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise _BadValue(f"expected {_type_name(tp)} ({len(args)} items), got {_show(value)}")
            elem_types = list(args)
        else:
            elem_types = [args[0] if args else Any] * len(items)
        out = []
        for i, (item, elem_tp) in enumerate(zip(items, elem_types)):
            try:
                out.append(_coerce(item, elem_tp))
            except _BadValue as e:
                raise _BadValue(f"expected {_type_name(tp)}, but item {i}: {e}") from None
        try:
            return container(out)
        except TypeError:  # unhashable items in a set
            raise _BadValue(f"expected {_type_name(tp)}, got {_show(value)}") from None

    if container is dict:
        if not isinstance(value, dict):
            raise _BadValue(f"expected {_type_name(tp)} (YAML mapping such as {{a: 1}}), got {_show(value)}")
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        out = {}
        for k, v in value.items():
            try:
                ck = _coerce(k, key_tp)
                out[ck] = _coerce(v, val_tp)
            except _BadValue as e:
                raise _BadValue(f"expected {_type_name(tp)}, but at key {_show(k)}: {e}") from None
            except TypeError:
                raise _BadValue(f"expected {_type_name(tp)}, got unusable key {_show(k)}") from None
        return out

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _BadValue(f"expected {_type_name(tp)}, got {_show(value)}")
    return value  # a typing construct this machinery does not know: keep the value as given


def _check(spec: FieldSpec, value, where: str):
    """`value` coerced for option `spec` and checked against its choices and bounds."""
    try:
        value = _coerce(value, spec.type)
        if spec.choices is not None and value is not None and value not in spec.choices:
            allowed = "|".join(_fmt(c) for c in spec.choices)
            msg = f"expected one of {allowed} ({spec.type_name}), got {_show(value)}"
            close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1)
            raise _BadValue(msg + (f"; did you mean {close[0]!r}?" if close else ""))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if ((spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max)
                    or (spec.gt is not None and value <= spec.gt) or (spec.lt is not None and value >= spec.lt)):
                raise _BadValue(f"expected {spec.type_name} {spec.range_text()}, got {_show(value)}")
    except _BadValue as e:
        raise ConfigError(f"{where}: bad value for '{spec.key}': {e}") from None
    return value


# --- plain data <-> dataclasses -------------------------------------------------------------

def _plain(value):
    """Builtins only: tuples/sets become lists, dataclasses become dicts (deep copy)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _to_data(cls, obj) -> dict:
    out = {}
    for name, (f, tp) in _fields(cls).items():
        value = getattr(obj, name, None)
        if _is_section(tp):
            out[name] = _to_data(tp, value if isinstance(value, tp) else tp())
        else:
            out[name] = _plain(value) if hasattr(obj, name) else _plain(_field_default(f))
    return out


def _build(cls, data: dict):
    kwargs = {}
    for name, (_, tp) in _fields(cls).items():
        if name in data:
            kwargs[name] = _build(tp, data[name]) if _is_section(tp) else data[name]
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config ({cls.__name__}): {e}") from e


def config_to_dict(cfg) -> dict:
    """The config as nested plain dicts/lists/scalars (what `save_config` writes)."""
    return _to_data(type(cfg), cfg)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (`config_to_dict`, or a run's config.yaml as read) as one level of dotted
    keys: {"algo": {"estimator": "kae"}} -> {"algo.estimator": "kae"}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# --- parsing ----------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: SafeLoader reports it below
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_text(e: Exception) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        if e.context and e.problem:
            what = f"{e.problem} ({e.context})"
        return f"{where}: {what}"
    return ": " + " ".join(str(e).split())


def _parse_yaml_value(text: str, where: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except Exception as e:  # YAMLError, and the odd ValueError/RecursionError on absurd input
        raise ConfigError(f"{where}: cannot parse value {_show(text)} as YAML{_yaml_error_text(e)}") from None


def _accepts_text(tp) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in _UNION_TYPES and str in typing.get_args(tp)


def _parse_raw(text: str, tp, where: str):
    """An override's value text, for an option of type `tp`: str options take the text as is
    (so `output_dir=2024` or `name=0.10` stay text), except quoted or null text; everything
    else is read with YAML semantics (`1e-4`, `true`, `[a, b]`, `{a: 1}`)."""
    if _accepts_text(tp):
        stripped = text.strip()
        if tp is not str and type(None) in typing.get_args(tp) and stripped.lower() in _NULL_WORDS:
            return None
        if stripped[:1] in ("'", '"'):
            value = _parse_yaml_value(text, where)
            if isinstance(value, str):
                return value
        return text
    return _parse_yaml_value(text, where)


def _read_yaml_file(path) -> dict:
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {name!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {name!r} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {name!r} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {name!r}: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except Exception as e:
        raise ConfigError(f"config file {name!r} is not valid YAML{_yaml_error_text(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name!r} must hold a mapping of options "
                          f"(such as 'max_steps: 100'), not a {_kind(data)}")
    return data


# --- assigning values -------------------------------------------------------------------------

def _suggest(cls, key: str) -> list[str]:
    leaves = [s.key for s in _specs(cls)]
    candidates = leaves + list(_section_keys(cls))
    key = key.lower()
    last = key.rpartition(".")[2]
    by_last: dict[str, list[str]] = {}
    for k in leaves:
        by_last.setdefault(k.rpartition(".")[2], []).append(k)
    out = list(by_last.get(last, []))
    out += difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    for name in difflib.get_close_matches(last, list(by_last), n=2, cutoff=0.7):
        out += by_last[name]
    # a section that the key already names ('algo' for 'algo.foo') is no suggestion
    return [k for k in dict.fromkeys(out) if not key.startswith(k + ".")][:5]


def _unknown_key(cls, key: str, section: str, where: str) -> ConfigError:
    msg = f"{where}: unknown key {key!r}"
    close = _suggest(cls, key)
    if close:
        msg += "; did you mean " + (close[0] if len(close) == 1 else "one of: " + ", ".join(close)) + "?"
    elif section:
        keys = [s.key for s in _specs(cls) if s.key.startswith(section + ".")]
        msg += f"; section '{section}' has: " + ", ".join(keys)
    else:
        msg += f"; {_HELP_HINT}"
    return ConfigError(msg)


class _Target:
    """A config being assembled: nested plain data plus where each option was set."""

    def __init__(self, cls, data: dict):
        self.cls, self.data, self.origin = cls, data, {}

    def assign(self, key, value, where: str, *, raw: str | None = None, seen: set | None = None):
        """Set dotted `key` to `value` (already parsed), or to the override text `raw`
        (parsed once the option's type is known). A section takes a mapping of its keys."""
        key = key if isinstance(key, str) else _fmt(key)
        parts = [p.strip().replace("-", "_") for p in key.split(".")]
        cls, node = self.cls, self.data
        for i, part in enumerate(parts):
            fields = _fields(cls)
            path = ".".join(parts[: i + 1])
            if part not in fields:
                raise _unknown_key(self.cls, key.strip(), ".".join(parts[:i]), where)
            tp = fields[part][1]
            last = i == len(parts) - 1
            if _is_section(tp):
                node = node.setdefault(part, {})
                cls = tp
                if not last:
                    continue
                if raw is not None:
                    value = _parse_yaml_value(raw, where)
                elif value is None:  # `algo:` with nothing under it
                    return
                if isinstance(value, dict):
                    for k, v in value.items():
                        self.assign(f"{path}.{k if isinstance(k, str) else _fmt(k)}", v, where, seen=seen)
                    return
                keys = [s.key for s in _specs(self.cls) if s.key.startswith(path + ".")]
                raise ConfigError(f"{where}: '{path}' is a section, not a single option; set its keys "
                                  f"(e.g. {keys[0] if keys else path + '.KEY'}=VALUE): " + ", ".join(keys))
            if not last:
                raise ConfigError(f"{where}: '{path}' is an option, not a section, "
                                  f"so {key.strip()!r} is not a key; write {path}=VALUE")
            spec = _spec_map(self.cls)[path]
            if raw is not None:
                value = _parse_raw(raw, spec.type, where)
            if seen is not None:
                if path in seen:
                    raise ConfigError(f"{where}: '{path}' is set twice")
                seen.add(path)
            node[part] = _check(spec, value, where)
            self.origin[path] = where
            return

    def apply_file(self, path) -> None:
        where = f"config file {os.fspath(path)!r}"
        seen: set[str] = set()
        for key, value in _read_yaml_file(path).items():
            self.assign(key, value, where, seen=seen)

    def apply_override(self, text) -> None:
        if not isinstance(text, str):
            raise ConfigError(f"override {text!r} must be a string of the form key=value")
        where = f"override {text!r}"
        key, eq, raw = text.partition("=")
        if not eq or not key.strip():
            msg = f"override {text!r} is not of the form key=value (e.g. max_steps=100)"
            name = text.strip().lstrip("-").replace("-", "_")
            if text.lstrip().startswith("-"):
                msg += "; overrides are written without leading dashes"
            if name in _spec_map(self.cls):
                msg += f"; to set {name!r}, write {name}=VALUE"
            raise ConfigError(msg)
        self.assign(key, None, where, raw=raw)

    def finish(self, default_where: str):
        """Check the options nobody set (they come from the base/defaults), then build."""
        for spec in _specs(self.cls):
            if spec.key in self.origin:
                continue
            *sections, name = spec.key.split(".")
            node = self.data
            for s in sections:
                node = node[s]
            node[name] = _check(spec, node.get(name), default_where)
        return _build(self.cls, self.data)


def apply_overrides(cfg, overrides=()):
    """A copy of `cfg` with `key=value` overrides applied in order (`cfg` is not changed)."""
    return load_config(None, overrides, base=cfg)


def validate_config(cfg) -> None:
    """Raise ConfigError if any option of `cfg` has a wrong type, a value outside its
    choices, or a value out of range."""
    load_config(None, (), base=cfg)


def load_config(path: str | os.PathLike | None = None, overrides=(), base=None):
    """The config: `base` (default: the defaults of `Config`), then the YAML file `path`
    (nested mappings `algo: {estimator: kae}` and/or dotted keys `algo.estimator: kae`),
    then `key=value` overrides in order, each value read with YAML semantics and coerced
    to its option's type. Everything is validated; any problem raises ConfigError.
    `base` may be any dataclass tree built with `opt()`; it is not modified."""
    cls = Config if base is None else type(base)
    if not _is_section(cls):
        raise TypeError(f"base must be a dataclass instance, got {base!r}")
    target = _Target(cls, _to_data(cls, base if base is not None else cls()))
    if path is not None:
        target.apply_file(path)
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides or ():
        target.apply_override(text)
    return target.finish("base config" if base is not None else "default value")


def changed_options(cfg, base=None) -> list[str]:
    """The `key=value` overrides (values as JSON, which YAML reads back) that turn `base`
    (default: the defaults of `cfg`'s class) into `cfg`: to hand a config to a subprocess on
    top of some other file."""
    new = config_to_dict(cfg)
    old = config_to_dict(base if base is not None else type(cfg)())

    def value(data: dict, key: str):
        return functools.reduce(lambda node, name: node[name], key.split("."), data)

    return [f"{spec.key}={json.dumps(value(new, spec.key))}" for spec in _specs(type(cfg))
            if value(new, spec.key) != value(old, spec.key)]


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML (every option, nested by section); `load_config(path)` reads it
    back to an equal config. Parent directories are created."""
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
    """Every option, grouped by section, one `key (type, default X) help [choices: a|b]`
    line each (for `frugalrl train --help`)."""
    groups: dict[str, list[FieldSpec]] = {}
    for spec in _specs(Config if cls is None else cls):
        groups.setdefault(spec.section, []).append(spec)
    lines = []
    for section, specs in groups.items():
        lines.append(f"{section} options:" if section else "general options:")
        lines += ["  " + spec.describe() for spec in specs]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
