"""Rollouts (rollout.py): where completions stop, and how padding is masked."""

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from frugalrl import evaluation, lora, rollout, vstar
from frugalrl.config import load_config
from frugalrl.data import Task
from frugalrl.embedded import build_tokenizer
from frugalrl.losses import astar_loss
from frugalrl.models import load_policy, prepare_for_training
from frugalrl.rollout import Rollout, forward_completions, generate, stop_token_ids

END_OF_TURN = "<|im_end|>"
ROWS = [{"id": f"p{i}", "prompt": f"{i}+1=", "answer": "7"} for i in range(4)]


def _always_one(prompts, completions, **columns):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Llama saved as a chat model is: its turns end with END_OF_TURN, a special token
    that ``generation_config.json`` lists as an eos id beside the tokenizer's EOS, and it emits
    END_OF_TURN at once whatever the prompt."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_TURN]})
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # every token's embedding carries a large first coordinate, which the layers barely
        # change, so the final normalised state points along it; only END_OF_TURN's output
        # row reads it, so END_OF_TURN wins by a margin of ~50 nats
        model.model.embed_tokens.weight[:, 0] = 1000.0
        model.lm_head.weight[eot] = 0.0
        model.lm_head.weight[eot, 0] = 10.0
    path = tmp_path_factory.mktemp("chat_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=[tokenizer.eos_token_id, eot]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_policy(chat_model_dir):
    """(model, tokenizer, END_OF_TURN's id), loaded as a run loads its policy."""
    model, tokenizer = load_policy(load_config(overrides=[f"model.name_or_path={chat_model_dir}",
                                                          "model.device=cpu"]))
    return model, tokenizer, tokenizer.convert_tokens_to_ids(END_OF_TURN)


def _assert_stopped_at_once(ro: Rollout, eot: int) -> None:
    assert ro.completion_ids.shape[1] >= 1 and (ro.completion_ids[:, 0] == eot).all()
    assert ro.completion_mask.sum(1).tolist() == [1.0] * len(ro)
    assert not ro.truncated.any()


def test_stop_ids_are_the_tokenizers_eos_and_the_generation_configs(chat_policy):
    model, tokenizer, eot = chat_policy
    assert stop_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, eot})
    model.generation_config.eos_token_id = eot  # an int, not a list
    try:
        assert stop_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, eot})
    finally:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, eot]


@pytest.mark.parametrize("backend", ["fast", "hf"])
@pytest.mark.parametrize("greedy", [True, False])
def test_generation_stops_at_the_generation_configs_end_of_turn(chat_policy, backend, greedy):
    model, tokenizer, eot = chat_policy
    ro = generate(model, tokenizer, [r["prompt"] for r in ROWS], max_new_tokens=8, greedy=greedy, backend=backend)
    _assert_stopped_at_once(ro, eot)
    assert ro.texts == [""] * len(ROWS)  # the special token is not part of the text


@pytest.fixture
def sampled(monkeypatch):
    """Every rollout that evaluation and A*-PO's stage 1 sample."""
    rollouts = []

    def recording(*args, **kwargs):
        rollouts.append(rollout.generate(*args, **kwargs))
        return rollouts[-1]

    for module in (evaluation, vstar):
        monkeypatch.setattr(module, "generate", recording)
    return rollouts


def test_evaluation_stops_at_the_end_of_turn(chat_policy, sampled):
    model, tokenizer, eot = chat_policy
    evaluation.evaluate(model, tokenizer, ROWS, _always_one, max_new_tokens=8, pass_k=2)
    assert len(sampled) == 2  # greedy, then pass@k
    for ro in sampled:
        _assert_stopped_at_once(ro, eot)


def test_vstar_stage_one_stops_at_the_end_of_turn(tmp_path, chat_model_dir, chat_policy, sampled):
    model, tokenizer, eot = chat_policy
    cfg = load_config(overrides=[f"model.name_or_path={chat_model_dir}", f"model.cache_dir={tmp_path}",
                                 "algo.estimator=astar", "algo.vstar_n=2", "rollout.max_new_tokens=8",
                                 "rollout.batch_prompts=2", "rollout.group_size=1", "rollout.temperature=1.0"])
    vstar.build_cache(cfg, model, tokenizer, Task(ROWS, ROWS[:1], _always_one), path=tmp_path / "v.json")
    assert sampled
    for ro in sampled:
        _assert_stopped_at_once(ro, eot)


