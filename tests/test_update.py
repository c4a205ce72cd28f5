"""The optimizer steps (update.py): filtering before the forward pass, micro-batch invariance of
every loss the Learner builds, off-policy PPO updates, the frozen reference and the critic."""

import functools

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from frugalrl.config import load_config
from frugalrl.critic import outcome_token_rewards
from frugalrl.rollout import Rollout
from frugalrl.trainer import build_estimator
from frugalrl.update import Learner

N = 8
PPO = ["algo.loss=ppo", "algo.estimator=reinforce", "algo.reinforce_baseline=none"]  # as configs/ppo.yaml
LENGTHS = [3, 1, 5, 2, 4, 4, 1, 6]
ADVANTAGES = torch.tensor([0.5, 0.0, -1.0, 0.0, 0.25, 0.05, -0.5, 0.0])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0])
PROMPTS = [f"{i * 37}+{i}=" for i in range(N)]


def make_rollout(tokenizer, prompts=PROMPTS) -> Rollout:
    """N fixed sequences: ``prompts`` (by default all different, of different lengths; left-padded),
    random completions of LENGTHS tokens (right-padded), so that micro-batches trim to different widths."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    g = torch.Generator().manual_seed(0)
    T = max(LENGTHS)
    ids = torch.randint(10, 60, (N, T), generator=g)
    mask = (torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(-1)).float()
    ids = ids.masked_fill(~mask.bool(), tokenizer.pad_token_id)
    return Rollout(enc["input_ids"], enc["attention_mask"], ids, mask, torch.zeros(N, dtype=torch.bool),
                   [""] * N)


def make_learner(model_dir, overrides, micro_batch=N):
    cfg = load_config(overrides=[f"train.micro_batch={micro_batch}", "rollout.temperature=0.7", *overrides])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    # SGD, not AdamW: Adam's first step is ~lr * sign(grad), which turns round-off in a near-zero
    # gradient into a full-size difference; SGD keeps the comparison at round-off level.
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.5), cfg)
    if learner.reference is not None:  # a reference that differs from the policy, so KL and A*-PO terms act
        with torch.no_grad():
            for p in learner.reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
    if hasattr(learner.loss, "critic"):  # a critic that predicts something, so the value loss is not trivial
        torch.nn.init.normal_(learner.loss.critic.net[-1].weight, std=0.3)
    return learner


def run_update(learner, rollout):
    torch.manual_seed(1)  # mini-batch shuffling
    stats = learner.update(rollout, REWARDS, ADVANTAGES)
    weights = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    if hasattr(learner.loss, "critic"):
        weights.update({f"critic.{k}": v.detach().clone() for k, v in learner.loss.critic.state_dict().items()})
    return stats, weights


CONFIGS = {
    "pg": [],
    "pg-token-mean": ["algo.loss_agg=token-mean"],
    "pg-seq-mean-token-mean": ["algo.loss_agg=seq-mean-token-mean"],
    "pg-sum-norm": ["algo.loss_agg=seq-mean-token-sum-norm"],
    "kl-entropy": ["algo.kl_coef=0.1", "algo.kl_estimator=k3", "algo.entropy_coef=0.01"],
    "kl-reward": ["algo.kl_coef=0.1", "algo.kl_estimator=k1_reward", "train.mini_batches=2"],
    "astar": ["algo.estimator=astar", "rollout.temperature=1", "algo.astar_beta2=0.1", "algo.entropy_coef=0.001"],
    "ppo-epochs": ["train.ppo_epochs=2", "algo.clip_low=0.05", "algo.clip_high=0.05"],
    "ppo-mini-batches": ["train.ppo_epochs=2", "train.mini_batches=2", "train.filter_threshold=0.1"],
    "gae-critic": [*PPO, "train.mini_batches=2", "algo.gae_lambda=0.9", "algo.value_clip=0.05"],
    "gae-kl-reward": [*PPO, "algo.gae_lambda=0.9", "algo.kl_coef=0.1", "algo.kl_estimator=k1_reward"],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_update_does_not_depend_on_micro_batch(name, tiny_model_dir, tokenizer):
    """The same rollout batch split into micro-batches of 8, 4, 2 or 1 sequences gives the same
    weights and the same reported loss, for every loss the Learner builds."""
    rollout = make_rollout(tokenizer)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    ref_stats, ref_weights = run_update(make_learner(tiny_model_dir, CONFIGS[name]), rollout)
    assert any(not torch.equal(initial[k], ref_weights[k]) for k in initial), "the update must change the weights"
    for micro_batch in (4, 2, 1):
        stats, weights = run_update(make_learner(tiny_model_dir, CONFIGS[name], micro_batch), rollout)
        for key, value in ref_weights.items():
            torch.testing.assert_close(weights[key], value, atol=2e-6, rtol=1e-5,
                                       msg=f"{key}, micro_batch {micro_batch}")
        assert stats.keys() == ref_stats.keys()
        for key, value in ref_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def fed_tokens(calls) -> int:
    return sum(ids.numel() for ids in calls)


@pytest.mark.parametrize("name", CONFIGS)
def test_shared_prompts_change_only_round_off(name, tiny_model_dir, tokenizer):
    """Samples in groups of 2 per prompt: with train.share_prompts each distinct prompt of a
    micro-batch runs once (fewer tokens go through the model, its constants pass and reference
    included) and the update is that of whole rows, for every loss the Learner builds."""
    # prompts as long as a chat model's, answers of LENGTHS: sharing the prompts pays
    rollout = make_rollout(tokenizer, [f"{p} Reply with the number only." for p in PROMPTS[:N // 2] for _ in range(2)])
    runs = {}
    for share in (True, False):
        learner = make_learner(tiny_model_dir, [*CONFIGS[name], f"train.share_prompts={share}"], micro_batch=4)
        calls = count_forwards(learner.model)
        ref_calls = count_forwards(learner.reference) if learner.reference is not None else []
        runs[share] = (*run_update(learner, rollout), fed_tokens(calls), fed_tokens(ref_calls))
    (stats, weights, fed, ref_fed), (whole_stats, whole, whole_fed, whole_ref_fed) = runs[True], runs[False]
    # mini-batches drawn at random may hold no two samples of a prompt: then nothing is shared
    assert fed < whole_fed or "train.mini_batches=2" in CONFIGS[name]
    assert ref_fed <= whole_ref_fed
    for key, value in whole.items():
        torch.testing.assert_close(weights[key], value, atol=2e-6, rtol=1e-5, msg=key)
    assert stats.keys() == whole_stats.keys()
    for key, value in whole_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_micro_batches_keep_a_group_together(tiny_model_dir, tokenizer):
    """With shared prompts (long prompts, short answers: sharing feeds fewer tokens), micro-batches
    follow prompt length, then prompt: a group's samples share a micro-batch (its prompt runs
    once); without, they follow the whole row's length."""
    prompts = [f"{PROMPTS[i]} Reply with the number only." for i in (5, 0, 5, 1, 0, 1, 7, 7)]  # 4 groups of 2
    rollout = make_rollout(tokenizer, prompts)
    batches = make_learner(tiny_model_dir, [], micro_batch=2)._passes(torch.arange(N), rollout)
    assert all(len({prompts[i] for i in b.tolist()}) == 1 for b in batches)
    lengths = [len(prompts[int(b[0])]) for b in batches]
    assert lengths == sorted(lengths)
    whole = make_learner(tiny_model_dir, ["train.share_prompts=false"], micro_batch=2)._passes(torch.arange(N), rollout)
    sizes = [int(rollout.prompt_mask[i].sum() + rollout.completion_mask[i].sum()) for b in whole for i in b.tolist()]
    assert sizes == sorted(sizes) and any(len({prompts[i] for i in b.tolist()}) == 2 for b in whole)


