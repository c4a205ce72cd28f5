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

from frugalrl.rollout import eval_mode

__all__ = ["is_lora", "wrap", "AdapterDisabled", "merged_weights", "load_adapter_weights"]


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
        with eval_mode(self.model), self.model.disable_adapter():
            return self.model(*args, **kwargs)


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
                layer = modules[owner]
                for adapter in layer.active_adapters:
                    tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def load_adapter_weights(model, path: str | Path) -> None:
    """Copy the adapter saved at ``path`` (a checkpoint) into the peft ``model`` in place."""
    peft = _peft()
    weights = peft.utils.load_peft_weights(str(path), device=str(next(model.parameters()).device))
    unexpected = peft.set_peft_model_state_dict(model, weights).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: the saved adapter does not fit this model ({unexpected[:3]} are not in it); "
                         "resume with the lora options the run was started with")

