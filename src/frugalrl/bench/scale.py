"""Scale bench: peak memory per process of data-parallel training, ddp against fsdp.

Protocol of ``frugalrl bench scale``:

* Model: ``model.name_or_path``, or else a randomly initialised Llama of ``bench.hidden_size`` x
  ``bench.layers`` (MLP ``bench.intermediate_size``, ``bench.heads`` heads, tied embeddings,
  the embedded tokenizer; about 308 M parameters, 1.2 GB in float32, by default: the largest
  whose two ddp processes fit comfortably in this machine's 23 GB), written once under
  ``bench.results_dir``. Random weights are enough: memory does not depend on them.
* Runs: ``frugalrl train`` under ``torchrun --standalone --nproc_per_node bench.processes``, once
  with ``train.strategy=ddp`` and once with ``train.strategy=fsdp``, alternating, for
  ``bench.rounds`` rounds; the run config is the bench's (``TRAIN_DEFAULTS``, then the command
  line's options). ``algo.entropy_coef`` > 0 keeps every sample in the update, so that every
  step back-propagates and steps AdamW although the random model earns no reward.
* Memory: each process writes its own peak RSS (VmHWM, start-up to exit: imports, loading and
  sharding the model, training, saving ``model/``) as it exits; a run's figure is the largest
  over its processes, and a strategy's the median over rounds. Both run with glibc's mmap
  threshold fixed at 64 KiB (``MALLOC``), so that freed buffers leave the RSS. The headline is
  ``fsdp_to_ddp_peak_rss_ratio`` = fsdp's / ddp's. Seconds per step (``wall_s`` / steps of
  ``metrics.jsonl``) are reported next to it.

What to expect per process with N processes and P bytes of float32 weights: ddp holds the
weights, their gradients and AdamW's two moments, 4P; fsdp holds P/N of each, plus the whole
weights gathered for each rollout (``sharding.full_weights``), about (3/N + 1)P, plus what
every process has anyway (python, torch, transformers: a few hundred MB).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from frugalrl.bench.options import ScaleOptions
from frugalrl.bench.report import fmt, publish, table
from frugalrl.config import Config, save_config

TRAIN_DEFAULTS = ["output_dir=runs/bench-scale", "max_wall_s=0", "eval_every=0", "save_every=0", "max_steps=3",
                  "threads=1", "algo.estimator=grpo", "algo.entropy_coef=0.001", "rollout.batch_prompts=4",
                  "rollout.group_size=2", "rollout.max_new_tokens=16", "train.micro_batch=8", "train.lr=1e-5",
                  "train.warmup_steps=0", "data.train_size=256", "data.eval_size=16"]
STRATEGIES = ("ddp", "fsdp")
# glibc's malloc, left to itself, raises its mmap threshold after the first large free and then
# keeps freed buffers in its heap: FSDP gathers and frees each layer's weights at every pass, and
# the RSS would measure what glibc keeps, not what is in use (measured on a 85 M-parameter model:
# 1983 MB peak against 1207 MB with this setting). A fixed threshold returns large buffers to
# the system as they are freed; both strategies run with it.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def build_model(opts: ScaleOptions, path: Path) -> Path:
    """A random Llama of the bench's size with the embedded tokenizer at ``path`` (kept: built once)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from frugalrl import checkpoint, embedded

    if checkpoint.is_complete(path):
        return path
    tokenizer = embedded.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=opts.hidden_size,
                         intermediate_size=opts.intermediate_size, num_hidden_layers=opts.layers,
                         num_attention_heads=opts.heads, num_key_value_heads=opts.heads, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with checkpoint.atomic_dir(path) as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def _size(cfg: Config) -> tuple[int, float]:
    """(parameters, MB of weights in ``model.dtype``) of the run's model, counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.name_or_path))
    parameters = sum(p.numel() for p in model.parameters())
    return parameters, parameters * torch.finfo(getattr(torch, cfg.model.dtype)).bits / 8 / 2**20


def _peak_of_this_process() -> float:
    """This process's peak RSS so far in MB (Linux VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def run_strategy(config_file: Path, strategy: str, processes: int, run_dir: Path) -> dict:
    """One ``frugalrl train`` under torchrun with ``train.strategy=strategy``: the peak RSS (MB) of
    each of its processes and its seconds per step."""
    shutil.rmtree(run_dir, ignore_errors=True)
    peaks = run_dir.with_name(run_dir.name + "-peaks")
    shutil.rmtree(peaks, ignore_errors=True)
    peaks.mkdir(parents=True)
    log = run_dir.with_name(run_dir.name + ".log")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "frugalrl.bench.scale", str(peaks), "train", "--config", str(config_file),
               f"train.strategy={strategy}", f"output_dir={run_dir}"]
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **MALLOC})
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"the {strategy} run failed with exit code {done.returncode} (log {log}):\n{tail}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    return {"peak_mb": [float((peaks / f"rank-{rank}.mb").read_text()) for rank in range(processes)],
            "step_s": steps[-1]["wall_s"] / len(steps)}


