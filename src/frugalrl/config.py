"""Run configuration: a pydantic model per section, rules between options, YAML and key=value loading (see docs/)."""

import collections
import contextlib
import difflib
import functools
import itertools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

def opt(default, help: str, **bounds):  # an option: its default, one help line, pydantic's bounds (ge, gt, le, lt)
    return Field(default, description=help, **bounds)

def _number(value):  # a number as YAML gives it, where pydantic's lax mode differs: no boolean; 1e3 (text to PyYAML)
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return int(float(value)) if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+[eE]\+?\d\d?\s*", value) else value
Int, Float = Annotated[int, BeforeValidator(_number)], Annotated[float, BeforeValidator(_number)]

def default_cache_dir() -> str:  # model.cache_dir when empty: the user's cache, as Hugging Face and pip use it
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "frugalrl")
# a cache directory option: empty = default_cache_dir() (read from the environment when a config is made), ~ expanded
CacheDir = Annotated[str, AfterValidator(lambda v: os.path.expanduser(v) if v else default_cache_dir()),
                     Field(validate_default=True)]

class Section(BaseModel):  # a section of options: no unknown key, numbers read as text by text options, no inf/nan
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False)

class ModelConfig(Section):
    name_or_path: str = opt("", "Hugging Face model directory, .gguf file or shipped name (smollm2-135m-instruct); "
                            "empty = the embedded tiny model")
    gguf_file: str = opt("", "GGUF file in name_or_path (or its path), dequantised once into model.cache_dir")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "weights dtype (float32 on CPU: bf16 is slow)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the policy trains: auto = cuda if torch sees a GPU")
    cache_dir: CacheDir = opt("", "where built models are cached; empty = $XDG_CACHE_HOME/frugalrl, else "
                              "~/.cache/frugalrl")
    sft_steps: Int = opt(3000, "embedded model: most SFT warm-up steps", ge=0)
    sft_target_accuracy: Float = opt(0.3, "embedded model: the warm-up stops at this check accuracy (0: no checks)",
                                     ge=0, le=1)
    sft_patience: Int = opt(5, "embedded model: stop the warm-up after N checks without a new best, once halfway to "
                            "the target (0 = never)", ge=0)
    sft_max_wall_s: Float = opt(270.0, "embedded model: stop the warm-up after this many seconds (0 = no limit)", ge=0)
    sft_eval_every: Int = opt(50, "embedded model: check the warm-up's accuracy every N steps", ge=1)
    sft_eval_size: Int = opt(256, "embedded model: held-out training problems the warm-up is checked on", ge=1)
    sft_lr: Float = opt(2e-3, "embedded model: supervised warm-up learning rate", gt=0)
    sft_batch: Int = opt(64, "embedded model: supervised warm-up batch size", ge=1)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, more compute")
class LoraConfig(Section):
    r: Int = opt(0, "LoRA rank (0 = off: train every weight)", ge=0)
    alpha: Float = opt(16.0, "LoRA scale: the adapter's output is multiplied by alpha / r", gt=0)
    dropout: Float = opt(0.0, "dropout on the adapter's input, in the training passes only", ge=0, lt=1)
    target_modules: list[str] = opt(["all-linear"], "layers given an adapter (q_proj, ...; all-linear: not the head)")
    save: Literal["merged", "adapter"] = opt("merged", "what model/ holds: the merged model, or the adapter alone")
