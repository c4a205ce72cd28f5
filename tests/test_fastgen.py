"""fastgen against Hugging Face: same greedy tokens, same logits, a sampler that draws from the
model's distribution, EOS and padding as ``generate`` does them, and fallback to HF elsewhere."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import TopPLogitsWarper

from frugalrl import fastgen
from frugalrl.rollout import generate as rollout_generate
from frugalrl.rollout import token_logprobs

torch.set_num_threads(1)

V = 100  # the embedded tokenizer's vocabulary: the rollout tests use it
PAD, EOS = 0, 2
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
              initializer_range=0.2)  # peaky enough that greedy has no near-ties


def _build(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(config).eval()


MODELS = {
    "llama-tied": lambda: _build(LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa-bias": lambda: _build(LlamaForCausalLM, LlamaConfig(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        attention_bias=True, mlp_bias=True)),
    "qwen2": lambda: _build(Qwen2ForCausalLM, Qwen2Config(
        **COMMON, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1000000.0)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    m = MODELS[request.param]()
    for p in m.parameters():  # biases start at zero: make them matter
        if p.ndim == 1 and not torch.all(p == 1):
            torch.nn.init.normal_(p, std=0.2)
    return m


def _batch(lengths, seed=1):
    """Left-padded random prompts (no PAD/EOS inside), lengths as given."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(3, V, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def _hf(model, ids, mask, new, eos=EOS, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, pad_token_id=PAD,
                             eos_token_id=eos, **kw)
    return out[:, ids.shape[1]:]


def _full_logits(model, ids, mask, new_tokens):
    """HF logits over prompt + completion, positions as Rollout.model_inputs computes them."""
    full = torch.cat([ids, new_tokens], 1)
    m = torch.cat([mask, torch.ones_like(new_tokens)], 1)
    with torch.no_grad():
        return model(input_ids=full, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits


def test_supported(model):
    assert fastgen.supports(model)


@pytest.mark.parametrize("compact", [True, False])
def test_greedy_matches_hf(model, compact):
    ids, mask = _batch([5, 1, 9, 3, 9, 7])
    no_eos = V + 1  # never emitted: every row runs the full length
    ref = _hf(model, ids, mask, 20, eos=no_eos, do_sample=False)
    out = fastgen.generate(model, ids, mask, max_new_tokens=20, eos_token_id=no_eos, pad_token_id=PAD,
                           greedy=True, compact=compact)
    assert torch.equal(out.tokens, ref)
    assert len(set(ref.flatten().tolist())) > 3  # not a degenerate model


def test_greedy_matches_hf_with_eos(model):
    ids, mask = _batch([4, 8, 2, 8, 6, 1, 3, 5], seed=3)
    free = _hf(model, ids, mask, 16, eos=V + 1, do_sample=False)
    eos = int(free[0, 5])  # a token row 0 emits mid-way: some rows stop early, some may not
    ref = _hf(model, ids, mask, 16, eos=eos, do_sample=False)
    for compact in (True, False):
        out = fastgen.generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD,
                               greedy=True, compact=compact)
        assert torch.equal(out.tokens, ref), compact