def test_non_finite_values_at_padded_positions_do_not_reach_the_sums():
    """Token log-probs, entropies and A*-PO's sequence log-probs (their sums) ignore whatever
    the model computed at padded completion positions, inf and NaN included."""
    V, P = 4, 1
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ro = Rollout(torch.ones(2, P, dtype=torch.long), torch.ones(2, P), torch.tensor([[1, 2, 0], [3, 0, 0]]), mask,
                 torch.zeros(2, dtype=torch.bool), ["", ""])
    # uniform logits where they count: log pi = -log V and entropy = log V at any temperature
    logits = torch.zeros(2, P + 3, V)
    logits[0, P - 1 + 2] = float("nan")
    logits[1, P - 1 + 1] = float("inf")
    logits[1, P - 1 + 2, 0] = float("-inf")

    def model(**inputs):
        return SimpleNamespace(logits=logits)

    out = forward_completions(model, ro, temperature=0.7, entropy=True)
    lengths = torch.tensor([2.0, 1.0])
    seq_logprobs = out.logprobs.sum(-1)
    torch.testing.assert_close(seq_logprobs, -lengths * math.log(V))
    torch.testing.assert_close(out.entropy.sum(-1), lengths * math.log(V))
    assert (out.logprobs[mask == 0] == 0).all() and (out.entropy[mask == 0] == 0).all()
    loss = astar_loss(seq_logprobs, torch.zeros(2), torch.zeros(2), beta2=1.0, num_seqs_total=2)
    torch.testing.assert_close(loss, (lengths * math.log(V)).square().mean())


def test_rollouts_concatenate_with_their_padding_widened():
    """Rollout.cat: prompts re-padded on the left, completions on the right; what a model sees
    (model_inputs without padding) is unchanged for every sequence."""
    a = Rollout(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), torch.tensor([[7, 8]]),
                torch.tensor([[1.0, 1.0]]), torch.tensor([False]), ["a"])
    b = Rollout(torch.tensor([[9, 5, 6, 4], [3, 3, 3, 3]]), torch.ones(2, 4, dtype=torch.long),
                torch.tensor([[2], [1]]), torch.tensor([[1.0], [1.0]]), torch.tensor([True, False]), ["b", "c"])
    both = Rollout.cat([a, b], pad_id=0)
    assert both.texts == ["a", "b", "c"] and both.truncated.tolist() == [False, True, False]
    assert both.prompt_ids.tolist()[0] == [0, 0, 5, 6] and both.prompt_mask.tolist()[0] == [0, 0, 1, 1]
    assert both.completion_ids.tolist()[1:] == [[2, 0], [1, 0]] and both.completion_mask.tolist()[1] == [1.0, 0.0]

    def seen(r, k):  # sequence k's tokens and positions, padding left out
        x = r.model_inputs()
        keep = x["attention_mask"][k].bool()
        return x["input_ids"][k][keep].tolist(), x["position_ids"][k][keep].tolist()

    for part, rows in ((a, [0]), (b, [1, 2])):
        for i, j in enumerate(rows):
            assert seen(both, j) == seen(part, i)