class DataConfig(Section):
    source: Literal["arithmetic", "jsonl", "reasoning_gym"] = opt("arithmetic", "where prompts come from")
    train_path: str = opt("", "data file (.jsonl, .csv, .parquet, save_to_disk dir); replaces the built-in task")
    eval_path: str = opt("", "data file for evaluation (same formats); empty = a held-out split")
    prompt_field: str = opt("prompt", "data files: the prompt column (text or chat messages)")
    answer_field: str = opt("answer", "data files: the reference answer column (rewards get it as answer=)")
    max_prompt_tokens: Int = opt(0, "drop (and count) prompts longer than this, in tokens (0 = keep all)", ge=0)
    chat_template: Literal["auto", "on", "off"] = opt("auto", "use the tokenizer's chat template (auto: if it has one)")
    system_prompt: str = opt("", "system message put before each prompt when the chat template is used")
    difficulty: Int = opt(2, "built-in task: number of operations after the first sum (1..3)", ge=1, le=3)
    train_size: Int = opt(20000, "built-in task: number of training problems", ge=1)
    eval_size: Int = opt(256, "held-out problems for evaluation (never trained on)", ge=1)
    seed: Int = opt(-1, "seed of the train/eval split; -1 = the run's seed", ge=-1)
    sticky_steps: Int = opt(1, "reuse each prompt mini-batch for this many steps in a row (KAE needs > 1)", ge=1)
    task: str | list[str] = opt("", "reasoning_gym: generator name (chain_sum), or a list of them to mix")
    task_weights: list[Float] = opt([], "reasoning_gym: sampling weight of each data.task (empty = equal)")
    task_config: dict[str, Any] = opt({}, "reasoning_gym: generator options, one mapping per task if several")
    size: Int = opt(0, "reasoning_gym: training items to generate (0 = data.train_size)", ge=0)
    answer_extract: Literal["answer_tags", "boxed", "last_line", "marker"] = opt(
        "answer_tags", "reasoning_gym: where a completion's answer is read")
    prompt_template: str = opt("", "prompt text with {fields} of the row or item; empty = the prompt as is")
    partial_credit: bool = opt(False, "reasoning_gym: reward = the task's score (false: 1 for full marks, else 0)")
class RolloutConfig(Section):
    batch_prompts: Int = opt(64, "prompts per rollout batch", ge=1)
    group_size: Int = opt(4, "completions per prompt, G", ge=1)
    temperature: Float = opt(0.7, "sampling temperature, also of the log-probs (astar needs 1.0)", gt=0)
    top_p: Float = opt(1.0, "nucleus sampling mass", gt=0, le=1)
    max_new_tokens: Int = opt(48, "longest completion, in tokens", ge=1)
    backend: Literal["hf", "vllm"] = opt("hf", "what samples the rollouts: this process (hf) or a vLLM engine")
    vllm_gpu_memory: Float = opt(0.3, "vllm: share of the GPU's memory for the engine", gt=0, le=1)
    vllm_sleep: bool = opt(True, "vllm: release the engine's GPU memory between rollouts (sleep mode)")
    allocation: Literal["uniform", "skip", "budget"] = opt("uniform", "which prompts a step rolls out, how many each")
    candidates: Int = opt(0, "budget: prompts considered per step (0 = 2 x batch_prompts)", ge=0)
    min_per_prompt: Int = opt(2, "budget: fewest completions of a prompt that is rolled out", ge=1)
    max_per_prompt: Int = opt(8, "budget: most completions of one prompt", ge=1)
    skip_floor: Float = opt(0.1, "skip: the least chance that a considered prompt is rolled out", gt=0, le=1)
    passrate_prior: Literal["population", "vstar", "cross_prompt"] = opt("population", "prior of pass-rate estimates")
    passrate_strength: Float = opt(0.0, "weight of the prior in a pass-rate estimate, in samples (0 = fitted)", ge=0)
    passrate_memory: Float = opt(0.0, "pass rate: a visit made s steps ago weighs exp(-s / this), in steps "
                                 "(0 = fitted)", ge=0)
    prior_neighbors: Int = opt(32, "cross_prompt prior: similar prompts it averages", ge=1)
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: replace groups of all-equal rewards")
    dynamic_max_rounds: Int = opt(4, "dynamic_sampling: most rollout rounds per step", ge=1)
