"""Crash safety for the training loop: resumable state, the metrics log, signals, failures.

A training checkpoint (``checkpoint.save_checkpoint``) holds everything the next step depends
on, so that a resumed run on CPU is identical to one that was never stopped:

* model and tokenizer (safetensors), optimizer, scheduler and PPO's critic (``optimizer.pt``,
  read back with ``torch.load(weights_only=True)``, never arbitrary pickle), the torch RNG (a
  tensor there),
* ``trainer_state.json``: step, wall-clock and sample counters, the per-prompt reward history
  (KAE's baselines and the allocator's pass rates), the allocator's RNG, the prompt sampler's
  position, the python and numpy RNGs, and a fingerprint of the training prompts (resuming on
  different data is refused).

``metrics.jsonl`` is cut back to the checkpoint's step on resume, so the steps that run again
are neither duplicated nor missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugalrl import checkpoint, sharding

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a step whose checkpoint was saved.

    A KeyboardInterrupt, so that code which treats Ctrl-C as "the user stopped it" (not as an
    error) does the same here. ``exit_code`` is the shell's 128 + signal number (130, 143).
    """

    def __init__(self, signum: int, step: int, run_dir: Path, saved: Path | None):
        name = signal.Signals(signum).name
        where = f"checkpoint {saved}" if saved else "no new checkpoint (the last steps were bad)"
        super().__init__(f"stopped by {name} after step {step}; {where}; "
                         f"continue with: frugalrl train --resume {run_dir}")
        self.exit_code = 128 + signum


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` steps in a row had a non-finite loss or gradient (each skipped).

    No checkpoint is written after a bad step, so the newest one holds good weights.
    """

    def __init__(self, bad_steps: int, step: int, run_dir: Path):
        last = checkpoint.latest_checkpoint(run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved (save_every=0)"
        super().__init__(f"steps {step - bad_steps + 1}..{step} all had a NaN/inf loss or gradient and were "
                         f"skipped, so training stopped ({kept}); lower train.lr, check the rewards, or raise "
                         "train.max_bad_steps")


# --- RNG state -----------------------------------------------------------------------------

def rng_state() -> dict:
    """The python and numpy global RNG states as JSON-safe lists (torch's is a tensor in the
    checkpoint's optimizer.pt)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(state: dict, tensors: dict) -> None:
    """Restore every RNG from a checkpoint's JSON ``state`` and ``tensors`` (optimizer.pt)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])


# --- finding and restoring a checkpoint -------------------------------------------------------

def data_fingerprint(rows: list[dict]) -> str:
    """A digest of the training prompt ids in order: the sampler's saved position indexes them."""
    return hashlib.sha1("\n".join(str(r["id"]) for r in rows).encode()).hexdigest()


def checkpoint_to_resume(cfg) -> Path | None:
    """The checkpoint a run continues from (None for a fresh run); raises ValueError, before
    any work, when ``cfg.resume`` has nothing to resume or a fresh run would mix with an old one."""
    run_dir = Path(cfg.output_dir)
    if not cfg.resume:
        if checkpoint.list_checkpoints(run_dir):
            raise ValueError(f"output_dir {run_dir} already holds checkpoints of an earlier run; continue it "
                             f"with `frugalrl train --resume {run_dir}`, or pick another output_dir")
        return None
    if not (Path(cfg.resume) / "config.yaml").is_file():
        raise ValueError(f"resume={cfg.resume}: not a run directory (no config.yaml); give the output_dir of "
                         "the run to continue")
    checkpoint.clean_up_after_crash(cfg.resume)
    found = checkpoint.latest_checkpoint(cfg.resume)
    if found is None:
        raise ValueError(f"resume={cfg.resume}: no complete checkpoint to continue from; the run needs "
                         "save_every > 0 (or a SIGINT/SIGTERM stop) to write checkpoint-NNNNNNN directories")
    return found


@dataclass
class Resumable:
    """The objects of a run whose state a checkpoint saves and restores."""

    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    learner: Any  # update.Learner: the critic, under PPO
    estimator: Any
    sampler: Any
    train_rows: list[dict]
    history: Any = None  # history.PromptHistory
    allocator: Any = None  # allocation.Allocator


def save_training_checkpoint(run_dir: Path, step: int, run: Resumable, counters: dict, keep: int,
                             dist=None) -> Path:
    """``run_dir/checkpoint-STEP`` with everything ``restore_training_state`` needs; ``counters``
    are the trainer's running totals (wall clock, samples). A sharded model (``train.strategy=fsdp``)
    is saved by every rank of ``dist`` (``sharding.save_checkpoint``), any other by rank 0 alone."""
    state = {"step": step, **counters, "estimator": run.estimator.state_dict(), "sampler": run.sampler.state_dict(),
             "rng": rng_state(), "data": data_fingerprint(run.train_rows)}
    for name in ("history", "allocator"):
        if getattr(run, name) is not None:
            state[name] = getattr(run, name).state_dict()
    if sharding.is_sharded(run.model):
        return sharding.save_checkpoint(run_dir, step, run.model, run.tokenizer, run.optimizer, run.scheduler, state,
                                        dist, keep=keep, extra_tensors={"learner": run.learner.state_dict()})
    return checkpoint.save_checkpoint(run_dir, step, run.model, run.tokenizer, run.optimizer, run.scheduler, state,
                                      keep=keep, extra_tensors={"learner": run.learner.state_dict()})


def restore_training_state(path: Path, run: Resumable) -> dict:
    """Load a checkpoint into ``run`` (model weights in place, optimizer, scheduler, learner,
    estimator, sampler, every RNG); returns the trainer state (step and counters)."""
    state, tensors = checkpoint.load_training_state(path)
    if state.get("data") != data_fingerprint(run.train_rows):
        raise ValueError(f"the training prompts differ from those {path} was trained on; resume with the "
                         "same data options and files, or start a new run in another output_dir")
    if sharding.is_sharded(run.model) != sharding.is_sharded_checkpoint(path):
        saved, now = ("fsdp", "ddp") if sharding.is_sharded_checkpoint(path) else ("ddp", "fsdp")
        raise ValueError(f"{path} was saved with train.strategy={saved}, and this run has train.strategy={now}: "
                         f"its checkpoints do not load into the other strategy; resume with train.strategy={saved}")
    if sharding.is_sharded(run.model):  # on any number of processes: re-sharded as it loads
        sharding.load_checkpoint(path, run.model, run.optimizer)
    else:
        checkpoint.load_model_weights(run.model, path)
        run.optimizer.load_state_dict(tensors["optimizer"])
    run.scheduler.load_state_dict(tensors["scheduler"])
    run.learner.load_state_dict(tensors["learner"])
    run.estimator.load_state_dict(state["estimator"])  # before the history: an older kae state holds it
    run.sampler.load_state_dict(state["sampler"])
    for name in ("history", "allocator"):  # absent from checkpoints written before they existed
        if getattr(run, name) is not None and name in state:
            getattr(run, name).load_state_dict(state[name])
    # Last, so that nothing done while building the run draws from the restored streams.
    set_rng_state(state["rng"], tensors)
    return state


# --- metrics.jsonl --------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics file; a torn last line (killed, or still being written) is dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """metrics.jsonl writer that keeps the rows for the plot and the summary.

    ``keep_through=STEP`` (resuming) keeps the rows up to that step and drops later ones, which
    belong to steps that will run again. Each row is fsynced, so a checkpoint never gets ahead
    of the log it is resumed with. ``path=None`` keeps the rows in memory only (the ranks of a
    torchrun job other than rank 0).
    """

    def __init__(self, path: Path | None, keep_through: int | None = None):
        self.path = path
        if path is None:
            self.rows = []
            return
        self.rows = [] if keep_through is None or not path.is_file() else \
            [r for r in read_metrics(path) if r.get("step", 0) <= keep_through]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(tmp, path)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


# --- signals --------------------------------------------------------------------------------

class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``signum`` instead of killing the process, so that the
    loop can finish its step and checkpoint. A second signal stops at once (KeyboardInterrupt);
    checkpoints are atomic, so that is safe too. Outside the main thread (where Python cannot
    install handlers) it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