def test_unfused_weights_match(model, monkeypatch):
    """Large models use the weights in place (no fused copies): same tokens."""
    ids, mask = _batch([3, 6, 6, 2])
    fused = fastgen.generate(model, ids, mask, max_new_tokens=12, eos_token_id=V + 1, greedy=True,
                             return_logits=True)
    monkeypatch.setattr(fastgen, "_FUSE_MAX_ELEMENTS", 0)
    net = fastgen._Net(model)
    assert isinstance(net.layers[0].wqkv, tuple)
    plain = fastgen.generate(model, ids, mask, max_new_tokens=12, eos_token_id=V + 1, greedy=True,
                             return_logits=True)
    assert torch.equal(fused.tokens, plain.tokens)
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_prefill_logits_match_hf(model):
    ids, mask = _batch([5, 1, 9, 3])
    ours = fastgen.forward(model, ids, mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() < 1e-4


@pytest.mark.parametrize("greedy", [True, False])
def test_step_logits_match_hf_forward(model, greedy):
    ids, mask = _batch([6, 2, 9, 4, 9])
    torch.manual_seed(0)
    out = fastgen.generate(model, ids, mask, max_new_tokens=10, eos_token_id=V + 1, greedy=greedy,
                           return_logits=True, temperature=1.0)
    ref = _full_logits(model, ids, mask, out.tokens)
    P = ids.shape[1]
    assert out.logits.shape == (5, 10, V)
    assert (out.logits - ref[:, P - 1:-1]).abs().max() < 1e-4


def test_step_logits_after_compaction(model):
    """Rows that keep going after others stop (and are dropped from the batch) still see
    exactly their own context."""
    ids, mask = _batch([6, 2, 9, 4, 9, 5, 7, 3], seed=5)
    ids[:4], mask[:4] = ids[0], mask[0]  # half the rows: one prompt, whose first token becomes EOS
    eos = int(fastgen.generate(model, ids[:1], mask[:1], max_new_tokens=1, greedy=True).tokens[0, 0])
    out = fastgen.generate(model, ids, mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=PAD, greedy=True,
                           return_logits=True)
    assert torch.all(out.tokens[:4, 0] == eos) and out.tokens.shape[1] > 2  # compaction after step 0
    assert torch.equal(out.tokens, _hf(model, ids, mask, 14, eos=eos, do_sample=False))
    ref = _full_logits(model, ids, mask, out.tokens)[:, ids.shape[1] - 1:-1]
    is_eos = (out.tokens == eos).long()
    before = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
    assert (out.logits - ref).abs()[before].max() < 1e-4
    assert torch.all(out.logits[~before] == 0)


def _with_prefix(prefix_len, suffix_lengths, seed=7):
    """Left-padded prompts that all start with the same ``prefix_len`` tokens, then rows of their
    own of ``suffix_lengths`` tokens (no PAD/EOS inside)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, V, (prefix_len,), generator=g)
    rows = [torch.cat([prefix, torch.randint(3, V, (n,), generator=g)]) for n in suffix_lengths]
    P = max(len(r) for r in rows)
    ids, mask = torch.full((len(rows), P), PAD), torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):], mask[i, P - len(r):] = r, 1
    return ids, mask


def test_shared_prefix_is_every_rows_start():
    ids, mask = _with_prefix(10, [3, 1, 6, 3])
    assert fastgen.shared_prefix(ids, mask) == 10
    ids[2, -1] = ids[0, -1]  # the rows' own tokens may agree elsewhere: only the start counts
    assert fastgen.shared_prefix(ids, mask) == 10
    # a row that is the prefix alone keeps its last token: it starts that row's completion
    ids, mask = _with_prefix(10, [3, 0, 6])
    assert fastgen.shared_prefix(ids, mask) == 9
    assert fastgen.shared_prefix(*_batch([5, 4, 6])) == 0 and fastgen.shared_prefix(ids[:1], mask[:1]) == 0


@pytest.mark.parametrize("min_prefix", [1, 10 ** 6])  # the prefix run once, or every prompt whole
def test_prompts_with_a_shared_prefix_match_hf(model, monkeypatch, min_prefix):
    """A system prompt that every prompt starts with, prefilled once into every row's first
    columns: the same greedy tokens and step logits as Hugging Face, groups and EOS included."""
    monkeypatch.setattr(fastgen, "MIN_SHARED_PREFIX", min_prefix)
    prefill, pasts = fastgen._Net.prefill, []

    def counting(self, ids, mask, k_out, v_out, all_logits=False, past=None):
        pasts.append(None if past is None else past[0][0].shape[0])
        return prefill(self, ids, mask, k_out, v_out, all_logits, past)

    monkeypatch.setattr(fastgen._Net, "prefill", counting)
    ids, mask = _with_prefix(12, [4, 1, 7, 3, 7, 2])
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)  # groups of 2
    free = _hf(model, ids, mask, 12, eos=V + 1, do_sample=False)
    eos = int(free[1, 4])  # some rows stop early
    out = fastgen.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, greedy=True,
                           return_logits=True)
    assert torch.equal(out.tokens, _hf(model, ids, mask, 12, eos=eos, do_sample=False))
    ref = _full_logits(model, ids, mask, out.tokens)[:, ids.shape[1] - 1:-1]
    is_eos = (out.tokens == eos).long()
    before = (is_eos.cumsum(1) - is_eos) == 0
    assert (out.logits - ref).abs()[before].max() < 1e-4
    # the prefix alone, then the 6 distinct prompts' rest on it; or the 6 distinct prompts whole
    assert pasts == ([None, 12] if min_prefix == 1 else [None])


def test_first_token_distribution(model):
    """Many samples of one prompt: first-token frequencies ~ softmax(logits / temperature)."""
    ids, mask = _batch([5])
    n, temp = 20000, 0.8
    out = fastgen.generate(model, ids.expand(n, -1), mask.expand(n, -1), max_new_tokens=1, eos_token_id=None,
                           temperature=temp, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = (model(input_ids=ids, attention_mask=mask).logits[0, -1] / temp).softmax(-1)
    freq = torch.bincount(out.tokens[:, 0], minlength=V).float() / n
    assert 0.5 * (freq - probs).abs().sum() < 0.04  # total variation; ~0.02 expected from noise


def test_top_p(model):
    ids, mask = _batch([4])
    n, top_p = 5000, 0.6
    out = fastgen.generate(model, ids.expand(n, -1), mask.expand(n, -1), max_new_tokens=1, eos_token_id=None,
                           top_p=top_p, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    kept = TopPLogitsWarper(top_p)(None, logits.clone())[0].isfinite()
    assert 1 < kept.sum() < V
    drawn = torch.bincount(out.tokens[:, 0], minlength=V)
    assert torch.all(drawn[~kept] == 0)
    probs = logits[0].masked_fill(~kept, float("-inf")).softmax(-1)
    assert 0.5 * (drawn.float() / n - probs).abs().sum() < 0.05


def test_top_p_filter_matches_hf():
    g = torch.Generator().manual_seed(0)
    for top_p in (0.05, 0.3, 0.9, 0.999):
        scores = torch.randn(16, 50, generator=g) * 3
        ours = fastgen._top_p_filter(scores.clone(), top_p)
        ref = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(ours.isinf(), ref.isinf()) and torch.equal(ours[ours.isfinite()], scores[ours.isfinite()])


def test_categorical_never_draws_zero_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4000 + [[0.0, 0.0, 0.0, 0.0, 1.0]] * 10)
    draws = fastgen._categorical(probs, torch.Generator().manual_seed(0))
    assert set(draws[:4000].tolist()) == {1, 3} and set(draws[4000:].tolist()) == {4}
    assert abs((draws[:4000] == 1).float().mean().item() - 0.5) < 0.04


def test_seed_reproducible(model):
    ids, mask = _batch([3, 7, 5])
    a, b = (fastgen.generate(model, ids, mask, max_new_tokens=12, eos_token_id=EOS, top_p=0.9,
                             generator=torch.Generator().manual_seed(7)).tokens for _ in range(2))
    assert torch.equal(a, b)


def test_eos_then_padding(model):
    ids, mask = _batch([2, 6, 4, 6, 1, 3], seed=4)
    torch.manual_seed(0)
    free = fastgen.generate(model, ids, mask, max_new_tokens=24, eos_token_id=None, temperature=1.5).tokens
    eos = int(torch.mode(free.flatten()).values)  # a token the sampler emits often
    out = fastgen.generate(model, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD,
                           temperature=1.5, generator=torch.Generator().manual_seed(0)).tokens
    for row in out.tolist():
        if eos in row:
            k = row.index(eos)
            assert all(t == PAD for t in row[k + 1:])
    assert any(eos in row for row in out.tolist())
    # the loop ends as soon as every row has emitted EOS: the last column has an EOS in it
    if out.shape[1] < 24:
        assert (out == eos).any(1).all() and (out[:, -1] == eos).any()


def test_stops_when_all_finished(model):
    ids, mask = _batch([3, 3])
    first = fastgen.generate(model, ids, mask, max_new_tokens=1, greedy=True).tokens
    ids = torch.cat([ids[:1], ids[:1]])  # same prompt twice: both emit the same first token
    mask = torch.cat([mask[:1], mask[:1]])
    eos = int(first[0, 0])
    out = fastgen.generate(model, ids, mask, max_new_tokens=10, eos_token_id=[V + 5, eos], greedy=True)
    assert out.tokens.shape == (2, 1) and torch.all(out.tokens == eos)


def test_train_mode_and_outputs_usable_in_autograd(model, tokenizer):
    model.train()
    try:
        r = rollout_generate(model, tokenizer, ["12+3=", "7*8="] * 2, max_new_tokens=6, greedy=True, backend="fast")
        assert model.training
        lp = token_logprobs(model, r)
        lp.sum().backward()  # inference-mode tensors would refuse this
        assert model.lm_head.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_rollout_backends_agree(model, tokenizer):
    prompts = ["12+3=", "(4+5)*6=", "7="]
    fast = rollout_generate(model, tokenizer, prompts, max_new_tokens=12, greedy=True, backend="fast")
    hf = rollout_generate(model, tokenizer, prompts, max_new_tokens=12, greedy=True, backend="hf")
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(fast, field), getattr(hf, field)), field
    assert fast.texts == hf.texts


def test_bfloat16_as_accurate_as_hf(model):
    """In bfloat16, fastgen's logits are as close to the float32 ones as HF's own bfloat16 logits."""
    ids, mask = _batch([5, 2, 7])
    real = mask.bool()
    low = copy.deepcopy(model).to(torch.bfloat16)
    assert fastgen.supports(low)
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
        hf_err = (low(input_ids=ids, attention_mask=mask).logits.float() - exact).abs()[real].max()
    our_err = (fastgen.forward(low, ids, mask).float() - exact).abs()[real].max()
    assert our_err <= 1.5 * hf_err + 0.01, (our_err, hf_err)
    out = fastgen.generate(low, ids, mask, max_new_tokens=5, eos_token_id=None)
    assert out.tokens.shape == (3, 5)


def test_unsupported_models_fall_back(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      eos_token_id=EOS, bos_token_id=1, pad_token_id=PAD)).eval()
    scaled = LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 10000.0}))
    sliding = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                           max_window_layers=0))
    gelu = LlamaForCausalLM(LlamaConfig(**COMMON, hidden_act="gelu"))
    for m in (gpt2, scaled, sliding, gelu):
        assert not fastgen.supports(m)
        with pytest.raises(ValueError, match="fastgen does not support"):
            fastgen.generate(m, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2)
    r = rollout_generate(gpt2, tokenizer, ["1+1=", "23="], max_new_tokens=4, greedy=True)  # auto -> HF
    assert r.completion_ids.shape[0] == 2
    with pytest.raises(ValueError, match="fastgen does not support"):
        rollout_generate(gpt2, tokenizer, ["1+1="], max_new_tokens=4, backend="fast")
    with pytest.raises(ValueError, match="backend"):
        rollout_generate(gpt2, tokenizer, ["1+1="], max_new_tokens=4, backend="vllm")


def _lora(model, **extra):
    """``model`` (a copy) with a peft LoRA adapter on every linear layer, B random so that it matters."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **extra))
    torch.manual_seed(5)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return wrapped.eval()


def test_lora_model_takes_the_fast_path_as_merged_weights(model):
    wrapped = _lora(model)
    assert fastgen.supports(wrapped)
    ids, mask = _batch([5, 1, 9, 3], seed=4)
    with torch.no_grad():
        hf = wrapped(input_ids=ids, attention_mask=mask).logits
        base = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    ours = fastgen.forward(wrapped, ids, mask)
    assert (hf - base).abs()[real].max() > 0.1  # the adapter changes the model
    assert torch.allclose(ours[real], hf[real], atol=1e-4), (ours - hf).abs()[real].max()
    ref = _hf(wrapped, ids, mask, 12, eos=V + 1, do_sample=False)
    out = fastgen.generate(wrapped, ids, mask, max_new_tokens=12, eos_token_id=V + 1, pad_token_id=PAD, greedy=True)
    assert torch.equal(out.tokens, ref)
    with wrapped.disable_adapter():  # the reference policy: the base model's logits
        assert torch.allclose(fastgen.forward(wrapped, ids, mask)[real], base[real], atol=1e-4)
    for name, p in wrapped.named_parameters():  # merged out of place: the base weights are as they were
        if "base_layer" in name:
            assert torch.equal(p, dict(model.named_parameters())[name.replace("base_model.model.", "", 1)
                                                                   .replace(".base_layer", "")]), name


def test_lora_variants_fall_back(model):
    assert not fastgen.supports(_lora(model, use_dora=True))