class AlgoConfig(Section):
    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "kae", "astar"] = opt(
        "rloo", "advantage estimator: each sample's reward minus a baseline")
    loss: Literal["auto", "pg", "astar", "ppo"] = opt("auto", "policy loss (auto: astar if estimator=astar, else pg)")
    policy_loss = property(lambda s: s.loss if s.loss != "auto" else "astar" if s.estimator == "astar" else "pg")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = opt(
        "seq-mean-token-sum", "how token losses become one number")
    clip_low: Float = opt(0.2, "PPO clip: lower bound 1-clip_low on the ratio", ge=0)
    clip_high: Float = opt(0.2, "PPO clip: upper bound 1+clip_high on the ratio", ge=0)
    kae_kernel: Literal["triangular", "exponential"] = opt("triangular", "KAE kernel")
    kae_bandwidth: Float = opt(10.0, "KAE bandwidth h", gt=0)
    kae_bandwidth_mode: Literal["window", "relative", "auto"] = opt("window", "KAE distance: (i-s)/h or (i-s)/(i*h)")
    kae_auto_c: Float = opt(1.0, "KAE auto bandwidth: h = kae_auto_c * N(x)^(-1/3)", gt=0)
    kae_scale: Literal["none", "batch"] = opt("none", "KAE: divide advantages by their batch std (unconfirmed)")
    kae_prior: Literal["none", "population", "cross_prompt", "vstar"] = opt(
        "none", "KAE: shrink each baseline toward the prompt's pass-rate prior (rollout.passrate_* explain)")
    reinforce_baseline: Literal["loo", "none"] = opt("loo", "REINFORCE baseline")
    vstar_n: Int = opt(8, "A*-PO stage 1: reference samples per training prompt (at temperature 1)", ge=1)
    vstar_path: str = opt("", "A*-PO: V* cache file (JSON); empty = one under model.cache_dir")
    vstar_prompts: Int = opt(0, "A*-PO: use only the first N training prompts (0 = all)", ge=0)
    vstar_drop_unsolved: bool = opt(False, "A*-PO: train only on prompts that some stage-1 sample solved")
    astar_beta1: Float = opt(0.5, "A*-PO: V* = beta1 * log mean exp(r / beta1) (0 = plain mean)", ge=0)
    astar_beta2: Float = opt(1e-3, "A*-PO: loss (beta2 * log(pi/pi_ref) - (r - V*))^2", gt=0)
    kl_coef: Float = opt(0.0, "weight of the KL penalty to pi_ref, as kl_estimator says (0 = off: no reference)", ge=0)
    kl_estimator: Literal["k2", "k3", "k1_reward"] = opt("k2", "k2 = loss with the gradient of KL(pi || pi_ref); "
                                                         "k3 = GRPO's, of KL(pi_ref || pi); k1_reward = in the reward")
    entropy_coef: Float = opt(0.0, "entropy bonus: this times the token entropy off the loss", ge=0)
    gae_gamma: Float = opt(1.0, "PPO: GAE discount over completion tokens", ge=0, le=1)
    gae_lambda: Float = opt(1.0, "PPO: GAE lambda (1 = Monte-Carlo returns minus values)", ge=0, le=1)
    value_clip: Float = opt(0.2, "PPO: most change of the critic's prediction per update", gt=0)