def test_off_policy_updates_report_clip_and_critic_metrics(tiny_model_dir, tokenizer):
    stats, _ = run_update(make_learner(tiny_model_dir, CONFIGS["gae-critic"]), make_rollout(tokenizer))
    assert {"pg_clipfrac", "ppo_kl", "value_loss", "value_mean"} <= stats.keys()
    stats, _ = run_update(make_learner(tiny_model_dir, []), make_rollout(tokenizer))
    assert "pg_clipfrac" not in stats  # on-policy: ratio 1 by construction, nothing to report


def count_forwards(model):
    """Wrap ``model.forward``; the returned list collects the rows of every call's input_ids."""
    calls, forward = [], model.forward

    @functools.wraps(forward)  # keeps the signature, which says what the model takes
    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"])
        return forward(*args, **kwargs)

    model.forward = counting
    return calls


@pytest.mark.parametrize("overrides, passes", [
    (["train.filter_threshold=0.1"], 1),                                          # on-policy: one pass
    (["train.filter_threshold=0.1", "train.ppo_epochs=2", "train.mini_batches=2"], 3),  # old log-probs + 2 epochs
    (["train.filter_threshold=0.1", "algo.kl_coef=0.1"], 1),                      # + one reference pass
    (["train.filter_threshold=0.1", "algo.kl_coef=0.1", "algo.kl_estimator=k1_reward"], 2),  # + the sampler's
])
def test_filtered_samples_are_never_forwarded(overrides, passes, tiny_model_dir, tokenizer):
    rollout = make_rollout(tokenizer)
    # whole rows, so that a call's rows are its samples (packed, a call is one row of several)
    learner = make_learner(tiny_model_dir, [*overrides, "train.share_prompts=false"], micro_batch=2)
    calls = count_forwards(learner.model)
    ref_calls = count_forwards(learner.reference) if learner.reference is not None else []
    stats, _ = run_update(learner, rollout)
    kept = (ADVANTAGES.abs() > 0.1).nonzero().flatten().tolist()  # 0, 2, 4, 6
    assert sum(ids.shape[0] for ids in calls) == passes * len(kept)
    assert sum(ids.shape[0] for ids in ref_calls) == (len(kept) if learner.reference is not None else 0)
    calls = calls + ref_calls
    # and they are the kept sequences (each prompt is unique, so the text says which sample it is)
    texts = [t for ids in calls for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert sorted({i for t in texts for i in range(N) if t.startswith(PROMPTS[i])}) == kept
    assert stats["filtered_frac"] == pytest.approx(0.5)
    assert stats["tokens_trained"] == sum(LENGTHS[i] for i in kept)
    assert stats["tokens_skipped"] == sum(LENGTHS) - stats["tokens_trained"]


def test_dropping_zero_advantages_leaves_the_update_unchanged(tiny_model_dir, tokenizer, monkeypatch):
    rollout = make_rollout(tokenizer)
    filtered_stats, filtered = run_update(make_learner(tiny_model_dir, []), rollout)
    assert filtered_stats["filtered_frac"] == pytest.approx(3 / 8)
    monkeypatch.setattr(Learner, "forward_mask", lambda self, adv: torch.ones(len(adv), dtype=torch.bool))
    _, unfiltered = run_update(make_learner(tiny_model_dir, []), rollout)
    for key, value in unfiltered.items():
        torch.testing.assert_close(filtered[key], value, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides, expected_kept", [
    ([], 5),                                                   # pg: exact zeros dropped
    (["train.filter_threshold=0.1"], 4),                       # |A| <= 0.1 dropped
    (["algo.estimator=astar", "rollout.temperature=1"], 8),    # A*-PO: A = 0 still regresses to the reference
    (["algo.estimator=astar", "rollout.temperature=1", "train.filter_threshold=0.1"], 4),
    (["algo.kl_coef=0.1"], 8),                                 # KL and entropy pull on A = 0 samples too
    (["algo.entropy_coef=0.01"], 8),
    (["algo.kl_coef=0.1", "algo.kl_estimator=k1_reward"], 8),  # the KL reward reaches A = 0 samples
    (PPO, 8),  # PPO: per-token advantages, the critic learns from all
])
def test_forward_mask_rules(overrides, expected_kept, tiny_model_dir):
    learner = make_learner(tiny_model_dir, overrides)
    assert int(learner.forward_mask(ADVANTAGES).sum()) == expected_kept


