"""Rollout: prompts -> completions with Hugging Face ``generate`` (KV cache), as padded tensors.

A rollout keeps the left-padded prompts and the right-padded completions side by side, so the
training forward pass sees exactly the token positions that generation saw.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from frugalrl import fastgen, lora
from frugalrl.distributed import private_rng
from frugalrl.losses import TokenOutputs  # what the losses read: the rollout knows them, never the reverse


@dataclass
class Rollout:
    """N sequences. P = longest prompt, T = longest completion (both in tokens).

    prompt_ids, prompt_mask: (N, P), left-padded. completion_ids, completion_mask: (N, T),
    right-padded; the mask covers the completion up to and including its first stop token
    (``stop_token_ids``: EOS or an end-of-turn token).
    truncated: (N,) bool, True where generation hit max_new_tokens before a stop token.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, index) -> "Rollout":
        """The sub-rollout at ``index`` (a slice, a list of ints or a bool/long tensor)."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        idx = list(range(len(self)))[index] if isinstance(index, slice) else [int(i) for i in index]
        t = torch.tensor(idx, dtype=torch.long)
        return Rollout(self.prompt_ids[t], self.prompt_mask[t], self.completion_ids[t],
                       self.completion_mask[t], self.truncated[t], [self.texts[i] for i in idx])

    @staticmethod
    def cat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """The sequences of ``parts`` one after another, prompts re-padded on the left and
        completions on the right (with ``pad_id``, masked out) to the widest of them."""
        P = max(r.prompt_ids.shape[1] for r in parts)
        T = max(r.completion_ids.shape[1] for r in parts)

        def pad(x, width, left, value):
            extra = width - x.shape[1]
            return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)

        return Rollout(torch.cat([pad(r.prompt_ids, P, True, pad_id) for r in parts]),
                       torch.cat([pad(r.prompt_mask, P, True, 0) for r in parts]),
                       torch.cat([pad(r.completion_ids, T, False, pad_id) for r in parts]),
                       torch.cat([pad(r.completion_mask, T, False, 0) for r in parts]),
                       torch.cat([r.truncated for r in parts]), [t for r in parts for t in r.texts])

    def to(self, device) -> "Rollout":
        """The same rollout with its tensors on ``device``."""
        return Rollout(self.prompt_ids.to(device), self.prompt_mask.to(device), self.completion_ids.to(device),
                       self.completion_mask.to(device), self.truncated.to(device), self.texts)

    def trimmed(self) -> "Rollout":
        """The same sequences without the padding columns that no sequence here needs."""
        first = int((self.prompt_mask.sum(0) > 0).float().argmax()) if len(self) else 0
        T = int(self.completion_mask.sum(1).max().item()) if len(self) else 0
        return Rollout(self.prompt_ids[:, first:], self.prompt_mask[:, first:], self.completion_ids[:, :T],
                       self.completion_mask[:, :T], self.truncated, self.texts)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and position_ids of prompt+completion, (N, P+T) each.

        Positions count real tokens only, as ``generate`` does for left-padded prompts.
        """
        mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": torch.cat([self.prompt_ids, self.completion_ids], dim=1),
                "attention_mask": mask, "position_ids": positions}