class TrainConfig(Section):
    lr: Float = opt(2e-4, "AdamW learning rate (3e-4 collapses the embedded model)", gt=0)
    warmup_steps: Int = opt(10, "linear learning-rate warm-up, in optimizer steps", ge=0)
    lr_schedule: Literal["constant", "cosine"] = opt("cosine", "learning rate after warm-up (cosine: to 0 at the end)")
    weight_decay: Float = opt(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: Float = opt(1.0, "gradient-norm clip (0 = off)", ge=0)
    micro_batch: Int = opt(16, "sequences per forward/backward pass (sets memory, not the update)", ge=1)
    share_prompts: bool = opt(True, "pack a micro-batch into one sequence, each distinct prompt (and a prefix all "
                              "prompts start with) once, no padding, a tree-shaped attention mask, where that "
                              "costs less, attention included (whole rows under flash-attention)")
    filter_threshold: Float = opt(0.0, "skip samples with |advantage| <= this before their forward pass", ge=0)
    ppo_epochs: Int = opt(1, "passes over each rollout batch (> 1 = off-policy updates with the PPO clip)", ge=1)
    mini_batches: Int = opt(1, "optimizer steps per pass over the rollout batch (> 1 = off-policy)", ge=1)
    critic_lr: Float = opt(1e-3, "PPO: AdamW learning rate of the critic (value head)", gt=0)
    max_bad_steps: Int = opt(5, "NaN/inf steps are skipped; stop after this many in a row", ge=1)
    strategy: Literal["ddp", "fsdp"] = opt("ddp", "data parallelism under torchrun: ddp, or fsdp (sharded)")
    fsdp_reshard_after_forward: bool = opt(True, "fsdp: free gathered weights after each layer's forward")
    fsdp_cpu_offload: bool = opt(False, "fsdp on GPUs: keep shards and optimizer state in CPU memory")
class RewardConfig(Section):
    funcs: list[str] = opt([], "reward functions, summed (math, format, module:function, ...); empty = the task's")
    weights: list[Float] = opt([], "weight of each of reward.funcs (empty = 1 each)")
    on_error: Literal["raise", "zero"] = opt("raise", "a reward function that fails: stop, or score 0 and count it")
    timeout_s: Float = opt(0.0, "deadline per reward-function call, seconds (0 = none; > 0: in a worker)", ge=0)
class EvalConfig(Section):
    pass_k: Int = opt(4, "k for pass@k (sampled at temperature eval.temperature); 0 = off", ge=0)
    temperature: Float = opt(1.0, "sampling temperature for pass@k", gt=0)
    log_examples: Int = opt(4, "held-out completions logged to the trackers at each evaluation (0 = none)", ge=0)

class Config(Section):
    max_steps: Int = opt(600, "training steps, one rollout batch each", ge=1)
    seed: Int = opt(0, "random seed (python, numpy, torch, data)", ge=-2**63, le=2**64 - 1)  # torch's range
    output_dir: str = opt("runs/latest", "run directory: config, metrics, plots, checkpoints, final model")
    resume: str = opt("", "run directory to continue (`--resume DIR`; output_dir must be the same)")
    save_every: Int = opt(0, "checkpoint every N steps and at the last (0 = only the final model)", ge=0)
    save_total_limit: Int = opt(0, "keep only the newest N checkpoints (0 = keep all)", ge=0)
    eval_every: Int = opt(50, "evaluate every N steps (0 = off)", ge=0)
    max_wall_s: Float = opt(480.0, "stop after this many seconds of training, evaluation excluded (0 = none)", ge=0)
    threads: Int = opt(0, "torch CPU threads (0 = torch's default)", ge=0)
    log_every: Int = opt(0, "without a terminal, a progress line every N steps (0 = ~20 a run)", ge=0)
    report_to: str | list[str] = opt([], "experiment trackers: tensorboard, wandb, mlflow, trackio ([] or none)")
    project: str = opt("frugalrl", "the trackers' project (W&B project, MLflow experiment, trackio project)")
    run_name: str = opt("", "the run's name in the trackers (empty = the name of output_dir)")
    model: ModelConfig = Field(default_factory=ModelConfig)  # per config: its cache_dir default reads the environment
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    train: TrainConfig = TrainConfig()
    reward: RewardConfig = RewardConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _rules(self):  # the rules between options, once pydantic has checked each one
        ro, a, est, w = self.rollout, self.algo, self.algo.estimator, self.reward.weights
        group, budget, g = est in ("grpo", "dr_grpo", "rloo"), ro.allocation == "budget", ro.group_size
        loss, base = a.policy_loss, f" (reinforce_baseline={a.reinforce_baseline})" * (est == "reinforce")
        agg = a.loss_agg != type(a).model_fields["loss_agg"].default
        off = [k for k, v in VSTAR_SAMPLING.items() if getattr(ro, k) != v]  # sampled unlike A*-PO's stage 1
        for broken, why in [
            (group and g < 2, f"algo.estimator={est} needs rollout.group_size >= 2 (or use kae or reinforce)"),
            (budget and ro.min_per_prompt > ro.max_per_prompt, "rollout.min_per_prompt exceeds rollout.max_per_prompt"),
            (budget and group and ro.min_per_prompt < 2, f"algo.estimator={est} needs rollout.min_per_prompt >= 2"),
            (budget and (ro.candidates or 2 * ro.batch_prompts) * ro.max_per_prompt < ro.batch_prompts * g,
             "rollout.allocation=budget cannot spend a step's completions: raise rollout.candidates or max_per_prompt"),
            (ro.candidates and ro.candidates < ro.batch_prompts, f"rollout.candidates={ro.candidates} is below "
             f"rollout.batch_prompts={ro.batch_prompts}, which are all considered: raise it (0 = 2 x batch_prompts)"),
            (ro.dynamic_sampling and ro.allocation != "uniform", "rollout.dynamic_sampling needs allocation=uniform"),
            (ro.dynamic_sampling and not group, f"rollout.dynamic_sampling drops groups of equal rewards, which under "
             f"algo.estimator={est} still carry advantages: use grpo, dr_grpo or rloo, or turn it off"),
            (loss == "ppo" and (est, a.reinforce_baseline) != ("reinforce", "none"), "algo.loss=ppo takes its "
             f"advantages from its critic's GAE, not from algo.estimator={est}{base}: set algo.estimator=reinforce "
             "algo.reinforce_baseline=none, as configs/ppo.yaml does"),
            (loss == "ppo" and self.train.filter_threshold > 0, "train.filter_threshold has no effect under "
             "algo.loss=ppo, whose critic learns from every sample: set it to 0"),
            (loss == "astar" and est != "astar", f"algo.loss=astar regresses on r - V*, which algo.estimator={est} "
             "does not give: set algo.estimator=astar (or algo.loss=pg)"),
            (loss == "astar" and agg and not (a.entropy_coef or a.kl_coef), f"algo.loss_agg={a.loss_agg} has no "
             "effect under algo.loss=astar, which sums each completion's log-probs (loss_agg weighs only the "
             "entropy_coef and kl_coef terms): remove it"),
            (loss == "astar" and a.kl_coef and a.kl_estimator == "k1_reward", "algo.kl_estimator=k1_reward puts the KL "
             "in the policy gradient's reward, which algo.loss=astar does not read: use k2 or k3"),
            (ro.passrate_prior == "vstar" and est != "astar", "rollout.passrate_prior=vstar needs estimator astar"),
            (a.kae_prior != "none" and est != "kae", f"algo.kae_prior={a.kae_prior} shapes KAE's baseline, and "
             f"algo.estimator={est} has none: set algo.kae_prior=none (or algo.estimator=kae)"),
            (w and len(w) != len(self.reward.funcs), "reward.weights: give one weight per function, or none (1 each)"),
            (est == "astar" and off, "algo.estimator=astar compares each reward with V* of the reference sampled at "
             "temperature 1.0 and top_p 1.0, but " + " and ".join(f"rollout.{k}={getattr(ro, k)}" for k in off)
             + " samples another distribution; set " + " and ".join(f"rollout.{k}=1.0" for k in off)),
            (self.resume and os.path.abspath(self.resume) != os.path.abspath(self.output_dir),
             f"resume={self.resume} continues that run in place: output_dir must be the same directory")]:
            if broken:
                raise ValueError(why)
        from frugalrl import tracking  # here: tracking builds on this module
        tracking.backends(self.report_to)  # an unknown or uninstalled tracker: a ValueError before any work
        return self

VSTAR_SAMPLING = {"temperature": 1.0, "top_p": 1.0}  # how A*-PO's stage 1 samples the reference; stage 2 must match
_RETIRED = {("algo.estimator", "gae"): "algo.estimator=gae is now algo.loss=ppo (PPO's critic and GAE are a loss): set "
            "algo.loss=ppo algo.estimator=reinforce algo.reinforce_baseline=none, as configs/ppo.yaml does",
            ("algo.kl_estimator", "k1"): "algo.kl_estimator=k1 as a loss has expected gradient 0 (it only adds noise): "
            "set algo.kl_estimator=k1_reward for k1 in the reward (as PPO-RLHF), or k2 for a loss with the gradient "
            "of KL(pi || pi_ref)"}

# --- Machinery, generic over any tree of `Section`s: adding an option above needs no change below.
class ConfigError(ValueError):
    """A configuration problem, with a short message that says what to change."""

class FieldSpec(collections.namedtuple("FieldSpec", "key type default help choices ge le gt lt", defaults=(None,) * 5)):
    """One option of a config tree, flattened: `key` is dotted ("algo.estimator"); ge/le/gt/lt are its bounds."""
    section = property(lambda self: self.key.rpartition(".")[0])  # "" for a top-level option
    type_name = property(lambda s: re.sub(r"<class '(\w+)'>|typing\.|Annotated\[(\w+),[^]]*]", r"\1\2", str(s.type)))
    def range_text(self) -> str:  # the bounds in words (">= 1", "> 0 and <= 1"), or ""
        bounds = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        return " and ".join(f"{op} {format_value(bound)}" for op, bound in bounds if bound is not None)
    def describe(self) -> str:  # one help line: `key (type, default X) help [choices: a|b] [range: >= 1]`
        allowed = f" [choices: {'|'.join(map(format_value, self.choices))}]" if self.choices else ""
        allowed += f" [range: {self.range_text()}]" if self.range_text() else ""
        return f"{self.key} ({self.type_name}, default {format_value(self.default)}) {self.help}{allowed}"

def field_specs(cls=None, prefix: str = "") -> list[FieldSpec]:
    """Every option of the model tree `cls` (default `Config`), flattened to dotted keys, in declaration order."""
    out = []
    for name, f in (cls or Config).model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):  # a section
            out += field_specs(f.annotation, f"{prefix}{name}.")
        else:
            choices = get_args(f.annotation) if get_origin(f.annotation) is Literal else None
            bounds = {k: getattr(m, k) for m in f.metadata for k in ("ge", "le", "gt", "lt") if hasattr(m, k)}
            tp = type(choices[0]) if choices else f.annotation
            out.append(FieldSpec(prefix + name, tp, f.default, f.description, choices, **bounds))
    return out

