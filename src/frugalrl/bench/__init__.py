"""``frugalrl bench NAME [key=value ...]``: the measurements behind frugalrl's claims.

One module per bench, each with ``TRAIN_DEFAULTS`` (key=value pairs of the run config that
suit it, applied before ``--config`` and the command line) and
``run(cfg, opts, command, console) -> dict`` (writes ``NAME.md``, ``NAME.png`` and merges
its headline numbers, which it returns, into ``summary.json``; ``report.py``, which also
puts the commit, the date and the bench's wall time on the page). Options
prefixed ``bench.`` are the bench's own (``options.py``); every other ``key=value`` is an
option of the run config, as for ``frugalrl train``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from rich.console import Console

from frugalrl.bench import report
from frugalrl.bench.options import OPTIONS
from frugalrl.config import ConfigError, format_help, load_config

BENCHES = {
    "value": "MSE of each estimator's baseline against Monte Carlo values V(x), along a training run",
    "grad": "MSE of each estimator's policy gradient against the Monte Carlo-baseline one and the true one, "
            "along a training run",
    "rollout": "generation tokens/s: frugalrl's sampler vs Hugging Face generate vs the machine's FLOP/s",
    "train": "every preset from one SFT checkpoint, several seeds, equal samples: accuracy, time to target, memory",
    "budget": "where a step's completions go on finite pools: uniform RLOO vs dynamic sampling, skip and budget "
              "allocation, 3 seeds x 2 tasks: time and completions to target, the priors' calibration",
    "real": "SmolLM2-135M-Instruct on the demo-real task: RLOO, REINFORCE, KAE J=8/J=4, PPO and skip at equal "
            "samples, 2 seeds: which conclusions of the toy benches hold on a real model",
    "peer": "frugalrl's GRPO vs TRL's GRPOTrainer, same model, task, G and budget: s/step, peak RSS, accuracy",
    "warmup": "the embedded model's SFT warm-up for several seeds and pool sizes: steps, accuracy reached, time",
    "demo": "`frugalrl demo` for several seeds, each from an empty model cache: accuracy before and after RL, gain, "
            "wall time",
    "tasks": "`frugalrl train` on reasoning-gym tasks nobody tuned for (max_steps=2), each from an empty model "
             "cache: wall time with the warm-up, and how the warm-up ended",
    "profile": "one training step under torch.profiler: seconds and share of each phase (generate, reward, ..., "
               "optimizer) and the operators with the most self time",
    "scale": "peak RSS per process of train.strategy=ddp vs fsdp under torchrun (2 processes), on the largest "
             "model that fits comfortably",
}
PREFIX = "bench."


def options_help() -> str:
    """The ``bench.*`` options of every bench, for ``frugalrl bench --help``."""
    return "\n".join(f"bench {name} ({PREFIX}KEY=VALUE):\n" + format_help(OPTIONS[name]).split(":\n", 1)[1]
                     for name in BENCHES)


def configure(name: str, config_path: str | None, overrides: list[str]):
    """(bench module, run config, bench options) for ``frugalrl bench NAME``; ConfigError on bad options.

    The run config is the defaults, then ``bench.base_config`` (for the benches that have one: the
    file their runs start from), then the bench's ``TRAIN_DEFAULTS``, then ``--config``, then the
    command line's run options."""
    module = importlib.import_module(f"frugalrl.bench.{name}")
    try:
        opts = load_config(None, [o[len(PREFIX):] for o in overrides if o.startswith(PREFIX)], base=OPTIONS[name]())
    except ConfigError as e:  # its message names the key without the prefix
        raise ConfigError(f"{PREFIX}* option of bench {name}: {e} (`frugalrl bench --help` lists them)") from None
    base_file = getattr(opts, "base_config", None)
    if base_file and not Path(base_file).is_file():
        raise ConfigError(f"{PREFIX}base_config={base_file}: no such file; run the bench from the repository root")
    base = load_config(base_file, module.TRAIN_DEFAULTS)
    cfg = load_config(config_path, [o for o in overrides if not o.startswith(PREFIX)], base=base)
    return module, cfg, opts


def run(name: str, config_path: str | None, overrides: list[str], console: Console) -> dict:
    """Run bench ``name``; returns the numbers it merged into summary.json."""
    module, cfg, opts = configure(name, config_path, overrides)
    from frugalrl.models import cpu_threads

    with cpu_threads(cfg.threads):
        report.start(opts.results_dir)
        return module.run(cfg, opts, report.command_line(name, config_path, overrides), console)
