"""Sharded data parallelism with torch's FSDP2 (``train.strategy=fsdp``).

Under ``train.strategy=ddp`` (the default) every process holds the whole model, its gradients
and AdamW's two moments, and ``distributed.Dist.sum_grads`` all-reduces the gradients. Under
``fsdp`` :func:`shard` applies ``torch.distributed.fsdp.fully_shard`` to each decoder layer and
to the root: every parameter becomes a DTensor whose rows are split over the processes, and so
are its gradient and its optimizer state. What changes, and where:

* forward and backward passes gather each layer's weights just in time (all-gather) and
  reduce-scatter its gradients, summed (not averaged: the loss normaliser is already global,
  see ``distributed.py``), in float32. These are collectives: every process must make the same
  passes, so ``update.Learner`` pads a process with fewer micro-batches (filtering) with dummy
  passes of zero loss;
* mixed precision comes from ``model.dtype``: with bfloat16/float16 the sharded weights,
  gradients and optimizer state are float32 and the passes run in ``model.dtype``;
* gradient clipping takes the norm of the sharded gradients (DTensor norms, summed over the
  processes), which is the global norm (:func:`clip_grad_norm`);
* whatever reads whole weights (frugalrl's sampler, Hugging Face ``generate``, evaluation, the
  vLLM push, saving ``model/``) runs inside :func:`full_weights`: every process gathers the
  whole model once (one all-gather of the weights, in the compute dtype) and gets a plain
  module without FSDP's hooks that uses the gathered tensors, so that nothing inside it is a
  collective (rank 0 can evaluate alone, ranks can decode different numbers of tokens). The
  cost is one full copy of the weights per process while it lasts, freed on exit;
* the frozen reference policy (KL, A*-PO) is a copy sharded the same way (:func:`frozen_copy`);
  under LoRA it is the adapter switched off, as without sharding;
* training checkpoints hold the sharded model and optimizer state as written by
  ``torch.distributed.checkpoint`` (each process its own file, ``sharded/``) in the usual atomic
  checkpoint directory (:func:`save_checkpoint`); they load on any number of processes
  (``torch.distributed.checkpoint`` re-shards on load).

With one process (no torchrun) ``fsdp`` still shards, over a group of one, so that its
checkpoints are the same kind as those of a torchrun run.
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as tdist
from torch import nn

from frugalrl import checkpoint
from frugalrl.distributed import Dist

SHARDED = "sharded"  # a checkpoint's torch.distributed.checkpoint directory
_ATTR = "_frugalrl_sharding"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Sharding:
    """What :func:`shard` keeps with a sharded model: its ``fully_shard`` options and ``plain``, a
    copy of its module tree without FSDP, whose parameters are on the meta device (no memory)
    until :func:`full_weights` lends it the gathered ones."""

    options: dict
    plain: nn.Module | None


def is_sharded(model) -> bool:
    """Whether ``model`` went through :func:`shard` (``train.strategy=fsdp``)."""
    return getattr(model, _ATTR, None) is not None


def _fsdp():
    from torch.distributed import fsdp
    return fsdp


def _fsdp_modules(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _fsdp().FSDPModule)]


def _layer_classes(model) -> set[str]:
    """Class names of the model's decoder layers: Hugging Face's ``_no_split_modules`` (under
    LoRA, the base model's), as accelerate's and verl's FSDP wrap policies take them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"train.strategy=fsdp: {type(base).__name__} does not name its decoder layers "
                         "(_no_split_modules), so it cannot be sharded layer by layer; use train.strategy=ddp")
    return names


def _apply(model: nn.Module, options: dict) -> None:
    """``fully_shard`` on each decoder layer, then on the root (which takes the rest: embeddings,
    final norm, lm_head, tied or not); gradients are summed over processes, not averaged."""
    fully_shard = _fsdp().fully_shard
    names = _layer_classes(model)
    for module in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(module, **options)
    fully_shard(model, **options)
    for module in _fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters are on the meta device (no memory):
    ``deepcopy`` with every parameter pre-mapped to an empty meta one (ties stay ties);
    buffers (RoPE tables) are copied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shard(model, cfg, dist: Dist):
    """``model`` sharded over the processes as ``cfg.train`` says (``strategy=fsdp``), in place;
    ``model`` itself under ``strategy=ddp``. Needs a process group (``distributed.init(...,
    group=True)``). Call it after ``prepare_for_training`` and before building the optimizer."""
    t = cfg.train
    if t.strategy != "fsdp":
        return model
    fsdp = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh

    device = next(model.parameters()).device
    plain = _meta_copy(model)
    compute = _DTYPES[cfg.model.dtype]
    if compute != torch.float32:  # float32 master weights, gradients and optimizer state
        model.float()
    offload = fsdp.CPUOffloadPolicy() if t.fsdp_cpu_offload and device.type == "cuda" else fsdp.OffloadPolicy()
    options = dict(mesh=init_device_mesh(device.type, (dist.world,)),
                   reshard_after_forward=t.fsdp_reshard_after_forward, offload_policy=offload,
                   mp_policy=fsdp.MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32))
    _apply(model, options)
    object.__setattr__(model, _ATTR, _Sharding(options, plain))  # not a submodule: no parameters of its own
    return model