def format_value(value) -> str:  # a value as one would type it: text as is where YAML reads it back so, else JSON
    with contextlib.suppress(Exception):
        if isinstance(value, str) and value.strip() == value != "" and yaml.safe_load(value) == value:
            return value
    return json.dumps(value, ensure_ascii=False, default=str)

def config_to_dict(cfg) -> dict:
    """The config as nested plain dicts/lists/scalars (a deep copy; what `save_config` writes)."""
    return cfg.model_dump(mode="json", warnings=False)

def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"algo": {"estimator": "kae"}} -> {"algo.estimator": "kae"}."""
    parts = [flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v} for k, v in data.items()]
    return {key: value for part in parts for key, value in part.items()}

def _get(tree: dict, key: str):  # the value of the dotted `key` in nested dicts
    return functools.reduce(dict.__getitem__, key.split(".") if key else [], tree)

class _Loader(yaml.SafeLoader):  # rejects a key given twice in one mapping
    def construct_mapping(self, node, deep=False):
        seen = []  # a list: keys may be unhashable (SafeLoader reports those)
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag != "tag:yaml.org,2002:merge":
                seen.append(self.construct_object(key_node, deep=True))
                if seen[-1] in seen[:-1]:
                    raise yaml.MarkedYAMLError(None, None, f"found duplicate key {seen[-1]!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

def _yaml(text: str, what: str):  # `text` read as YAML, or ConfigError "{what} at line L, column C: the problem"
    try:
        return yaml.load(text, Loader=_Loader)
    except Exception as e:  # YAMLError, and the odd ValueError/RecursionError on absurd input
        mark, why = getattr(e, "problem_mark", None), " ".join(str(getattr(e, "problem", None) or e).split())
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what}{at}: {why}") from None

def _unknown(specs: dict, sections: set, key: str, where: str) -> ConfigError:  # `key` is no option: say what it is
    above = [key.rsplit(".", i)[0] for i in range(key.count(".") + 1)]  # the key and its sections, the longest first
    if option := next((k for k in above if k in specs), None):
        return ConfigError(f"{where}: '{option}' is an option, not a section; write {option}=VALUE")
    section, leaf = next((k for k in above if k in sections), ""), "." + key.rpartition(".")[2]
    close = [k for k in difflib.get_close_matches(key, [*specs, *sections]) if k not in above]  # not its own section
    close = [] if key == section else close + [k for k in specs if k.endswith(leaf)]
    hint = ("did you mean " + " or ".join(dict.fromkeys(close)) + "?" if close else f"section '{section}' has: "
            + ", ".join(k for k in specs if k.startswith(section + ".")) if section else "`--help` lists all options")
    what = f"'{key}' is a section, not a single option" if key == section else f"unknown key {key!r}"
    return ConfigError(f"{where}: {what}; {hint}")

def _bad_value(error: dict, specs: dict, origin: dict, default_where: str) -> ConfigError:  # from pydantic's error
    if not error["loc"]:  # a rule between options
        return ConfigError(str(error["ctx"]["error"]))
    loc = ".".join(map(str, error["loc"]))
    key = max((k for k in specs if f"{loc}.".startswith(f"{k}.")), key=len)
    spec, value, where = specs[key], error["input"], origin.get(key, default_where)
    if isinstance(value, str) and (key, value) in _RETIRED:
        return ConfigError(f"{where}: {_RETIRED[key, value]}")
    close = difflib.get_close_matches(str(value), list(map(str, spec.choices or ())), n=1)
    hint = {"dict_type": "; write a YAML mapping such as {a: 1}", "string_type": "; put it in quotes to mean the text"}
    hint = f"; did you mean {close[0]!r}?" if close else hint.get(error["type"], "")
    given = repr(value) if isinstance(value, str) else format_value(value)  # 'text' in quotes, other values as YAML has them
    where += f": bad value for '{loc if get_origin(spec.type) in (list, tuple, dict) else key}'"  # a list item: its loc
    return ConfigError(f"{where} (expected {spec.type_name}{' ' * bool(spec.range_text())}{spec.range_text()}), got "
                       f"{given}: {error['msg'].removeprefix('Value error, ')}{hint}")

def load_config(path: str | os.PathLike | None = None, overrides=(), base=None):
    """The config: `base` (default: `Config()`; any tree of `Section`s, left as is), then the YAML file `path` (nested
    and/or dotted keys), then `key=value` overrides in order (YAML for the option's type), validated: or ConfigError."""
    cls = Config if base is None else type(base)
    specs, tree, origin = {s.key: s for s in field_specs(cls)}, config_to_dict(cls() if base is None else base), {}
    sections = {k.rsplit(".", n)[0] for k in specs for n in range(1, k.count(".") + 1)}
    def put(key, value, where: str, raw: str | None = None) -> None:  # raw: an override's value text
        key = ".".join(part.strip().replace("-", "_") for part in str(key).strip().split("."))
        if raw is not None and (key in specs or key in sections):  # text options keep the text as typed, unless quoted
            names, quoted = specs[key].type_name.split(" | ") if key in specs else [], raw.strip()[:1] in ("'", '"')
            value = raw if "str" in names and not quoted else _yaml(raw, f"{where}: bad YAML")
            value = None if "None" in names and raw.strip().lower() in ("null", "none", "~", "") else value
        if origin.get(key) is where:  # each file and each override has its own `where`
            raise ConfigError(f"{where}: '{key}' is set twice")
        if key in specs:
            _get(tree, key.rpartition(".")[0])[key.rpartition(".")[2]], origin[key] = value, where
        elif key in sections and isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}.{k}", v, where)
        elif key not in sections or value is not None or raw is not None:  # `algo:` alone sets nothing
            raise _unknown(specs, sections, key, where)
    where = f"config file {str(path)!r}"
    try:
        data = None if path is None else _yaml(Path(path).read_text(encoding="utf-8"), f"{where} is not valid YAML")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {where}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"{where} must hold a mapping of options, not {type(data).__name__}")
    for key, value in (data or {}).items():
        put(key, value, where)
    for text in [overrides] if isinstance(overrides, str) else overrides or ():
        key, eq, raw = str(text).partition("=")
        if not eq or not key.strip():
            name, dashes = str(text).strip().lstrip("-").replace("-", "_"), str(text).lstrip()[:1] == "-"
            raise ConfigError(f"override {text!r} is not of the form key=value (e.g. max_steps=100)"
                              + (f"; write {name}=VALUE" if name in specs else "") + ", without dashes" * dashes)
        put(key, None, f"override {text!r}", raw)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise _bad_value(e.errors()[0], specs, origin, "default value" if base is None else "base config") from None

