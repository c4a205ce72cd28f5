"""A fast sampling loop for Llama-family models (``LlamaForCausalLM``, ``Qwen2ForCausalLM``).

Hugging Face ``generate`` spends far more time in Python (logits processors, cache objects,
mask building, stopping criteria) than in arithmetic when the model is tiny: the embedded
~1 M-parameter model decodes a batch step in about a millisecond of math. This module runs
the same forward pass in plain torch on the model's own weight tensors, with a preallocated
KV cache, and reproduces what ``generate`` does for left-padded batches:

* positions: ``cumsum(attention_mask) - 1`` with padding set to 0 for the prompt, then
  ``last prompt position + 1 + t`` for the t-th new token (``Rollout.model_inputs`` agrees);
* attention: causal over real tokens, padding keys masked;
* sampling: logits in float32, divided by ``temperature``, then top-p exactly as HF's
  ``TopPLogitsWarper`` (smallest set with mass >= top_p, at least one token), then a
  categorical draw; ``greedy`` takes the argmax;
* stopping: a sequence that has emitted EOS is padded with ``pad_token_id`` from then on,
  and the loop ends as soon as every sequence has emitted EOS (so the result can be shorter
  than ``max_new_tokens``, as with ``generate``).

Unlike ``generate`` it ignores ``model.generation_config`` (repetition penalty, top_k, ...):
the tokens are drawn from exactly softmax(logits / temperature), top-p filtered.

Two things ``generate`` does not do, both invisible in the result: identical prompts (the G
samples of a group) are prefilled once, and sequences that have finished are dropped from
the batch once a quarter of it has (``compact``), so the tail of a rollout costs what its
live sequences cost. The random stream differs from ``generate``'s (inverse-CDF draws), so
sampled tokens match it in distribution, not draw for draw; greedy matches token for token.

A peft LoRA model takes this path too: each adapted layer computes with W + B @ A * alpha / r,
formed out of place once per call (what peft's merge would write; the base weights are not
touched), so LoRA training samples as fast as full fine-tuning.

``supports(model)`` says whether a model can take this path; ``generate`` and ``forward``
raise ``ValueError`` on one that cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugalrl import lora

__all__ = ["supports", "generate", "forward", "FastOutput"]

# Above this many weight elements per model, QKV and gate/up are not fused into one matmul
# (fusing copies the weights once per call; it pays only where per-op overhead dominates).
_FUSE_MAX_ELEMENTS = 64_000_000


def _model_classes() -> tuple[type, ...]:
    classes = []
    try:
        from transformers import LlamaForCausalLM
        classes.append(LlamaForCausalLM)
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers import Qwen2ForCausalLM
        classes.append(Qwen2ForCausalLM)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def _rope_theta(config) -> float | None:
    """rope_theta for default RoPE, None for any other RoPE type (transformers 4.x and 5.x)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if params.get("rope_type", params.get("type", "default")) != "default":
            return None
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            return None
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    else:
        scaling = getattr(config, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            return None
        theta = getattr(config, "rope_theta", None)
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return None
    return None if theta is None else float(theta)


def _unwrap(model):
    """The transformers model inside a peft wrapper (its LoRA layers are then read as merged weights)."""
    return model.get_base_model() if lora.is_lora(model) else model


def _why_unsupported(model) -> str | None:
    """None if ``model`` can take the fast path, else the reason it cannot."""
    model = _unwrap(model)
    classes = _model_classes()
    if type(model) not in classes:
        return f"{type(model).__name__} is not one of {[c.__name__ for c in classes]}"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act={getattr(config, 'hidden_act', None)!r}, not 'silu'"
    if _rope_theta(config) is None:
        return "RoPE type other than default (or partial rotary)"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window attention layers"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) != config.num_hidden_layers:
        return "unexpected module layout"
    if type(inner.embed_tokens) is not nn.Embedding or type(model.lm_head) is not nn.Linear:
        return "embedding or lm_head is not a plain nn.Embedding / nn.Linear"
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            reason = lora.why_not_mergeable(lin)
            if reason is not None:
                return reason
    params = list(model.parameters())
    if any(p.device.type == "meta" for p in params) or len({p.device for p in params}) != 1:
        return "parameters on several devices or on meta"
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or params[0].dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"parameter dtypes {sorted(map(str, dtypes))}"
    if hasattr(model, "_hf_hook"):
        return "accelerate hooks (offloading)"
    return None


def supports(model) -> bool:
    """Whether ``model`` can use :func:`generate` here (else use Hugging Face ``generate``)."""
    return _why_unsupported(model) is None


@dataclass
class _Layer:
    ln1: torch.Tensor | None  # None: folded into the next matmul's weights
    ln2: torch.Tensor | None
    wqkv: torch.Tensor | tuple  # (in, out) "transposed" weights: x @ w
    bqkv: torch.Tensor | tuple | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wgu: torch.Tensor | tuple
    bgu: torch.Tensor | tuple | None
    wd: torch.Tensor
    bd: torch.Tensor | None


class _Net:
    """The model's weights, arranged for the loop (read once per call: they change in training).

    Small models get q/k/v and gate/up fused into one contiguous (in, out) matrix each (a copy
    per call, cheap at this size): fewer, better-shaped matmuls; in float32 the RMSNorm weights
    are folded into the rows of the matrix that follows them as well (rms(x) * w @ W =
    rms(x) @ (w[:, None] * W)). Larger models use their tensors as they are (transposed views).
    """

    def __init__(self, model):
        reason = _why_unsupported(model)
        if reason is not None:
            raise ValueError(f"fastgen does not support this model: {reason}")
        model = _unwrap(model)
        c = model.config
        inner = model.model
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.inter = c.intermediate_size
        self.eps = c.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        n_elements = sum(p.numel() for p in inner.layers.parameters())
        fuse = n_elements <= _FUSE_MAX_ELEMENTS
        fold = fuse and self.dtype == torch.float32  # low precision: keep HF's rounding order

        def folded(norm, w):
            """(norm weight or None, w (in, out)) with the norm folded into w where we fold."""
            return (None, w * norm.weight[:, None]) if fold else (norm.weight, w)

        self.norm, self.lm_w = folded(inner.norm, model.lm_head.weight.t().contiguous() if fuse
                                      else model.lm_head.weight.t())
        self.lm_b = model.lm_head.bias
        # RoPE exactly as the model's rotary embedding (default type): fp32 frequencies.
        theta, d = _rope_theta(c), self.head_dim
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(
            device=self.device, dtype=torch.float) / d))

        def params(linears):
            """(weight, bias) of the layers' outputs side by side, each layer's read once (a LoRA
            layer's merge costs a matmul)."""
            pairs = [lora.merged_linear(lin) for lin in linears]
            ws = [w.t() for w, _ in pairs]
            w = (ws[0].contiguous() if fuse else ws[0]) if len(ws) == 1 else (torch.cat(ws, 1) if fuse else tuple(ws))
            bs = [b for _, b in pairs]
            if all(b is None for b in bs):
                return w, None
            bs = [b if b is not None else self.embed.new_zeros(lin.out_features) for b, lin in zip(bs, linears)]
            return w, bs[0] if len(bs) == 1 else (torch.cat(bs) if fuse else tuple(bs))

        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv, bqkv = params([a.q_proj, a.k_proj, a.v_proj])
            wgu, bgu = params([m.gate_proj, m.up_proj])
            ln1, wqkv = folded(layer.input_layernorm, wqkv)
            ln2, wgu = folded(layer.post_attention_layernorm, wgu)
            self.layers.append(_Layer(ln1, ln2, wqkv, bqkv, *params([a.o_proj]), wgu, bgu, *params([m.down_proj])))

    # -- pieces -------------------------------------------------------------------------------

    def rms(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if x.dtype == torch.float32 or w is None:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        # HF's order for low precision: normalise in fp32, round, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    @staticmethod
    def linear(x, w, b):
        """x @ w (+ b); x is 2-D, w (in, out) or a tuple of them (outputs concatenated)."""
        if isinstance(w, tuple):
            return torch.cat([_Net.linear(x, wi, None if b is None else b[i]) for i, wi in enumerate(w)], -1)
        return torch.mm(x, w) if b is None else torch.addmm(b, x, w)

    @staticmethod
    def residual(h, x, w, b):
        """h + (x @ w + b), in one addmm where there is no bias."""
        out = torch.addmm(h, x, w)
        return out if b is None else out.add_(b)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, (*positions.shape, head_dim), in the model dtype.

        HF: x*cos + cat(-x2, x1)*sin. Here: x*cos + roll(x, d/2)*sin_signed, where
        roll(x, d/2) = cat(x2, x1) and sin_signed = cat(-sin, sin) (the same products).
        """
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos, sin

    def rope(self, x, cos, sin):
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, -1), sin)

    def logits(self, h):
        return self.linear(self.rms(h, self.norm), self.lm_w, self.lm_b)

    def mlp(self, h, L):
        gu = self.linear(self.rms(h, L.ln2), L.wgu, L.bgu)
        return self.residual(h, F.silu(gu[:, :self.inter]) * gu[:, self.inter:], L.wd, L.bd)

    # -- passes -------------------------------------------------------------------------------

    def prefill(self, ids, mask, k_out, v_out, all_logits=False, past=None):
        """Runs left-padded prompts (b, P); writes their keys and values into ``k_out[i]`` and
        ``v_out[i]``, (P, b, n_kv, head_dim) each; returns the logits of the last position
        (b, V), or of every position (b, P, V) with ``all_logits``.

        ``past``: the keys and values of a prefix that every row continues, per layer, (n_past, 1,
        n_kv, head_dim) each: the rows attend to all of it, and their positions start at n_past.
        """
        B, P = ids.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        n_past = 0 if past is None else past[0][0].shape[0]
        positions = (n_past + mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cos, sin = self.rope_tables(positions.flatten())  # (B*P, d)
        cos, sin = cos[:, None], sin[:, None]
        # causal, padding keys masked; every query may see itself so padding rows stay finite
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        attn_mask = (causal & mask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)
        if n_past:
            attn_mask = torch.cat([attn_mask.new_ones(B, P, n_past), attn_mask], -1)
        attn_mask = attn_mask[:, None]  # (B, 1, P, n_past + P)
        h = F.embedding(ids.flatten(), self.embed)  # (B*P, hidden)
        for i, L in enumerate(self.layers):
            qkv = self.linear(self.rms(h, L.ln1), L.wqkv, L.bqkv)
            qk = self.rope(qkv[:, :(nh + nkv) * d].view(B * P, nh + nkv, d), cos, sin).view(B, P, nh + nkv, d)
            k, v = qk[:, :, nh:], qkv[:, (nh + nkv) * d:].view(B, P, nkv, d)
            k_out[i].copy_(k.transpose(0, 1))
            v_out[i].copy_(v.transpose(0, 1))
            q, k, v = qk[:, :, :nh].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if n_past:  # the prefix's keys and values first, the same for every row
                k = torch.cat([past[0][i].permute(1, 2, 0, 3).expand(B, nkv, n_past, d), k], 2)
                v = torch.cat([past[1][i].permute(1, 2, 0, 3).expand(B, nkv, n_past, d), v], 2)
            if nkv != nh:
                k = k.repeat_interleave(nh // nkv, dim=1)
                v = v.repeat_interleave(nh // nkv, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            h = self.residual(h, o.transpose(1, 2).reshape(B * P, nh * d), L.wo, L.bo)
            h = self.mlp(h, L)
        h = h.view(B, P, -1)
        return self.logits(h.flatten(0, 1)).view(B, P, -1) if all_logits else self.logits(h[:, -1])

    def decode(self, tok, col, cos, sin, k_cache, v_cache, key_bias):
        """One new token per sequence, at cache column ``col``; logits (b, V).

        k_cache[i], v_cache[i]: (max_len, b * n_kv, head_dim), column-major in time, so that a
        step writes one contiguous block. key_bias: (b * n_kv, g, max_len), 0 or -inf.
        """
        b = tok.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        g, w = nh // nkv, (nh + nkv) * d
        n = col + 1
        bias = key_bias[..., :n]
        h = F.embedding(tok, self.embed)
        for i, L in enumerate(self.layers):
            qkv = self.linear(self.rms(h, L.ln1), L.wqkv, L.bqkv)
            qk = self.rope(qkv[:, :w].view(b, nh + nkv, d), cos, sin)
            kc, vc = k_cache[i], v_cache[i]
            kc[col].view(b, nkv, d).copy_(qk[:, nh:])
            vc[col].copy_(qkv[:, w:].reshape(b * nkv, d))
            # the g query heads that share a KV head are g query rows against it (no repeat)
            scores = torch.baddbmm(bias, qk[:, :nh].reshape(b * nkv, g, d), kc[:n].permute(1, 2, 0),
                                   alpha=self.scale)
            o = torch.bmm(scores.softmax(-1), vc[:n].transpose(0, 1))  # (b*nkv, g, d)
            h = self.residual(h, o.view(b, nh * d), L.wo, L.bo)
            h = self.mlp(h, L)
        return self.logits(h)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF ``TopPLogitsWarper``: keep the smallest set of top tokens with mass >= top_p (>= 1 token)."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


def _categorical(probs: torch.Tensor, generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` (B, V) by inverse CDF: B uniforms instead of the B*V
    exponentials of ``torch.multinomial`` (several times faster at these sizes). ``u``: the
    (B,) uniforms in (0, 1] to use, else they are drawn from ``generator``.

    u is in (0, 1], so the target u * total is > 0 and <= the last cumulative value: the first
    index whose cumulative mass reaches it always has nonzero probability.
    """
    cum = probs.cumsum(-1)
    if u is None:
        u = 1.0 - torch.rand(probs.shape[0], device=probs.device, dtype=cum.dtype, generator=generator)
    u = u.to(device=cum.device, dtype=cum.dtype).unsqueeze(1)
    return torch.searchsorted(cum, u * cum[:, -1:]).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _pick(logits, greedy, temperature, top_p, generator, u=None):
    scores = logits.float()  # as generate: processors and sampling in float32
    if greedy:
        return scores.argmax(-1)
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        scores = _top_p_filter(scores, top_p)
    return _categorical(scores.softmax(-1), generator, u)


# Prompts are prefilled this many rows at a time (activations stay in cache; measured faster).
_PREFILL_ROWS = 64
# A prefix that every distinct prompt starts with (a chat template's system prompt) is prefilled
# once when it is at least this many tokens: below that it saves less than its own call costs.
MIN_SHARED_PREFIX = 8


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Tokens that every left-padded row of ``ids`` (B, P) starts its real tokens with, at most
    its shortest row's length - 1 (each row keeps a token of its own, whose logits start it)."""
    lengths = mask.long().sum(1)
    n = int(lengths.min()) - 1
    if n <= 0 or ids.shape[0] < 2:
        return 0
    cols = (ids.shape[1] - lengths)[:, None] + torch.arange(n, device=ids.device)  # each row's first n tokens
    starts = ids.gather(1, cols)
    differs = (starts != starts[:1]).any(0)
    return int(differs.float().argmax()) if differs.any() else n


def prefix_to_share(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """``shared_prefix`` where it is worth running once (at least ``MIN_SHARED_PREFIX`` tokens), else 0."""
    n = shared_prefix(ids, mask)
    return n if n >= MIN_SHARED_PREFIX else 0


def _prefill_rows(net: _Net, ids, mask, k_out, v_out, past=None) -> torch.Tensor:
    """``net.prefill`` over the rows ``_PREFILL_ROWS`` at a time; the logits of their last position."""
    logits = []
    for s in range(0, ids.shape[0], _PREFILL_ROWS):
        e = min(ids.shape[0], s + _PREFILL_ROWS)
        logits.append(net.prefill(ids[s:e], mask[s:e], [k[:, s:e] for k in k_out], [v[:, s:e] for v in v_out],
                                  past=past))
    return torch.cat(logits) if len(logits) > 1 else logits[0]


def _prefill(net: _Net, ids, mask, k_cache, v_cache, dedup: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fills cache columns [0, P) for the B prompts; the logits of their last position (B, V), and
    which of the P columns each row may attend to (B, P).

    Identical prompts (a group of G samples of one prompt) are run once and their keys and
    values copied to every row that repeats them. A prefix that every distinct prompt starts
    with (``prefix_to_share``) is run once too: it fills
    columns [0, n) of every row, and the rest of each prompt, left-padded, columns [n, P), where
    the prompt's own left padding was. Attention does not depend on the order of the keys, and
    each key carries its position, so only the column mask changes.
    """
    B, P = ids.shape
    nkv, d = net.n_kv, net.head_dim
    inverse = None
    if dedup and B > 1:
        uniq, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], 1), dim=0, return_inverse=True)
        if uniq.shape[0] < B:
            ids, mask = uniq[:, :P], uniq[:, P:].to(mask.dtype)
        else:
            inverse = None
    U = ids.shape[0]
    n = prefix_to_share(ids, mask) if dedup else 0
    if inverse is None and not n:  # straight into the cache
        k_out = [k[:P].view(P, B, nkv, d) for k in k_cache]
        v_out = [v[:P].view(P, B, nkv, d) for v in v_cache]
        return _prefill_rows(net, ids, mask, k_out, v_out), mask
    past = None
    if n:
        start = P - int(mask.long().sum(1)[0])  # row 0's first real column
        past = tuple([k_cache[0].new_empty(n, 1, nkv, d) for _ in k_cache] for _ in range(2))
        net.prefill(ids[:1, start:start + n], mask[:1, start:start + n], *past)
        # in a row's suffix coordinates c = column - n, its tokens after the prefix sit where
        # its mask's first P - n columns say (the row's real tokens are its last ones)
        ids, mask = ids[:, n:], mask[:, :P - n]
    k_out = [k_cache[0].new_empty(P - n, U, nkv, d) for _ in k_cache]
    v_out = [k_cache[0].new_empty(P - n, U, nkv, d) for _ in v_cache]
    logits = _prefill_rows(net, ids.masked_fill(mask == 0, 0), mask, k_out, v_out, past)
    rows = torch.arange(U, device=ids.device) if inverse is None else inverse
    prefix = past[0] + past[1] if n else [None] * len(k_out + v_out)
    for src, pre, dst in zip(k_out + v_out, prefix, k_cache + v_cache):
        dst = dst[:P].view(P, B, nkv, d)
        torch.index_select(src, 1, rows, out=dst[n:])
        if n:
            dst[:n].copy_(pre.expand(n, B, nkv, d))
    columns = mask[rows] if not n else torch.cat([mask.new_ones(B, n), mask[rows]], 1)
    return logits[rows], columns


@dataclass
class FastOutput:
    """tokens: (B, T) new tokens, T <= max_new_tokens, ``pad_token_id`` after each EOS.
    logits: (B, T, V) raw model logits that each token was drawn from (with ``return_logits``;
    zero after a sequence's EOS)."""

    tokens: torch.Tensor
    logits: torch.Tensor | None = None


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
             greedy: bool = False, generator: torch.Generator | None = None,
             uniforms: torch.Tensor | None = None, return_logits: bool = False,
             compact: bool = True) -> FastOutput:
    """Continue each left-padded prompt row of ``input_ids`` by up to ``max_new_tokens`` tokens.

    Equivalent to ``model.generate(input_ids, attention_mask=..., do_sample=not greedy,
    temperature=..., top_p=..., top_k=0, max_new_tokens=..., eos_token_id=..., pad_token_id=...)``
    minus the prompt columns (greedy: token for token). ``compact`` drops finished sequences
    from the batch as they accumulate. ``uniforms`` (B, >= max_new_tokens), values in (0, 1]:
    token t of row b is the inverse-CDF draw at ``uniforms[b, t]`` (else drawn from
    ``generator``), so that a row's sample does not depend on the other rows of its batch
    (data-parallel ranks then sample what one process would). The result is on ``input_ids``' device and is an ordinary
    tensor (usable in autograd graphs, unlike inference-mode tensors).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    out_device = input_ids.device
    if input_ids.shape[0] == 0:
        _Net(model)  # still refuse an unsupported model
        return FastOutput(input_ids.new_zeros(0, 0))
    with torch.inference_mode():
        net = _Net(model)
        dev = net.device
        ids = input_ids.to(dev)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev)
        eos = ([] if eos_token_id is None else [int(e) for e in eos_token_id]
               if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)])
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        B, P = ids.shape
        T, M = max_new_tokens, P + max_new_tokens
        if uniforms is not None:
            if uniforms.shape[0] != B or uniforms.shape[1] < T:
                raise ValueError(f"uniforms must be (B={B}, >= max_new_tokens={T}), got {tuple(uniforms.shape)}")
            uniforms = uniforms.to(dev)
        nkv, g, d = net.n_kv, net.n_heads // net.n_kv, net.head_dim
        tokens = torch.full((B, T), pad_token_id, dtype=torch.long, device=dev)
        out_logits = None
        k_cache = [torch.empty(M, B * nkv, d, dtype=net.dtype, device=dev) for _ in net.layers]
        v_cache = [torch.empty(M, B * nkv, d, dtype=net.dtype, device=dev) for _ in net.layers]
        logits, columns = _prefill(net, ids, mask, k_cache, v_cache)
        # additive key mask over the cache columns, -inf on prompt padding, laid out as the
        # (b * n_kv, g, M) score matrices of a decode step
        key_bias = torch.zeros(B, M, dtype=net.dtype, device=dev)
        key_bias[:, :P].masked_fill_(columns == 0, float("-inf"))
        key_bias = key_bias[:, None].expand(B, nkv * g, M).reshape(B * nkv, g, M)
        # positions of the new tokens: last prompt position + 1 + t, as in generate
        last = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -1]
        cos_t, sin_t = net.rope_tables(last[:, None] + 1 + torch.arange(T, device=dev))  # (B, T, d)
        if return_logits:
            out_logits = logits.new_zeros(B, T, logits.shape[-1])

        rows = None  # original row of each row in the batch, once compaction has dropped some
        alive = torch.ones(B, dtype=torch.bool, device=dev)
        b, steps, nxt = B, T, None
        for t in range(T):
            if t > 0:
                logits = net.decode(nxt, P + t - 1, cos_t[:, t - 1, None], sin_t[:, t - 1, None],
                                    k_cache, v_cache, key_bias)
            u = None if uniforms is None else uniforms[:, t] if rows is None else uniforms[rows, t]
            nxt = _pick(logits, greedy, temperature, top_p, generator, u)
            if not eos:
                tokens[:, t] = nxt
                if out_logits is not None:
                    out_logits[:, t] = logits
                continue
            nxt = torch.where(alive, nxt, pad_token_id)
            if rows is None:
                tokens[:, t] = nxt
            else:
                tokens[rows, t] = nxt
            if out_logits is not None:
                out_logits[rows if rows is not None else slice(None), t] = logits * alive[:, None]
            alive &= (nxt != eos_t[0]) if len(eos) == 1 else ~torch.isin(nxt, eos_t)
            n_alive = int(alive.sum())
            if n_alive == 0:
                steps = t + 1
                break
            if compact and t < T - 1 and b - n_alive >= max(1, b // 4):
                keep = alive.nonzero().squeeze(1)
                kv_keep = (keep[:, None] * nkv + torch.arange(nkv, device=dev)).flatten()
                n = P + t  # cache columns written so far
                for cache in (k_cache, v_cache):
                    for i, c in enumerate(cache):
                        new = c.new_empty(M, n_alive * nkv, d)
                        torch.index_select(c[:n], 1, kv_keep, out=new[:n])
                        cache[i] = new
                key_bias = key_bias.index_select(0, kv_keep)
                cos_t, sin_t = cos_t.index_select(0, keep), sin_t.index_select(0, keep)
                rows = keep if rows is None else rows.index_select(0, keep)
                nxt, alive, b = nxt.index_select(0, keep), alive.index_select(0, keep), n_alive
        tokens = tokens[:, :steps]
        if out_logits is not None:
            out_logits = out_logits[:, :steps]
    # leave inference mode: callers train on these tensors
    return FastOutput(tokens.to(out_device).clone(),
                      None if out_logits is None else out_logits.to(out_device).clone())


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P, V) logits of a left-padded batch through the fast path (for checks against HF)."""
    with torch.inference_mode():
        net = _Net(model)
        ids = input_ids.to(net.device)
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(net.device)
        B, P = ids.shape
        kv = [torch.empty(P, B, net.n_kv, net.head_dim, dtype=net.dtype, device=net.device)
              for _ in range(2 * len(net.layers))]
        logits = net.prefill(ids, mask, kv[::2], kv[1::2], all_logits=True)
    return logits.clone()