def stop_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end a completion, sorted: the tokenizer's EOS and every id of the
    model's ``generation_config.eos_token_id`` (an int or a list).

    Chat models end a turn with an id that only the generation config lists (Qwen2.5's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``); stopping at the tokenizer's EOS alone would run
    every completion on to ``max_new_tokens``.
    """
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if listed is None else list(listed) if isinstance(listed, (list, tuple)) else [listed]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids})


def _completion_mask(ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) mask up to and including the first of ``stop_ids``, and (N,) truncated flags."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, dtype=ids.dtype, device=ids.device))
    has_stop = is_stop.any(dim=1)
    first = torch.where(has_stop, is_stop.float().argmax(dim=1),
                        torch.full_like(has_stop, ids.shape[1], dtype=torch.long))
    mask = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) <= first.unsqueeze(1)
    return mask.float(), ~has_stop


def encode_prompts(tokenizer, prompts: list[str]):
    """The prompts as left-padded ``input_ids`` and ``attention_mask``, (N, P) each."""
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")


def make_rollout(tokenizer, enc, completion: torch.Tensor, stop_ids: list[int]) -> Rollout:
    """The Rollout of prompts ``enc`` (``encode_prompts``) and sampled tokens ``completion`` (N, T):
    everything after a sequence's first stop token (``stop_token_ids``) becomes padding, and the
    texts are decoded."""
    mask, truncated = _completion_mask(completion, stop_ids)
    completion = completion.masked_fill(~mask.bool(), tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    return Rollout(enc["input_ids"], enc["attention_mask"], completion, mask, truncated, texts)


_BACKENDS = ("auto", "hf", "fast")


@contextmanager
def _rng_from(uniforms: torch.Tensor | None, device: torch.device):
    """Without ``uniforms``, nothing; with them, a private torch RNG (CPU and ``device``) seeded
    from their first value, restored on exit."""
    if uniforms is None:
        yield
        return
    with private_rng(device):
        torch.manual_seed(int(float(uniforms.flatten()[0]) * 2**52))
        yield


@contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) inside the block, back in its former mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, backend: str = "auto",
             uniforms: torch.Tensor | None = None) -> Rollout:
    """One completion per entry of ``prompts`` (repeat a prompt G times for a group of G).

    ``backend``: "fast" samples with :mod:`frugalrl.fastgen` (Llama / Qwen2 models only), "hf"
    with Hugging Face ``generate``, "auto" (default) with fastgen wherever it supports the model.
    Both sample from softmax(logits / temperature) after top-p and stop at any of
    ``stop_token_ids``; fastgen ignores any other settings in ``model.generation_config``.

    ``uniforms`` (N, >= max_new_tokens) in (0, 1] fix the random draws: fastgen draws token t of
    completion n at ``uniforms[n, t]``, the same whatever else is in the batch; Hugging Face
    ``generate`` samples from a private RNG seeded from them. Either way the global torch RNG
    is not advanced.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in encode_prompts(tokenizer, prompts).items()}
    stop_ids = stop_token_ids(model, tokenizer)
    use_fast = backend == "fast" or (backend == "auto" and fastgen.supports(model))
    if use_fast:
        completion = fastgen.generate(
            model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
            temperature=temperature, top_p=top_p, greedy=greedy, uniforms=uniforms).tokens
    else:
        # top_k=0: HF samples from the top 50 tokens by default, a silent truncation we don't want.
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
        with eval_mode(model), _rng_from(uniforms, device):
            out = model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=not greedy,
                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids, **sampling)
        completion = out[:, enc["input_ids"].shape[1]:]
    return make_rollout(tokenizer, enc, completion, stop_ids)


def _inner(model):
    """The transformers model inside a DDP or peft wrapper, or a LoRA policy's reference."""
    if isinstance(model, lora.AdapterDisabled):
        model = model.model
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _keeps_logits(model) -> bool:
    """Whether ``model`` (or the model inside a DDP or peft wrapper) takes transformers'
    ``logits_to_keep`` (the last N positions' logits only)."""
    inner = _inner(model)
    return "logits_to_keep" in inspect.signature(getattr(inner, "forward", inner)).parameters