def apply_overrides(cfg, overrides=()):
    """A validated copy of `cfg` with `key=value` overrides applied in order (`cfg` is not changed): ConfigError if an
    option has a wrong type, choice or range, or a rule between options fails."""
    return load_config(None, overrides, base=cfg)

validate_config = apply_overrides  # validate_config(cfg): ConfigError if `cfg` is not a valid config

def changed_options(cfg, base=None) -> list[str]:
    """The `key=value` overrides (JSON values, which YAML reads) that turn `base` (default: the defaults) into `cfg`."""
    new, old = config_to_dict(cfg), config_to_dict(type(cfg)() if base is None else base)
    keys = [s.key for s in field_specs(type(cfg))]
    return [f"{k}={json.dumps(_get(new, k))}" for k in keys if _get(new, k) != _get(old, k)]

def save_config(cfg, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML (every option, nested by section); `load_config(path)` reads it back to an equal config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # escapes, not unicode: PyYAML folds U+0085 in quoted text
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, width=100), encoding="utf-8")

def format_help(cls=None) -> str:
    """Every option, grouped by section, one `key (type, default X) help [choices: a|b]` line each (for `--help`)."""
    groups = itertools.groupby(field_specs(cls), lambda spec: spec.section or "general")
    return "\n\n".join(f"{name} options:\n" + "\n".join(f"  {s.describe()}" for s in specs)
                       for name, specs in groups) + "\n"
