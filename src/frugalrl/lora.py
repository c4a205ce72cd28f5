"""LoRA through peft: wrapping the policy, its reference policy, saving and loading the adapter.

With ``lora.r > 0`` the policy is the loaded model with low-rank adapters on
``lora.target_modules``; only the adapters train (and only they have optimizer state). The
adapter starts at zero (peft initialises its B matrix to 0), so the wrapped model starts equal
to the base model, and the reference policy of the KL penalty and A*-PO is the same model with
its adapter switched off (``AdapterDisabled``): no second copy of the weights in memory.

Saving: training checkpoints hold the adapter alone (small; ``load_adapter_weights`` reads it
back on resume); the final model is either merged (``merged_weights``: the base model's
weights with the adapter folded in, loadable with ``AutoModelForCausalLM.from_pretrained`` and
frugalrl's fast sampler) or the adapter with the absolute path of its base model in
``adapter_config.json`` (transformers loads that too when peft is installed).

peft is an optional extra: ``pip install 'frugalrl[lora]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["is_lora", "wrap", "AdapterDisabled", "why_not_mergeable", "merged_linear", "merged_weights",
           "load_adapter_weights"]


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ValueError(f"lora.r > 0 needs the peft package, which is not installed ({e}); install it with: "
                         "pip install 'frugalrl[lora]'") from None
    return peft


def is_lora(model) -> bool:
    """Whether ``model`` is a peft model (without importing peft when nothing could be one)."""
    return type(model).__module__.startswith("peft.")


def wrap(model, lora_cfg):
    """``model`` with trainable LoRA adapters as ``lora_cfg`` (``cfg.lora``) says; the other weights
    are frozen. The adapter's config records the base model's absolute path, so that a saved
    adapter can be loaded without frugalrl."""
    peft = _peft()
    targets = lora_cfg.target_modules
    config = peft.LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, task_type="CAUSAL_LM",
        target_modules=targets[0] if targets == ["all-linear"] else list(targets))
    base = str(Path(model.name_or_path).resolve()) if Path(model.name_or_path).is_dir() else model.name_or_path
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # peft's message for target names that match nothing
        raise ValueError(f"lora.target_modules={targets}: {str(e).splitlines()[0]}; name linear layers of "
                         f"{type(model).__name__} (e.g. q_proj, v_proj) or use [all-linear]") from None
    wrapped.peft_config["default"].base_model_name_or_path = base
    return wrapped


class AdapterDisabled:
    """The reference policy of a LoRA policy: calls run the same module with its adapter off.

    In eval mode for the call (as a frozen copy would be), so that no dropout acts on it. Only
    for no-grad use (KL penalty, A*-PO's log pi_ref).
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        from frugalrl.rollout import eval_mode  # here: rollout imports fastgen, which imports this module

        with eval_mode(self.model), self.model.disable_adapter():
            return self.model(*args, **kwargs)


def why_not_mergeable(layer) -> str | None:
    """None if ``layer`` is an ``nn.Linear``, or a peft LoRA layer over one that :func:`merged_linear`
    reproduces (plain LoRA: no DoRA or other variant, no bias on B); else why not."""
    if type(layer) is nn.Linear:
        return None
    if not type(layer).__module__.startswith("peft.tuners.lora") or type(getattr(layer, "base_layer", None)) is not nn.Linear:
        return f"{type(layer).__name__} in place of nn.Linear"
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(a in getattr(layer, "lora_variant", {}) or layer.use_dora.get(a) for a in adapters):
        return "a LoRA variant (DoRA, ...)"
    if any(layer.lora_B[a].bias is not None for a in adapters):
        return "LoRA with lora_bias"
    return None


def merged_linear(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) that ``layer``'s forward computes with: an ``nn.Linear``'s own, or for
    a peft LoRA layer its base weight plus B @ A * alpha / r of each active adapter, out of place
    (nothing added when its adapters are disabled or already merged into the base weight)."""
    if type(layer) is nn.Linear:
        return layer.weight, layer.bias
    weight = layer.base_layer.weight
    if not (layer.disable_adapters or layer.merged):
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight, layer.base_layer.bias


@torch.no_grad()
def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the base model's state with the adapter folded in, under the names of
    the model without peft (``model.layers.0.self_attn.q_proj.weight``); ``model`` is left as it
    is. Out of place, W + B @ A * alpha / r per layer, because merging into the weights and back
    (``merge_adapter``/``unmerge_adapter``) would round low-precision weights each time."""
    base = model.get_base_model()
    modules = dict(base.named_modules())
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        owner, _, leaf = key.rpartition(".")
        if owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
            if leaf == "weight":
                tensor = merged_linear(modules[owner])[0].detach()
        yield f"{owner}.{leaf}", tensor


def load_adapter_weights(model, path: str | Path) -> None:
    """Copy the adapter saved at ``path`` (a checkpoint) into the peft ``model`` in place."""
    peft = _peft()
    weights = peft.utils.load_peft_weights(str(path), device=str(next(model.parameters()).device))
    unexpected = peft.set_peft_model_state_dict(model, weights).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: the saved adapter does not fit this model ({unexpected[:3]} are not in it); "
                         "resume with the lora options the run was started with")