@pytest.mark.parametrize("estimator, expected_kept", [("grpo", 2), ("dr_grpo", 2), ("rloo", 2), ("kae", 8)])
def test_threshold_zero_drops_constant_groups_only_where_they_carry_no_signal(estimator, expected_kept,
                                                                              tiny_model_dir):
    # float64 partial-credit rewards whose group means round: only the last group differs
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0], dtype=torch.float64)
    ids = ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    est = build_estimator(load_config(overrides=[f"algo.estimator={estimator}"]))
    if estimator == "kae":  # history, from which its constant groups get signal
        est.estimate(torch.tensor([0.0, 1.0]), ["a", "b"], 1)
    advantages = est.estimate(rewards, ids, 2).advantages
    assert int(make_learner(tiny_model_dir, []).forward_mask(advantages).sum()) == expected_kept


def test_reference_only_when_needed(tiny_model_dir, tokenizer):
    assert make_learner(tiny_model_dir, []).reference is None
    assert make_learner(tiny_model_dir, PPO).reference is None
    learner = make_learner(tiny_model_dir, ["algo.kl_coef=0.01"])
    ref = learner.reference
    assert ref is not None and not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in learner.model.parameters())
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    run_update(learner, make_rollout(tokenizer))
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())


def test_critic_state_round_trip(tiny_model_dir, tokenizer):
    learner = make_learner(tiny_model_dir, PPO)
    run_update(learner, make_rollout(tokenizer))
    other = make_learner(tiny_model_dir, PPO)
    other.load_state_dict(learner.state_dict())
    for k, v in learner.loss.critic.state_dict().items():
        assert torch.equal(other.loss.critic.state_dict()[k], v)
    assert make_learner(tiny_model_dir, []).state_dict() == {}