def prompt_groups(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct prompts of ``rollout``: (U,) the row of each one's first occurrence, and (N,)
    the distinct prompt (0..U-1) of each row. Rows are equal when their real tokens are."""
    rows = rollout.prompt_ids.masked_fill(rollout.prompt_mask == 0, -1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    n = len(rollout)
    first = torch.full((int(inverse.max()) + 1 if n else 0,), n, dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=inverse.device), "amin")
    return first, inverse


# Packed forward passes are built only up to this many tokens: the attention mask is L x L.
MAX_PACKED_TOKENS = 4096


@dataclass
class Packed:
    """A rollout's N rows as one sequence of L tokens, each token computed once: the prefix that
    every distinct prompt starts with, then the rest of each of the U distinct prompts, then each
    row's completion but its last token; no padding. A tree, not a chain: a token sees (``mask``)
    the tokens before it on its own branch only (prefix -> its prompt -> its row's completion),
    at the position it has in its own row (``Rollout.model_inputs``).

    input_ids, position_ids: (1, L). prompt_of: (L,) the distinct prompt a token belongs to
    (-1: the shared prefix; a completion token: its row's prompt). row_of: (L,) the row of a
    completion token (-1: a prompt token). keep: (M,) the packed index whose logits predict each
    completion token, M = the true entries of ``completion_mask`` in row-major order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    prompt_of: torch.Tensor
    row_of: torch.Tensor
    keep: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(1, 1, L, L) additive attention mask: 0 where query i may see key j, else dtype's minimum."""
        L = len(self)
        pos = torch.arange(L, device=self.keep.device)
        p, r = self.prompt_of, self.row_of
        sees = ((pos[None, :] <= pos[:, None]) & ((p[None, :] == -1) | (p[None, :] == p[:, None]))
                & ((r[None, :] == -1) | (r[None, :] == r[:, None])))
        blocked = torch.zeros(L, L, dtype=dtype, device=sees.device).masked_fill_(~sees, torch.finfo(dtype).min)
        return blocked[None, None]


def pack(rollout: Rollout) -> Packed:
    """``rollout`` as a ``Packed`` sequence (a group's G rows share their prompt's tokens, all rows
    the prefix every distinct prompt starts with, ``fastgen.shared_prefix``)."""
    first, inverse = prompt_groups(rollout)
    prompts = rollout.select(first)
    ids, real = prompts.prompt_ids, prompts.prompt_mask.bool()  # (U, P), left-padded
    device = ids.device
    at = real.long().cumsum(1) - 1  # a prompt token's position in its prompt
    n = fastgen.shared_prefix(ids, real)
    # 1. the shared prefix, taken from the first prompt
    prefix = real[0] & (at[0] < n)
    # 2. each distinct prompt's own tokens, prompt after prompt
    own = real & (at >= n)
    ends = n + own.sum(1).cumsum(0) - 1  # (U,) the packed index of each prompt's last token
    # 3. each row's completion but its last token, which predicts nothing
    fed = rollout.completion_mask[:, 1:].bool()  # (N, T - 1)
    col = torch.arange(fed.shape[1], device=device).expand_as(fed)
    counts = fed.sum(1)
    starts = int(ends[-1]) + 1 + counts.cumsum(0) - counts  # (N,) the packed index of each row's first
    # completion token t of a row is predicted by its prompt's last token (t = 0), else by its token t - 1
    comp = rollout.completion_mask.bool()
    t = torch.arange(comp.shape[1], device=device).expand_as(comp)
    keep = torch.where(t == 0, ends[inverse][:, None], starts[:, None] + t - 1)[comp]
    rows = torch.arange(len(rollout), device=device)[:, None].expand_as(fed)
    of_prompt = torch.arange(len(first), device=device)[:, None].expand_as(ids)
    return Packed(
        input_ids=torch.cat([ids[0][prefix], ids[own], rollout.completion_ids[:, :-1][fed]])[None],
        position_ids=torch.cat([at[0][prefix], at[own], (real.sum(1)[inverse][:, None] + col)[fed]])[None],
        prompt_of=torch.cat([torch.full((n,), -1, device=device), of_prompt[own],
                             inverse[:, None].expand_as(fed)[fed]]),
        row_of=torch.cat([torch.full((int(ends[-1]) + 1,), -1, device=device), rows[fed]]),
        keep=keep)


def packing_cost(model) -> float | None:
    """What a query-key pair of attention costs ``model``, in units of one token through its
    weights (4 x d x layers FLOPs against 2 x its non-embedding parameters; d = heads x head size):
    the weight of attention in ``tokens_fed``. None where ``model`` cannot take a packed sequence
    (an attention kernel that ignores a 4D mask, such as flash-attention, or no ``logits_to_keep``)."""
    config = _inner(model).config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager") or not _keeps_logits(model):
        return None
    return 2 * attention_width(config) * config.num_hidden_layers / non_embedding_params(model)


def non_embedding_params(model) -> int:
    """Parameters of ``model`` (or the model inside a wrapper) but its input and output embeddings
    (a tied pair counted once): what a token's pass through the layers multiplies."""
    inner = _inner(model)
    embeddings = {id(m.weight) for m in (inner.get_input_embeddings(), inner.get_output_embeddings()) if m is not None}
    return sum(p.numel() for p in inner.parameters() if id(p) not in embeddings)


def attention_width(config) -> int:
    """d = heads x head size: a query-key product and a value sum cost 2 x d FLOPs each, a layer."""
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def _plan(rollout: Rollout, packing: float | None) -> tuple[float, Packed | None]:
    """What ``forward_completions`` costs for ``rollout`` (trimmed, as a micro-batch is), in
    token passes, and the ``Packed`` sequence it runs (None: whole rows). Cost: the tokens fed,
    padding included, plus ``packing`` (``packing_cost``) x the query-key pairs attention computes.
    Whole rows: N x (P + T) tokens, N x (P + T)^2 pairs. Packed (``pack``; where ``packing`` is not
    None, the sequence is at most ``MAX_PACKED_TOKENS`` long and it costs less): L tokens, L^2 pairs
    (the mask is dense)."""
    width = rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
    whole = len(rollout) * width * (1 + (packing or 0.0) * width)
    if packing is None or not rollout.completion_ids.shape[1]:
        return whole, None
    packed = pack(rollout)
    L = len(packed)
    cost = L * (1 + packing * L)
    return (whole, None) if L > MAX_PACKED_TOKENS or cost >= whole else (cost, packed)


def tokens_fed(rollout: Rollout, packing: float | None) -> float:
    """``_plan``'s cost: the one ``update`` orders micro-batches by."""
    return _plan(rollout, packing)[0]


def _packed_forward(model, rollout: Rollout, packed: Packed, hidden: bool):
    """Logits (N, T, V) that predict each completion token (0 at padding), and the last layer's
    hidden states (N, T, H) they come from (None unless ``hidden``), from one call of ``model``
    over ``packed``: each token, and so each weight's gradient, computed once. Same positions
    and attention as ``Rollout.model_inputs``: only round-off differs."""
    dtype = _inner(model).dtype
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=packed.mask(dtype),
                logits_to_keep=packed.keep, use_cache=False, output_hidden_states=hidden)
    comp = rollout.completion_mask.bool()
    logits = out.logits.new_zeros(*comp.shape, out.logits.shape[-1])
    logits[comp] = out.logits[0]
    if not hidden:
        return logits, None
    last = out.hidden_states[-1][0]
    states = last.new_zeros(*comp.shape, last.shape[-1])
    states[comp] = last[packed.keep]
    return logits, states


def forward_completions(model, rollout: Rollout, temperature: float = 1.0, *, entropy: bool = False,
                        hidden: bool = False, packing: float | None = None) -> TokenOutputs:
    """One forward pass of ``model`` over prompt+completion; per-token outputs of the completion.

    Logits are divided by the sampling temperature, so that the log-probs (and the entropy)
    are those of the distribution the completions were sampled from.

    ``packing``: the model's ``packing_cost``, to run the rows packed (``pack``: each distinct
    prompt and the prefix all prompts start with once, no padding) where that costs less
    (``_plan``); with chat prompts several times longer than the answers, shared prompts are
    most of a training pass's tokens. None: every row runs whole.
    """
    P, T = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    _, packed = _plan(rollout, packing)
    if packed is not None:
        logits, states = _packed_forward(model, rollout, packed, hidden)
    else:
        inputs = rollout.model_inputs()
        if _keeps_logits(model):
            # Logits at the completion's positions only: a prompt position's logits are never used, and
            # with a large vocabulary (SmolLM2: 49,152) they cost as much as the rest of the forward pass.
            inputs["logits_to_keep"] = T + 1
        out = model(**inputs, output_hidden_states=hidden)
        logits = out.logits[:, -T - 1:-1]
        states = out.hidden_states[-1][:, P - 1:-1] if hidden else None
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # select rather than multiply: 0 * inf and 0 * NaN are NaN, and padding's logits may be either
    keep = rollout.completion_mask.bool()
    log_z = logits.logsumexp(-1)
    picked = logits.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    result = TokenOutputs(torch.where(keep, picked - log_z, 0.0))
    if entropy:
        result.entropy = torch.where(keep, log_z - (logits.softmax(-1) * logits).sum(-1), 0.0)
    result.hidden = states
    return result


def token_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """(N, T) log-probabilities of the completion tokens under ``model`` (0 where masked)."""
    return forward_completions(model, rollout, temperature).logprobs