def frozen_copy(model):
    """A frozen copy of the sharded ``model``'s current weights, sharded the same way, in eval
    mode (the reference policy). FSDP modules cannot be deep-copied: the copy is made from the
    gathered weights, so a process holds the whole model once more while it is made."""
    info: _Sharding = getattr(model, _ATTR)
    with full_weights(model) as whole:
        reference = copy.deepcopy(whole)
    reference.requires_grad_(False)  # kept in the compute dtype: it gets no gradient
    _apply(reference, info.options)
    object.__setattr__(reference, _ATTR, _Sharding(info.options, None))
    return reference.eval()


def _set_parameter(root: nn.Module, name: str, value) -> None:
    owner, _, leaf = name.rpartition(".")
    root.get_submodule(owner)._parameters[leaf] = value


@contextmanager
def full_weights(model) -> Iterator[nn.Module]:
    """The model with its whole weights, for what reads them directly; ``model`` itself when it
    is not sharded.

    Sharded: every process gathers all of them (one all-gather per sharded module, so every
    process must enter, in the same order), and gets a plain module (no FSDP hooks, so no
    collectives inside) that uses the gathered tensors, in the compute dtype, in ``model``'s
    train/eval mode. They are freed on exit; the plain module must not be kept.
    """
    info: _Sharding | None = getattr(model, _ATTR, None)
    if info is None:
        yield model
        return
    if info.plain is None:
        raise ValueError("full_weights: this sharded copy keeps no plain module")
    modules = _fsdp_modules(model)
    placeholders = dict(info.plain.named_parameters(remove_duplicate=False))
    try:
        for module in modules:
            module.unshard()
        for name, param in model.named_parameters(remove_duplicate=False):
            _set_parameter(info.plain, name, param)
        info.plain.train(model.training)
        yield info.plain
    finally:
        for name, param in placeholders.items():
            _set_parameter(info.plain, name, param)
        for module in modules:
            module.reshard()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sharded gradients: their norm is a
    DTensor reduced over the processes (the global norm), read back as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


def local_share(model, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(elements this process holds, elements in all) of ``model``'s parameters plus the
    optimizer's state tensors, counted from the tensors themselves: a sharded tensor (DTensor)
    counts its local shard and its global size."""
    def sizes(t: torch.Tensor) -> tuple[int, int]:
        return (t.to_local().numel(), t.numel()) if hasattr(t, "to_local") else (t.numel(), t.numel())

    tensors = list(model.parameters())
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.ndim > 0]  # not AdamW's scalar step counts
    local, total = zip(*map(sizes, tensors))
    return sum(local), sum(total)


# --- checkpoints ----------------------------------------------------------------------------

def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    # frozen weights (LoRA's base model) are rebuilt from the starting model, as without sharding
    return dcp, get_state_dict, set_state_dict, StateDictOptions(ignore_frozen_params=True)


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


@contextmanager
def _shared_atomic_dir(final: Path, dist: Dist) -> Iterator[Path]:
    """``checkpoint.atomic_dir`` written by every process: rank 0 makes the temporary directory
    and tells the others its name; once all have written their files (a barrier), rank 0
    checksums them all and renames the directory into place."""
    if not dist.is_main:
        name = [None]
        tdist.broadcast_object_list(name, src=0)
        yield Path(name[0])
        dist.barrier()
        return
    with checkpoint.atomic_dir(final) as tmp:
        if dist.active:
            tdist.broadcast_object_list([str(tmp)], src=0)
        yield tmp
        dist.barrier()


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    dist: Dist, keep: int = 0, extra_tensors: dict | None = None) -> Path:
    """``checkpoint.save_checkpoint`` for a sharded model, called by every process: the model and
    optimizer state go to ``sharded/`` (``torch.distributed.checkpoint``, one file per process
    plus its metadata), the rest (tokenizer, scheduler, RNG, ``state``, ``extra_tensors``) as
    there, from rank 0."""
    dcp, get_state_dict, _, options = _dcp()
    path = Path(run_dir) / f"{checkpoint.PREFIX}{step:07d}"
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    with _shared_atomic_dir(path, dist) as tmp:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED)
        if dist.is_main:
            tokenizer.save_pretrained(tmp)
            tensors = {**(extra_tensors or {}), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
            torch.save(tensors, tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({**state, "strategy": "fsdp", "world": dist.world}))
    if keep > 0 and dist.is_main:
        for old in checkpoint.list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(path: str | Path, model, optimizer) -> None:
    """Load a checkpoint's sharded model and optimizer state (``save_checkpoint``, on any number
    of processes) into the sharded ``model`` and ``optimizer``, in place; every process calls it."""
    dcp, get_state_dict, set_state_dict, options = _dcp()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=Path(path) / SHARDED)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