def test_outcome_token_rewards_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = outcome_token_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    # the reward sits on each completion's last token; an empty completion gets none
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0] * 4]))


def test_critic_has_its_own_learning_rate(tiny_model_dir):
    learner = make_learner(tiny_model_dir, [*PPO, "train.lr=1e-4", "train.critic_lr=0.0123"])
    assert [g["lr"] for g in learner.loss.optimizer.param_groups] == [0.0123]
    assert {id(p) for p in learner.loss.critic.parameters()} == \
        {id(p) for g in learner.loss.optimizer.param_groups for p in g["params"]}


def test_sum_norm_divides_by_the_generation_budget(tiny_model_dir, tokenizer):
    """Dr. GRPO's seq-mean-token-sum-norm divides by rollout.max_new_tokens, a constant: one
    completion running to the budget (sample 1, A = 0, so no gradient of its own) leaves the
    update of every other sample as it was."""
    budget = 12
    overrides = ["algo.loss_agg=seq-mean-token-sum-norm", f"rollout.max_new_tokens={budget}"]
    short = make_rollout(tokenizer)
    pad = budget - short.completion_ids.shape[1]
    ids = torch.cat([short.completion_ids, torch.full((N, pad), tokenizer.pad_token_id)], dim=1)
    mask = torch.cat([short.completion_mask, torch.zeros(N, pad)], dim=1)
    ids[1], mask[1] = torch.randint(10, 60, (budget,), generator=torch.Generator().manual_seed(1)), 1.0
    long = Rollout(short.prompt_ids, short.prompt_mask, ids, mask, short.truncated, short.texts)
    _, with_short = run_update(make_learner(tiny_model_dir, overrides), short)
    _, with_long = run_update(make_learner(tiny_model_dir, overrides), long)
    for key, value in with_short.items():
        torch.testing.assert_close(with_long[key], value, atol=0, rtol=0, msg=key)


