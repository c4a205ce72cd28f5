"""The ``bench.*`` options of each bench (``frugalrl bench NAME bench.KEY=VALUE``).

Kept apart from the benches themselves so that the command line can list them without
importing torch. They are ``config.opt`` dataclasses, loaded and checked by ``load_config``
like the run config.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugalrl.config import opt


@dataclass
class ValueOptions:
    probes: int = opt(32, "probe prompts: the first N held-out prompts", min=2)
    mc_samples: int = opt(64, "samples per probe prompt for its Monte Carlo value V(x) at each checkpoint", min=2)
    every: int = opt(10, "a checkpoint (V(x) and every estimator's baseline) every N training steps", min=1)
    groups: list[int] = opt([1, 2, 4, 8], "group sizes G to compare")
    results_dir: str = opt("bench/results", "where value.md, value.png and summary.json are written")


@dataclass
class RolloutOptions:
    batches: list[int] = opt([64, 256], "prompts per generate call, one measurement each")
    new_tokens: int = opt(48, "tokens generated per prompt (EOS disabled, so every sampler makes exactly this many)",
                          min=1)
    rounds: int = opt(5, "alternating fastgen / Hugging Face rounds per batch size (median reported)", min=1)
    matmul_size: int = opt(2048, "n of the n x n matmul timed for the machine's FLOP/s", min=16)
    results_dir: str = opt("bench/results", "where rollout.md, rollout.png and summary.json are written")


OPTIONS = {"value": ValueOptions, "rollout": RolloutOptions}