def _grouped_rollout(vocab: int, completion_width: int, prefix: int = 0) -> Rollout:
    """3 prompts of ``prefix`` tokens they all start with, then 7, 4 and 6 of their own
    (left-padded), 4 samples each in shuffled rows, with completions of 1..completion_width
    tokens (right-padded)."""
    g = torch.Generator().manual_seed(0)
    U, G, P, T = 3, 4, 7 + prefix, completion_width
    lengths = prefix + torch.tensor([7, 4, 6])
    prompt_mask = (torch.arange(P) >= P - lengths.unsqueeze(1)).long()
    prompt_ids = torch.randint(3, vocab, (U, P), generator=g).masked_fill(prompt_mask == 0, 0)
    start = torch.randint(3, vocab, (prefix,), generator=g)
    for row, n in zip(prompt_ids, lengths.tolist()):
        row[P - n:P - n + prefix] = start
    rows = torch.randperm(U * G, generator=g)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0)[rows], prompt_mask.repeat_interleave(G, 0)[rows]
    lengths = torch.randint(1, T + 1, (U * G,), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()
    ids = torch.randint(3, vocab, (U * G, T), generator=g).masked_fill(mask == 0, 0)
    return Rollout(prompt_ids, prompt_mask, ids, mask, torch.zeros(U * G, dtype=torch.bool), [""] * (U * G))


def _outputs_and_grads(model, ro, packing):
    model.zero_grad(set_to_none=True)
    out = forward_completions(model, ro, 0.7, entropy=True, hidden=True, packing=packing)
    mask = ro.completion_mask
    (out.logprobs.sum() + out.entropy.sum() + (out.hidden * mask.unsqueeze(-1)).sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("lora_policy", [False, True])
@pytest.mark.parametrize("width, prefix", [(1, 0), (5, 0), (5, 10)])
def test_packed_rows_give_whole_rows_outputs_and_gradients(lora_policy, width, prefix):
    """Rows packed into one sequence (each distinct prompt once, a prefix they all start with once,
    no padding), a tree-shaped attention mask: the log-probs, entropies, hidden states and
    parameter gradients of whole rows, up to round-off, from one call over fewer tokens; for a
    LoRA policy and for its reference (the adapter off) too."""
    import peft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    if lora_policy:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
        with torch.no_grad():  # a trained adapter: B = 0 would hide whether it is applied
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2)
    ro = _grouped_rollout(97, width, prefix)
    packing = rollout.packing_cost(model)
    whole, whole_grads = _outputs_and_grads(model, ro, None)
    inner = model.get_base_model() if lora_policy else model
    forward, fed = inner.forward, []

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape)
        return forward(*args, **kwargs)

    inner.forward = counting
    shared, grads = _outputs_and_grads(model, ro, packing)
    inner.forward = forward
    # one call: the prefix once, the 3 prompts' own 7 + 4 + 6 tokens, the 12 completions but their last token
    L = prefix + 17 + int((ro.completion_mask.sum(1) - 1).sum())
    assert fed == [(1, L)]
    width = ro.prompt_ids.shape[1] + ro.completion_ids.shape[1]
    assert rollout.tokens_fed(ro, packing) == pytest.approx(L * (1 + packing * L))
    assert rollout.tokens_fed(ro, packing) < 12 * width * (1 + packing * width)
    mask = ro.completion_mask
    torch.testing.assert_close(shared.logprobs, whole.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy, whole.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.hidden * mask.unsqueeze(-1), whole.hidden * mask.unsqueeze(-1),
                               atol=1e-5, rtol=1e-5)
    assert grads.keys() == whole_grads.keys() and grads
    for key, value in whole_grads.items():
        torch.testing.assert_close(grads[key], value, atol=1e-4, rtol=1e-4, msg=key)
    if lora_policy:
        reference = lora.AdapterDisabled(model)
        with torch.no_grad():
            ref = [forward_completions(reference, ro, 0.7, packing=p).logprobs for p in (None, packing)]
        torch.testing.assert_close(ref[1], ref[0], atol=1e-5, rtol=1e-5)
        assert (ref[0] - whole.logprobs).abs().max() > 1e-3  # the adapter was off


@pytest.mark.parametrize("lora_r", [0, 4])
def test_rows_pack_under_gradient_checkpointing_not_under_flash_attention(tiny_model_dir, lora_r):
    """A packed pass is one call with no KV cache: gradient checkpointing (and LoRA) keep it; an
    attention kernel that ignores a 4D mask (flash-attention) gets whole rows."""
    for checkpointing in (False, True):
        cfg = load_config(overrides=[f"model.gradient_checkpointing={checkpointing}", f"lora.r={lora_r}"])
        model = prepare_for_training(LlamaForCausalLM.from_pretrained(tiny_model_dir), cfg)
        assert rollout.packing_cost(model) > 0
    rollout._inner(model).config._attn_implementation = "flash_attention_2"
    assert rollout.packing_cost(model) is None


def test_packing_is_chosen_where_it_costs_less():
    """Groups that repeat a long prompt pack (their prompt once); distinct prompts of equal length
    with long completions, where packing saves no padding, stay whole rows: a dense L x L mask
    would cost more attention than it saves in tokens."""
    g = torch.Generator().manual_seed(0)
    N, P, T = 16, 40, 30

    def rows(prompts):
        return Rollout(prompts, torch.ones(N, P, dtype=torch.long), torch.randint(3, 97, (N, T), generator=g),
                       torch.ones(N, T), torch.zeros(N, dtype=torch.bool), [""] * N)

    distinct = rows(torch.randint(3, 97, (N, P), generator=g))
    grouped = rows(torch.randint(3, 97, (N // 4, P), generator=g).repeat_interleave(4, 0))
    packing = 2 * 128 * 4 / 1.05e6  # the embedded model's
    assert rollout._plan(distinct, packing)[1] is None
    assert rollout.tokens_fed(distinct, packing) == pytest.approx(N * (P + T) * (1 + packing * (P + T)))
    cost, packed = rollout._plan(grouped, packing)
    L = N // 4 * P + N * (T - 1)
    assert len(packed) == L and cost == pytest.approx(L * (1 + packing * L))
    assert rollout._plan(grouped, None)[1] is None
