"""The ``bench.*`` options of each bench (``frugalrl bench NAME bench.KEY=VALUE``).

Kept apart from the benches themselves so that the command line can list them without
importing torch. They are pydantic models made with ``config.opt``, like the sections of the
run config, and loaded and checked by ``load_config`` like it.
"""

from __future__ import annotations

from typing import Literal

from frugalrl.config import Float, Int, Section, opt


class Labelled(Section):
    """The options of a bench whose pages for several models or settings live side by side."""

    label: str = opt("", "names the page BENCH-LABEL.md and marks its summary keys (e.g. real for SmolLM2; each "
                     "bench's protocol says how); empty: the bench's own page and keys", pattern=r"^[a-z0-9_]*$")

    def page(self, bench: str) -> str:
        """The page's name: ``bench``, or ``bench-LABEL``."""
        return f"{bench}-{self.label}" if self.label else bench


class ValueOptions(Section):
    probes: Int = opt(32, "probe prompts: the first N held-out prompts", ge=2)
    mc_samples: Int = opt(64, "samples per probe prompt for its Monte Carlo value V(x) at each checkpoint", ge=2)
    every: Int = opt(10, "a checkpoint (V(x) and every estimator's baseline) every N training steps", ge=1)
    groups: list[Int] = opt([1, 2, 4, 8], "group sizes G to compare")
    kae_preset: str = opt("configs/kae.yaml", "the KAE preset measured: its algo.kae_* options, and its prompt "
                          "schedule (rollout.batch_prompts, data.sticky_steps) over the run's training pool")
    kae_priors: list[str] = opt(["none", "population", "cross_prompt"], "algo.kae_prior values measured besides the "
                                "preset's, each as kae_<prior> (none, population, cross_prompt)")
    results_dir: str = opt("bench/results", "where value.md, value.png and summary.json are written")


class GradOptions(ValueOptions):
    """The value bench's probing, and so its options; the Monte Carlo samples also give, in two
    halves, the policy gradient the estimators aim at."""

    mc_samples: Int = opt(64, "samples per probe prompt for V(x) and (in two halves) the policy gradient at "
                          "each checkpoint", ge=4)
    kae_priors: list[str] = opt([], "algo.kae_prior values measured besides the preset's (each costs its gradients)")
    results_dir: str = opt("bench/results", "where grad.md, grad.png and summary.json are written")


class RolloutOptions(Labelled):
    batches: list[Int] = opt([64, 256], "prompts per generate call, one measurement each")
    new_tokens: Int = opt(48, "tokens generated per prompt (EOS disabled, so every sampler makes exactly this many)",
                          ge=1)
    rounds: Int = opt(5, "alternating fastgen / Hugging Face rounds per batch size (median reported)", ge=1)
    matmul_size: Int = opt(2048, "n of the n x n matmul timed for the machine's FLOP/s", ge=16)
    group_size: Int = opt(1, "completions per prompt, as training samples them: B / G distinct prompts, each G "
                          "times (B a multiple of G)", ge=1)
    results_dir: str = opt("bench/results", "where the page, its plot and summary.json are written")


class TrainOptions(Section):
    runs: list[str] = opt(["grpo", "grpo_g8", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "kae", "astar", "dash",
                           "ppo"], "runs to make: presets of configs/ by name, and grpo_g8 (GRPO, 32 prompts x G=8)")
    seeds: list[Int] = opt([0, 1, 2, 3, 4], "seeds of every run")
    samples: Int = opt(38400, "sampled completions each run trains on (its steps: this / completions per step, "
                       "a whole number for every run)", ge=1)
    eval_every_samples: Int = opt(2560, "held-out accuracy read every N sampled completions, the same for every "
                                  "run (its eval_every: N / completions per step, a whole number for every run)",
                                  ge=1)
    target_run: str = opt("grpo_g8", "the run whose mean final accuracy sets the target accuracy")
    target_frac: Float = opt(0.9, "target = start + target_frac x (target_run's final accuracy - start)", gt=0, le=1)
    configs_dir: str = opt("configs", "where the presets are (the repository's configs/)")
    results_dir: str = opt("bench/results", "where train.md, train.png and summary.json are written")


class BudgetOptions(Section):
    tasks: list[str] = opt(["embedded", "gym-chain-sum"], "tasks: embedded (the built-in task) and gym-chain-sum "
                           "(configs/gym-chain-sum.yaml), each on a finite pool")
    runs: list[str] = opt(["uniform", "dynamic", "skip", "budget", "budget_cross"], "runs of every task: uniform "
                          "RLOO G=4 (the baseline, always run), dynamic (DAPO's dynamic sampling), skip, budget, "
                          "budget_cross (budget with the cross-prompt prior)")
    seeds: list[Int] = opt([0, 1, 2, 3, 4], "seeds of every run (intervals narrow as 1 / sqrt(seeds))")
    pool: Int = opt(2048, "training prompts of every task (data.train_size or data.size)", ge=64)
    steps: Int = opt(150, "training steps of every run (256 trained completions each)", ge=1)
    eval_every: Int = opt(10, "held-out accuracy read every N steps", ge=1)
    eval_size: Int = opt(1024, "held-out prompts of each reading (data.eval_size): standard error <= 0.5 / sqrt(N)",
                         ge=1)
    target_frac: Float = opt(0.95, "target = this x uniform's mean final accuracy", gt=0, le=1)
    dash_samples: Int = opt(38400, "DASH vs TRL's GRPOTrainer (embedded task, whole pool): sampled completions of "
                            "each run (0 = leave this comparison out)", ge=0)
    dash_eval_every_samples: Int = opt(2560, "DASH vs TRL: held-out accuracy read every N sampled completions",
                                       ge=1)
    dash_seeds: list[Int] = opt([0, 1, 2], "DASH vs TRL: seeds of both sides (apart from bench.seeds: its ratio "
                                "needs fewer)")
    configs_dir: str = opt("configs", "where the tasks' configs are (the repository's configs/)")
    results_dir: str = opt("bench/results", "where budget.md, budget-TASK.png and summary.json are written")