def test_schedule_advances_once_per_optimizer_step(tiny_model_dir, tokenizer):
    """ppo_epochs=2 x mini_batches=2: four optimizer steps per rollout batch, each at the
    learning rate of its own place in the schedule; a batch whose samples are all filtered out
    moves the schedule by its four steps all the same."""
    from frugalrl.trainer import lr_factor

    cfg = load_config(overrides=["train.ppo_epochs=2", "train.mini_batches=2", "train.warmup_steps=8"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []  # the lr of each optimizer step
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    learner = Learner(model, optimizer, cfg, scheduler=scheduler)
    learner.update(make_rollout(tokenizer), REWARDS, ADVANTAGES)
    assert seen == pytest.approx([0.5 * lr_factor(cfg, s) for s in range(4)])
    learner.update(make_rollout(tokenizer), REWARDS, torch.zeros(N))
    assert len(seen) == 4 and scheduler.last_epoch == 8


def test_old_logprobs_come_from_eval_mode_and_the_first_ratio_is_one(tiny_model_dir, tokenizer, monkeypatch):
    """With dropout in the model (attention dropout 0.5), the sampling policy's log-probs are
    those of the model without dropout, as it sampled, and the first optimizer step, taken at
    the weights that sampled the batch, has a PPO ratio of exactly 1."""
    from frugalrl import losses
    from frugalrl.rollout import forward_completions

    cfg = load_config(overrides=[f"train.micro_batch={N}", "rollout.temperature=0.7", "train.ppo_epochs=2"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5).train()
    learner = Learner(model, torch.optim.SGD(model.parameters(), lr=0.5), cfg)
    ratios = []  # (log-probs, what the ratio divides them by), per micro-batch of each step
    log_ratio = losses._log_ratio
    monkeypatch.setattr(losses, "_log_ratio", lambda lp, other: ratios.append((lp.detach(), other)) or
                        log_ratio(lp, other))
    rollout = make_rollout(tokenizer)
    sampler = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5).eval()
    kept = (ADVANTAGES != 0).nonzero().flatten()
    lengths = (rollout.prompt_mask.sum(1) + rollout.completion_mask.sum(1))[kept]
    kept = kept[torch.argsort(lengths, stable=True)]  # the update takes its samples in order of length
    with torch.no_grad():
        expected_old = forward_completions(sampler, rollout.select(kept).trimmed(), 0.7).logprobs
    learner.update(rollout, REWARDS, ADVANTAGES)
    (first, first_old), (_, second_old) = ratios
    assert torch.equal(first, first_old)
    torch.testing.assert_close(second_old, expected_old)
    assert model.training


# --- The gradient of one sample, against a loss written out by hand ------------------------------
# The micro-batch tests above pass a consistently wrong sign or scale; these pin both. One
# unpadded sequence, temperature 0.7, no gradient clipping; the reference loss is built from the
# model's logits directly, not through ``forward_completions`` or ``losses``.

SEQ_LEN = 4
BUDGET = 8  # rollout.max_new_tokens: the normaliser of seq-mean-token-sum-norm
ONE = [f"rollout.max_new_tokens={BUDGET}", "train.max_grad_norm=0"]


def one_sample(tokenizer) -> Rollout:
    """One sequence, no padding: a prompt and SEQ_LEN random completion tokens."""
    prompt = tokenizer(["12+3="], return_tensors="pt")["input_ids"]
    completion = torch.randint(10, 60, (1, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    return Rollout(prompt, torch.ones_like(prompt), completion, torch.ones(1, SEQ_LEN),
                   torch.zeros(1, dtype=torch.bool), [""])


def by_hand(model, rollout: Rollout, temperature: float = 0.7):
    """(log-probs (T,), entropies (T,), last hidden states (T, H)) of the completion tokens."""
    P = rollout.prompt_ids.shape[1]
    out = model(input_ids=torch.cat([rollout.prompt_ids, rollout.completion_ids], 1), output_hidden_states=True)
    logp = (out.logits[0, P - 1:-1].float() / temperature).log_softmax(-1)
    picked = logp.gather(-1, rollout.completion_ids[0, :, None]).squeeze(-1)
    return picked, -(logp.exp() * logp).sum(-1), out.hidden_states[-1][0, P - 1:-1]


def step_grads(learner, optimizer=None) -> list[Tensor]:
    """Collects, at its next step, the gradient ``optimizer`` (the policy's by default) applies."""
    seen = []
    optimizer = optimizer or learner.optimizer
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.extend(
        p.grad.clone() for group in opt.param_groups for p in group["params"]))
    return seen


def grads_of(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    """The reference gradient; taken before the update, which changes the weights in place."""
    expected = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    assert sum(g.square().sum() for g in expected) > 1e-8, "a vanishing reference gradient tests nothing"
    return expected


def assert_grads(actual: list[Tensor], expected: tuple[Tensor, ...]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("agg, divisor", [("seq-mean-token-sum", 1), ("token-mean", SEQ_LEN),
                                          ("seq-mean-token-mean", SEQ_LEN), ("seq-mean-token-sum-norm", BUDGET)])
@pytest.mark.parametrize("advantage", [0.8, -1.5])
def test_policy_gradient_of_one_sample(agg, divisor, advantage, tiny_model_dir, tokenizer):
    """grad of -A * sum_t log pi(y_t) / divisor: the sample's log-prob rises exactly when A > 0."""
    rollout = one_sample(tokenizer)
    learner = make_learner(tiny_model_dir, [*ONE, f"algo.loss_agg={agg}"])
    params = list(learner.model.parameters())
    lp, _, _ = by_hand(learner.model, rollout)
    expected = grads_of(-advantage * lp.sum() / divisor, params)
    seen = step_grads(learner)
    learner.update(rollout, torch.tensor([1.0]), torch.tensor([advantage]))
    assert_grads(seen, expected)


@pytest.mark.parametrize("estimator", ["k2", "k3", "k1_reward"])
def test_kl_and_entropy_terms_of_one_sample(estimator, tiny_model_dir, tokenizer):
    """loss = -A sum log pi + kl_coef * sum KL - entropy_coef * sum H, each term with its own sign and
    scale; k1_reward puts the KL in the reward instead: -sum_t (A - kl_coef * sum_{s >= t} log(pi /
    pi_ref)(y_s)) log pi(y_t). What each KL term's gradient follows is tested exactly, on distributions
    whose expectations are finite sums, in test_losses.py; this pins how the update drives it."""
    rollout, advantage, kl_coef, entropy_coef = one_sample(tokenizer), 0.3, 0.2, 0.05
    learner = make_learner(tiny_model_dir, [*ONE, f"algo.kl_coef={kl_coef}", f"algo.kl_estimator={estimator}",
                                            f"algo.entropy_coef={entropy_coef}"])
    params = list(learner.model.parameters())
    lp, entropy, _ = by_hand(learner.model, rollout)
    with torch.no_grad():
        ref, _, _ = by_hand(learner.reference, rollout)
    log_ratio = lp - ref
    assert log_ratio.abs().sum() > 1e-2, "the reference must differ from the policy for the KL term to act"
    if estimator == "k1_reward":
        to_go = log_ratio.detach().flip(-1).cumsum(-1).flip(-1)
        loss = -((advantage - kl_coef * to_go) * lp).sum()
    else:
        kl = 0.5 * log_ratio ** 2 if estimator == "k2" else torch.exp(-log_ratio) + log_ratio - 1
        loss = -advantage * lp.sum() + kl_coef * kl.sum()
    expected = grads_of(loss - entropy_coef * entropy.sum(), params)
    seen = step_grads(learner)
    learner.update(rollout, torch.tensor([1.0]), torch.tensor([advantage]))
    assert_grads(seen, expected)


def test_entropy_bonus_raises_the_entropy(tiny_model_dir, tokenizer):
    """With A = 0 the sample is kept for the bonus alone; a small step raises its entropy."""
    rollout = one_sample(tokenizer)
    learner = make_learner(tiny_model_dir, [*ONE, "algo.entropy_coef=0.5"])
    learner.optimizer.param_groups[0]["lr"] = 1e-2

    def entropy():
        with torch.no_grad():
            return float(by_hand(learner.model, rollout)[1].sum())

    before = entropy()
    learner.update(rollout, torch.tensor([1.0]), torch.tensor([0.0]))
    assert entropy() > before


@pytest.mark.parametrize("advantage", [0.5, -0.5])
def test_astar_gradient_of_one_sample(advantage, tiny_model_dir, tokenizer):
    """A*-PO: grad of (beta2 * log(pi / pi_ref) - (r - V*))^2, log-probs summed over the
    completion: 2 beta2 (beta2 log(pi / pi_ref) - A) grad log pi. Here |A| = 0.5 dwarfs
    beta2 * log(pi / pi_ref), so the sample's log-prob rises exactly when A > 0."""
    rollout, beta2 = one_sample(tokenizer), 0.1
    learner = make_learner(tiny_model_dir, [*ONE, "algo.estimator=astar", "rollout.temperature=1",
                                            f"algo.astar_beta2={beta2}"])
    params = list(learner.model.parameters())
    lp, _, _ = by_hand(learner.model, rollout, temperature=1.0)
    with torch.no_grad():
        ref, _, _ = by_hand(learner.reference, rollout, temperature=1.0)
    log_ratio = lp.sum() - ref.sum()
    assert abs(beta2 * float(log_ratio.detach())) < 0.2, "the sign claim above needs |A| > beta2 |log(pi / pi_ref)|"
    scores = torch.autograd.grad(lp.sum(), params, retain_graph=True, materialize_grads=True)
    expected = grads_of((beta2 * log_ratio - advantage) ** 2, params)
    # the same gradient as a multiple of grad log pi, whose coefficient has the sign of -A
    coef = 2 * beta2 * (beta2 * float(log_ratio.detach()) - advantage)
    assert coef * advantage < 0
    for e, score in zip(expected, scores):
        torch.testing.assert_close(e, coef * score, atol=1e-7, rtol=1e-4)
    seen = step_grads(learner)
    learner.update(rollout, torch.tensor([1.0]), torch.tensor([advantage]))
    assert_grads(seen, expected)


def test_ppo_critic_and_policy_gradients_of_one_sample(tiny_model_dir, tokenizer):
    """PPO (GAE, gamma = lambda = 1), first step: the critic's values V_t equal the old ones, so
    the returns are r at every token and the per-token advantages r - V_t. The policy's gradient
    is that of -sum_t (r - V_t) log pi(y_t); the critic's that of 0.5 sum_t (V_t - r)^2, so a
    step of it brings the values closer to r."""
    rollout, reward = one_sample(tokenizer), 1.0
    learner = make_learner(tiny_model_dir, [*ONE, *PPO, "train.critic_lr=1e-3"])
    params, critic_params = list(learner.model.parameters()), list(learner.loss.critic.parameters())
    lp, _, hidden = by_hand(learner.model, rollout)
    values = learner.loss.critic(hidden)
    assert values.detach().abs().max() > 0.01, "a critic that predicts 0 would hide a sign error of V_t"
    expected = grads_of(-((reward - values.detach()) * lp).sum(), params)
    expected_critic = grads_of(0.5 * (values - reward).square().sum(), critic_params)
    seen, seen_critic = step_grads(learner), step_grads(learner, learner.loss.optimizer)
    learner.update(rollout, torch.tensor([reward]), torch.tensor([0.0]))
    assert_grads(seen, expected)
    assert_grads(seen_critic, expected_critic)
    with torch.no_grad():  # on the same features: the critic's step alone
        assert (learner.loss.critic(hidden) - reward).square().sum() < (values - reward).square().sum()
