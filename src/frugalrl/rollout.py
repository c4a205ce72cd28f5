"""Rollout: prompts -> completions with Hugging Face ``generate`` (KV cache), as padded tensors.

A rollout keeps the left-padded prompts and the right-padded completions side by side, so the
training forward pass sees exactly the token positions that generation saw.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from frugalrl import fastgen, lora, sharding
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


def _prompt_plan(rollout: Rollout) -> tuple[torch.Tensor, Rollout, int]:
    """How ``_shared_prompt_forward`` runs ``rollout``'s prompts: (N,) the distinct prompt of each
    row (``prompt_groups``), the U distinct prompts (trimmed among themselves), and the tokens
    they all start with that run once (``fastgen.prefix_to_share``; 0 for none)."""
    first, inverse = prompt_groups(rollout)
    prompts = rollout.select(first).trimmed()
    return inverse, prompts, fastgen.prefix_to_share(prompts.prompt_ids, prompts.prompt_mask)


def _shared_tokens(rollout: Rollout, plan: tuple[torch.Tensor, Rollout, int]) -> int | None:
    """Token positions that ``_shared_prompt_forward`` feeds the model for ``rollout`` under
    ``plan`` (``_prompt_plan``); None where there is nothing to share (one call over whole rows
    then, not two)."""
    _, prompts, n = plan
    N, U, T = len(rollout), len(prompts), rollout.completion_ids.shape[1]
    if not T or (U == N and not n):
        return None
    return n + U * (prompts.prompt_ids.shape[1] - n) + N * (T - 1)


def tokens_fed(rollout: Rollout, share_prompts: bool) -> int:
    """Token positions (padding included) that ``forward_completions`` feeds the model for
    ``rollout`` (trimmed as a micro-batch is): N x (P + T) for whole rows; with shared prompts,
    where a prompt repeats or all start alike, n for the prefix that every prompt starts with
    (``fastgen.prefix_to_share``), U x (P' - n) for the rest of the U distinct prompts (trimmed
    among themselves to P') and N x (T - 1) for the completions, if that is fewer. The cost that
    ``update`` orders micro-batches by."""
    whole = len(rollout) * (rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1])
    shared = _shared_tokens(rollout, _prompt_plan(rollout)) if share_prompts else None
    return whole if shared is None else min(whole, shared)


def _cache_argument(model) -> str | None:
    """The name under which ``model`` takes and returns a KV cache: "cache" (transformers >= 5.2x),
    "past_key_values" (before), or None where prompts cannot be shared: no cache argument,
    gradient checkpointing (which drops the cache in training), sharded (FSDP's collectives expect
    one forward per backward), or no ``logits_to_keep``."""
    inner = _inner(model)
    forward = getattr(inner, "forward", None)
    checkpointing = next((name for name in ("is_activation_checkpointing", "is_gradient_checkpointing")
                          if hasattr(type(inner), name)), None)  # renamed in transformers 5.x
    if forward is None or (checkpointing and getattr(inner, checkpointing)) or sharding.is_sharded(model):
        return None
    if not _keeps_logits(model):
        return None
    params = inspect.signature(forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


# Non-embedding parameters per layer below which sharing prompts does not pay: a layer that small
# costs its calls (Python, dispatch) more than its tokens, and sharing adds a call or two per
# micro-batch. Measured on 2 CPU cores, the same samples either way: the embedded model (0.26 M
# per layer) updated in 1.05x the time with shared prompts, SmolLM2-135M (3.5 M per layer) in 0.62x.
MIN_LAYER_PARAMS = 1_000_000


def shares_prompts(model) -> bool:
    """Whether ``forward_completions`` should share prompts for ``model``: it can
    (``_cache_argument``) and its layers hold at least ``MIN_LAYER_PARAMS`` parameters each."""
    if _cache_argument(model) is None:
        return False
    inner = _inner(model)
    embeddings = {id(m.weight) for m in (inner.get_input_embeddings(), inner.get_output_embeddings()) if m is not None}
    params = sum(p.numel() for p in inner.parameters() if id(p) not in embeddings)
    return params / inner.config.num_hidden_layers >= MIN_LAYER_PARAMS


def _shared_prompt_forward(model, rollout: Rollout, plan: tuple[torch.Tensor, Rollout, int], hidden: bool):
    """Logits (N, T, V) that predict each completion token, and the last layer's hidden states
    (N, T, H) they come from (None unless ``hidden``), with each distinct prompt run once.

    ``plan``: ``_prompt_plan(rollout)``. The prefix that every distinct prompt starts with (a chat
    template's system prompt), if any, runs first, then the rest of the U distinct prompts on its KV cache, then
    the completions on theirs; each cache is expanded to the next level's rows by an index, so
    the gradient of every row reaches the activations it shares. The prompt's last position
    predicts the first completion token; a completion's last token predicts nothing, so it is
    not run. Same positions and attention as ``Rollout.model_inputs``: only round-off differs.
    """
    name = _cache_argument(model)
    inverse, prompts, n = plan
    ids, mask = prompts.prompt_ids, prompts.prompt_mask.long()
    U, P = ids.shape
    before = {}
    if n:
        start = P - int(mask[0].sum())  # the first distinct prompt's first real column
        prefix = model(input_ids=ids[:1, start:start + n], use_cache=True, logits_to_keep=1,
                       attention_mask=mask[:1, start:start + n], position_ids=torch.arange(n, device=ids.device)[None])
        before = {name: getattr(prefix, name)}
        before[name].batch_select_indices(torch.zeros(U, dtype=torch.long, device=ids.device))
        # the rest of each prompt, left-padded: in columns n.. of the prompt, where its mask's first P - n say
        ids, mask = ids[:, n:], mask[:, :P - n]
    seen = torch.cat([mask.new_ones(U, n), mask], 1)  # the prompt columns each prompt's cache holds
    out = model(input_ids=ids, attention_mask=seen, position_ids=n + (mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1, output_hidden_states=hidden, **before)
    logits = out.logits[inverse]
    states = out.hidden_states[-1][inverse, -1:] if hidden else None
    T = rollout.completion_ids.shape[1]
    if T > 1:
        cache = getattr(out, name)
        cache.batch_select_indices(inverse)
        lengths = seen.sum(1, keepdim=True)[inverse]
        rest = model(input_ids=rollout.completion_ids[:, :-1], **{name: cache}, use_cache=True,
                     attention_mask=torch.cat([seen[inverse], rollout.completion_mask[:, :-1].long()], dim=1),
                     position_ids=lengths + torch.arange(T - 1, device=lengths.device),
                     output_hidden_states=hidden)
        logits = torch.cat([logits, rest.logits], dim=1)
        if hidden:
            states = torch.cat([states, rest.hidden_states[-1]], dim=1)
    return logits, states


def forward_completions(model, rollout: Rollout, temperature: float = 1.0, *, entropy: bool = False,
                        hidden: bool = False, share_prompts: bool = False) -> TokenOutputs:
    """One forward pass of ``model`` over prompt+completion; per-token outputs of the completion.

    Logits are divided by the sampling temperature, so that the log-probs (and the entropy)
    are those of the distribution the completions were sampled from.

    ``share_prompts``: where rows repeat a prompt (the G samples of a group) or all prompts start
    alike (a system prompt), and the model allows it (``_cache_argument``), each distinct prompt
    and the common prefix are run once and their KV caches shared (``_shared_prompt_forward``)
    if that feeds fewer tokens (``tokens_fed``); with chat prompts several times longer than the
    answers, that is most of a training pass's tokens. Otherwise every row runs whole. Whether
    it pays for a model at all is ``shares_prompts``'s to say.
    """
    P, T = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    plan = _prompt_plan(rollout) if share_prompts and _cache_argument(model) else None
    shared = None if plan is None else _shared_tokens(rollout, plan)
    if shared is not None and shared < len(rollout) * (P + T):
        logits, states = _shared_prompt_forward(model, rollout, plan, hidden)
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