def run(cfg: Config, opts: ScaleOptions, command: str, console: Console) -> dict:
    """Train with ddp and with fsdp on ``bench.processes`` processes; write scale.md; merge
    ``fsdp_to_ddp_peak_rss_ratio`` (and each strategy's peak) into summary.json and return them."""
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(cfg.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not cfg.model.name_or_path:
        model_dir = build_model(opts, work / f"model-{opts.hidden_size}x{opts.layers}-{opts.intermediate_size}")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": str(model_dir)})})
    config_file = work / "scale-config.yaml"
    save_config(cfg, config_file)
    parameters, weights_mb = _size(cfg)
    runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for round_ in range(opts.rounds):
        for strategy in STRATEGIES:
            console.print(f"scale bench: round {round_ + 1}/{opts.rounds}, {strategy} on {opts.processes} processes")
            runs[strategy].append(run_strategy(config_file, strategy, opts.processes, work / f"{strategy}-{round_}"))
    peak = {s: statistics.median(max(r["peak_mb"]) for r in runs[s]) for s in STRATEGIES}
    step_s = {s: statistics.median(r["step_s"] for r in runs[s]) for s in STRATEGIES}
    ratio = peak["fsdp"] / peak["ddp"]
    rows = [[s, fmt(peak[s]), ", ".join(fmt(max(r["peak_mb"])) for r in runs[s]),
             " / ".join(fmt(p) for p in runs[s][-1]["peak_mb"]), fmt(step_s[s], 3)] for s in STRATEGIES]
    sections = [
        f"`frugalrl train` under torchrun on {opts.processes} processes, {cfg.max_steps} steps of "
        f"{cfg.rollout.batch_prompts} prompts x G={cfg.rollout.group_size}, model {cfg.model.name_or_path} "
        f"({parameters / 1e6:.0f} M parameters, {weights_mb:.0f} MB of weights in {cfg.model.dtype}). "
        "Protocol: `src/frugalrl/bench/scale.py`.",
        table(["train.strategy", "peak RSS per process, MB (median)", "each round (largest process)",
               "last round, per process", "s/step"], rows),
        f"fsdp / ddp peak RSS per process: **{fmt(ratio, 3)}** (goal: at most 0.7).",
    ]
    summary = {"fsdp_to_ddp_peak_rss_ratio": ratio, "scale_ddp_peak_rss_mb": peak["ddp"],
               "scale_fsdp_peak_rss_mb": peak["fsdp"]}
    return publish(results_dir, "scale", f"Scale bench: ddp vs fsdp, {opts.processes} processes", command,
                   sections, summary, console)


def _child(peak_dir: str, *args: str) -> None:
    """A torchrun process of the bench: ``frugalrl ARGS``, then its peak RSS to
    ``peak_dir/rank-RANK.mb`` however it ends."""
    from frugalrl.cli import main

    try:
        code = main(list(args))
    finally:
        Path(peak_dir, f"rank-{os.environ.get('RANK', '0')}.mb").write_text(f"{_peak_of_this_process()}\n")
    sys.exit(code)


if __name__ == "__main__":
    _child(*sys.argv[1:])