class RealOptions(Section):
    runs: list[str] = opt(["rloo_g4", "reinforce_g1", "kae_j8", "kae_j4", "ppo", "rloo_pool64", "skip"], "runs to "
                          "make (bench/real.py RUNS)")
    seeds: list[Int] = opt([0, 1], "seeds of every run (~50 minutes a seed alone on 2 cores)")
    samples: Int = opt(1280, "sampled completions each run trains on (64 a step)", ge=64)
    eval_every_samples: Int = opt(320, "held-out accuracy read every N sampled completions", ge=64)
    target_frac: Float = opt(0.9, "skip's target: start + target_frac x (rloo_pool64's final accuracy - start)",
                             gt=0, le=1)
    base_config: str = opt("configs/smollm2-arithmetic.yaml", "the runs' base config (model, task, LoRA, lr, lengths)")
    resume: bool = opt(False, "reuse the run directories that hold a finished run of the same config (an "
                       "interrupted bench, or more seeds on top of a finished page); else every run starts afresh")
    results_dir: str = opt("bench/results", "where real.md, real.png and summary.json are written")


class PeerOptions(Labelled):
    steps: Int = opt(50, "training steps (rollout batches) of every run, on both sides (so both sample steps x P x G "
                     "completions)", ge=2)
    warmup: Int = opt(2, "first steps of each run left out of its seconds per step", ge=1)
    rounds: Int = opt(5, "rounds, each a frugalrl run then a TRL run, round i at seed + i on both sides (means with "
                      "95 % intervals reported)", ge=1)
    trl: Literal["same", "defaults"] = opt("same", "same: TRL trains frugalrl's algorithm (grpo/dr_grpo); defaults: "
                                           "GRPOConfig's defaults but for the budget (G, completions per step, "
                                           "token limit, steps, precision), against frugalrl's run config as it is")
    eval_every: Int = opt(0, "held-out accuracy read every N steps on both sides (0: at the end only); > 0 gives "
                          "the time to reach target_frac x TRL's final accuracy", ge=0)
    target_frac: Float = opt(0.95, "time-to-target target: this x TRL's mean final accuracy", gt=0, le=1)
    resume: bool = opt(False, "reuse the run directories that hold a finished run of the same config")
    results_dir: str = opt("bench/results", "where peer.md, peer.png and summary.json are written")


class WarmupOptions(Section):
    seeds: list[Int] = opt([0, 1, 2, 3, 4], "seeds of the embedded model's warm-up (its initial weights, its data "
                           "split and its batches)")
    pools: list[Int] = opt([20000, 2048], "training pool sizes (data.train_size), each warmed up for every seed")
    results_dir: str = opt("bench/results", "where warmup.md, warmup.png and summary.json are written")


class DemoOptions(Section):
    seeds: list[Int] = opt(list(range(10)), "seeds of `frugalrl demo seed=S`, each run from an empty model cache")
    min_gain: Float = opt(0.3, "the gain in held-out accuracy (after - before RL) every seed should clear", ge=0, le=1)
    work_dir: str = opt("runs/bench-demo", "where each seed's run directory, model cache and log go")
    results_dir: str = opt("bench/results", "where demo.md and summary.json are written")


class TasksOptions(Section):
    tasks: list[str] = opt(["basic_arithmetic", "letter_counting", "base_conversion", "spell_backward",
                            "leg_counting"], "reasoning-gym tasks (data.task), each run from an empty model cache")
    budget_s: Float = opt(360.0, "the wall time each task's command should finish in, warm-up included", gt=0)
    work_dir: str = opt("runs/bench-tasks", "where each task's run directory, model cache and log go")
    results_dir: str = opt("bench/results", "where tasks.md and summary.json are written")


class ScaleOptions(Section):
    processes: Int = opt(2, "torchrun processes of each run (rollout.batch_prompts must split over them)", ge=2)
    rounds: Int = opt(1, "rounds, each a ddp run then an fsdp run (median reported)", ge=1)
    hidden_size: Int = opt(1024, "the bench's random Llama (unless model.name_or_path): hidden size", ge=8)
    layers: Int = opt(24, "the bench's random Llama: decoder layers", ge=1)
    intermediate_size: Int = opt(2816, "the bench's random Llama: MLP width", ge=8)
    heads: Int = opt(16, "the bench's random Llama: attention heads (hidden_size must be a multiple)", ge=1)
    results_dir: str = opt("bench/results", "where scale.md and summary.json are written")


class ProfileOptions(Labelled):
    skip: Int = opt(2, "training steps run before the profiled ones (the first pays for allocation and warm caches)",
                    ge=1)
    steps: Int = opt(2, "training steps recorded by the profiler (its table is per step: their mean)", ge=1)
    top: Int = opt(15, "operators listed, by self time per step", ge=1)
    results_dir: str = opt("bench/results", "where the page and summary.json are written")


OPTIONS = {"value": ValueOptions, "grad": GradOptions, "rollout": RolloutOptions, "train": TrainOptions,
           "budget": BudgetOptions, "real": RealOptions, "peer": PeerOptions, "warmup": WarmupOptions,
           "demo": DemoOptions, "tasks": TasksOptions, "scale": ScaleOptions, "profile": ProfileOptions}
