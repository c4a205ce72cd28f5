"""Data-parallel training over ``torchrun`` ranks (torch.distributed: gloo on CPU, nccl on GPU).

    torchrun --nproc_per_node 8 -m frugalrl.cli train --config c.yaml

Without torchrun (``WORLD_SIZE`` unset or 1) every method here is the identity, so the trainer
has one code path. With W ranks, one step is the single-process step with its work split:

* every rank draws the same global prompt batch (same sampler, same seed) and the same
  sampling noise (one uniform per sample and token from the shared torch RNG), then
  generates, scores and back-propagates only its shard of ``rollout.batch_prompts / W``
  prompts. fastgen draws token t of a sample from its own uniform, so a sample's tokens do
  not depend on which rank or batch it was generated in;
* rewards are all-gathered, so the estimator runs on the global batch on every rank: GRPO
  groups and KAE's history are global and identical everywhere;
* loss normalisers (``LossNorm``) are summed over ranks, so each rank's loss is its share of
  the global loss, and gradients are summed (all-reduce) once per optimizer step. This is
  DDP's gradient all-reduce, done by hand rather than by DDP's backward hooks, because after
  gradient filtering ranks hold different numbers of micro-batches (DDP's hooks would wait
  for backward passes that never come), and because the *sum* of shares, not DDP's mean, is
  the global gradient;
* rank 0 evaluates, logs and checkpoints; the torch RNG is re-synchronised from rank 0 after
  each step, so that whatever a rank drew on its own (dropout, Hugging Face ``generate``)
  cannot make the ranks' shared draws diverge.

The result equals one process with the same global batch and seed, up to float rounding.
This is ``train.strategy=ddp``; under ``fsdp`` the split of the work is the same, but the model,
its gradients and optimizer state are sharded over the ranks and gradients are reduce-scattered
by FSDP in the backward pass (``sharding.py``).
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Callable, Iterable, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")

# Gradients are all-reduced in flat buckets of at most this many elements (as DDP buckets
# them): one collective per bucket instead of one per parameter, without a full flat copy.
_BUCKET_ELEMENTS = 2**24


class Dist:
    """This process's place among the ranks, and the collectives the trainer uses.

    ``world`` ranks, this one is ``rank``; rank 0 is ``is_main``. Built by :func:`init`.
    """

    def __init__(self, world: int = 1, rank: int = 0, device: torch.device | str = "cpu", owns_group: bool = False):
        self.world, self.rank, self.device = world, rank, torch.device(device)
        self.owns_group = owns_group  # a process group of this process alone (``init(..., group=True)``)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int, what: str = "rollout.batch_prompts") -> slice:
        """This rank's contiguous share of ``n`` items; ``n`` must divide evenly."""
        if n % self.world:
            raise ValueError(f"{what}={n} does not split evenly over {self.world} ranks; make it a multiple "
                             f"of {self.world}")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The ranks' equal-sized ``local`` tensors concatenated along dim 0, in rank order."""
        if not self.active:
            return local
        parts = [torch.empty_like(x) for x in [local.to(self.device)] * self.world]
        tdist.all_gather(parts, local.to(self.device).contiguous())
        return torch.cat(parts).to(local.device)

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=op)
        return t.tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        return self._reduce(values, tdist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maxima over ranks."""
        return self._reduce(values, tdist.ReduceOp.MAX)

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over ranks (a missing one counts as zeros)."""
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in params]):
            flat = torch.cat([g.flatten() for g in bucket])
            tdist.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))

    def sync_rng(self) -> None:
        """Every rank takes rank 0's torch CPU RNG state (the stream shared draws come from)."""
        if not self.active:
            return
        state = torch.get_rng_state().to(self.device)
        tdist.broadcast(state, src=0)
        torch.set_rng_state(state.cpu())

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the others: what rank 0 builds and caches (the embedded
        SFT model, A*-PO's V*), the others then find on disk instead of building it again."""
        if self.is_main:
            result = fn()
            self.barrier()
            return result
        self.barrier()
        return fn()


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Consecutive runs of ``tensors`` of one dtype and at most ``_BUCKET_ELEMENTS`` elements
    (a larger tensor is a bucket of its own)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or size + t.numel() > _BUCKET_ELEMENTS):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def init(device: str, group: bool = False) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...), or a single-process ``Dist`` without it.

    ``device``: "cpu" (gloo) or "cuda" (nccl; each rank takes GPU ``LOCAL_RANK``).
    ``group``: without torchrun, still make a process group of this one process (FSDP's
    sharding needs one: ``sharding.py``); ``close`` ends it.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if group and not tdist.is_initialized():
            tdist.init_process_group("nccl" if device == "cuda" else "gloo", store=tdist.HashStore(), rank=0,
                                     world_size=1)
            return Dist(owns_group=True)
        return Dist()
    rank = int(os.environ["RANK"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        comm = torch.device("cuda", torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(world, rank, comm)


def close(dist: Dist) -> None:
    """Leave the process group (after the last collective).

    Garbage is collected first: FSDP's modules hold their collectives' work handles in reference
    cycles, and gloo work handles freed only at interpreter shutdown abort the process
    ("terminate called without an active exception", seen at exit of 2-rank runs)."""
    if (dist.active or dist.owns_group) and tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


@contextmanager
def private_rng(device: torch.device):
    """Random draws inside do not advance the shared torch RNG (CPU, and ``device``'s if CUDA)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
