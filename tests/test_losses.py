"""Losses against hand-computed numbers, and exact invariance to the micro-batch split."""

import math

import pytest
import torch

from frugalrl.losses import AGG_MODES, LossNorm, aggregate, astar_loss, gae, kl_penalty, policy_loss, value_loss


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def lengths_to_mask(lengths, width):
    return torch.arange(width) < torch.tensor(lengths).unsqueeze(-1)


# ------------------------------------------------------------------------------- aggregation

VALUES = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [5.0, float("nan"), 0.0, 0.0]])  # padding may hold junk
MASK = lengths_to_mask([3, 1], 4)


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 5) / 4),                      # 11 / 4 tokens
    ("seq-mean-token-mean", (6 / 3 + 5 / 1) / 2),             # mean of (2, 5)
    ("seq-mean-token-sum", (6 + 5) / 2),                      # mean of (6, 5)
    ("seq-mean-token-sum-norm", (6 + 5) / 2 / 3),             # / longest completion (3)
])
def test_aggregate_by_hand(mode, expected):
    norm = LossNorm.from_mask(MASK, mode)
    assert (norm.num_seqs, norm.num_tokens, norm.max_len) == (2, 4, 3)
    close(aggregate(VALUES, MASK, norm), expected)
    close(aggregate(VALUES, MASK.float(), norm), expected)  # a 0/1 float mask works the same


def test_sum_norm_with_generation_budget():
    norm = LossNorm.from_mask(MASK, "seq-mean-token-sum-norm", max_len=8)
    close(aggregate(VALUES, MASK, norm), 11 / (2 * 8))


def test_aggregate_validation():
    with pytest.raises(ValueError, match="token-mean"):
        LossNorm.from_mask(MASK, "sum")
    with pytest.raises(ValueError, match="shape"):
        aggregate(VALUES[:, :3], MASK, LossNorm.from_mask(MASK, "token-mean"))
    empty = torch.zeros(2, 3, dtype=torch.bool)  # no completion tokens at all: 0, not NaN
    for mode in AGG_MODES:
        assert aggregate(torch.ones(2, 3), empty, LossNorm.from_mask(empty, mode)).item() == 0.0


# ------------------------------------------------------------------------------- micro-batching

LENGTHS = [6, 1, 3, 0, 5, 2, 6, 4]  # ragged, one empty completion


def _batch():
    g = torch.Generator().manual_seed(0)
    n, width = len(LENGTHS), max(LENGTHS)
    lp = (-torch.rand(n, width, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(n, width, generator=g, dtype=torch.float64)  # clip active somewhere
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return lp, old, adv, lengths_to_mask(LENGTHS, width)


def _accumulate(loss_fn, leaf, n_micro, mask):
    """Sum of per-micro-batch losses and the accumulated gradient; each micro-batch is cut to
    its own padded width, as a trainer that pads per micro-batch would do."""
    leaf.grad = None
    total = 0.0
    for rows in torch.arange(mask.shape[0]).chunk(n_micro):
        width = max(int(mask[rows].sum(-1).max()), 1)
        loss = loss_fn(rows, width)
        loss.backward()
        total = total + loss.detach()
    return total, leaf.grad.clone()


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("off_policy", [False, True])
def test_policy_loss_micro_batch_invariance(mode, off_policy):
    lp, old, adv, mask = _batch()
    norm = LossNorm.from_mask(mask, mode)

    def loss_fn(rows, width):
        o = old[rows, :width] if off_policy else None
        return policy_loss(lp[rows, :width], o, adv[rows], mask[rows, :width], norm)[0]

    ref_loss, ref_grad = _accumulate(loss_fn, lp, 1, mask)
    assert ref_grad.abs().sum() > 0
    for n_micro in (2, 4):
        loss, grad = _accumulate(loss_fn, lp, n_micro, mask)
        close(loss, ref_loss)
        close(grad, ref_grad)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss_micro_batch_invariance(mode):
    _, old, _, mask = _batch()
    values = (old + 0.25).detach().requires_grad_()
    returns = old.detach() * 0.5
    norm = LossNorm.from_mask(mask, mode)

    def loss_fn(rows, width):
        return value_loss(values[rows, :width], old[rows, :width], returns[rows, :width], mask[rows, :width], norm)

    ref_loss, ref_grad = _accumulate(loss_fn, values, 1, mask)
    for n_micro in (2, 4):
        loss, grad = _accumulate(loss_fn, values, n_micro, mask)
        close(loss, ref_loss)
        close(grad, ref_grad)


def test_metrics_are_contributions():
    lp, old, adv, mask = _batch()
    norm = LossNorm.from_mask(mask, "token-mean")
    full = policy_loss(lp, old, adv, mask, norm)[1]
    parts = [policy_loss(lp[r], old[r], adv[r], mask[r], norm)[1] for r in torch.arange(8).chunk(4)]
    for key in full:
        assert math.isclose(sum(p[key] for p in parts), full[key], abs_tol=1e-9)
    assert 0 < full["pg_clipfrac"] < 1


# ------------------------------------------------------------------------------- policy loss


def test_policy_loss_on_policy_is_plain_policy_gradient():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = lengths_to_mask([2, 1], 3)
    adv = torch.tensor([2.0, -1.0])
    norm = LossNorm.from_mask(mask, "token-mean")
    loss, metrics = policy_loss(lp, None, adv, mask, norm)
    # ratio == 1 in value: loss = mean over the 3 tokens of -A = -(2 + 2 - 1) / 3, whatever lp is
    close(loss, -1.0)
    loss.backward()
    # gradient -A / num_tokens on each completion token, 0 on padding
    close(lp.grad, [[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]])
    assert metrics == {"pg_clipfrac": 0.0, "ppo_kl": 0.0}


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_policy_loss_clipping_by_hand(sign):
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()  # ratios 1.5, 0.5, 1.1
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = policy_loss(lp, old, torch.tensor([sign]), mask, LossNorm.from_mask(mask, "token-mean"))
    loss.backward()
    if sign > 0:
        # A = +1: unclipped -1.5, -0.5, -1.1; clipped -1.2, -0.8, -1.1; max -> -1.2 (clipped), -0.5, -1.1
        close(loss, (-1.2 - 0.5 - 1.1) / 3)
        # d(-A rho)/d lp = -rho where unclipped, 0 where the clipped branch won
        close(lp.grad, [[0.0, -0.5 / 3, -1.1 / 3]])
    else:
        # A = -1: unclipped 1.5, 0.5, 1.1; clipped 1.2, 0.8, 1.1; max -> 1.5, 0.8 (clipped), 1.1
        close(loss, (1.5 + 0.8 + 1.1) / 3)
        close(lp.grad, [[1.5 / 3, 0.0, 1.1 / 3]])
    assert math.isclose(metrics["pg_clipfrac"], 1 / 3, abs_tol=1e-7)
    # ppo_kl = mean(old - lp) = -(log 1.5 + log 0.5 + log 1.1) / 3
    assert math.isclose(metrics["ppo_kl"], -math.log(1.5 * 0.5 * 1.1) / 3, abs_tol=1e-6)


def test_policy_loss_asymmetric_clip_and_token_advantages():
    lp = torch.log(torch.tensor([[1.25, 1.25]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    norm = LossNorm.from_mask(mask, "seq-mean-token-sum")
    # clip_high = 0.28 leaves ratio 1.25 unclipped (DAPO's clip-higher); per-token A = 1, 2
    loss, _ = policy_loss(lp, torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), mask, norm, clip_low=0.2, clip_high=0.28)
    close(loss, -(1.25 * 1 + 1.25 * 2))
    loss, _ = policy_loss(lp, torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), mask, norm)  # clipped at 1.2
    close(loss, -(1.2 * 1 + 1.2 * 2))


# ------------------------------------------------------------------------------- kl, astar
# The KL terms against exact expectations, not against their own formulas: a policy over 5
# outcomes (a 5-way softmax: each outcome a one-token completion) and one over the 9 sequences of
# 2 tokens from 3, where every expectation over samples is a finite sum. float64 throughout.

def five_way():
    """(logits theta (5,) with grad, the reference's log-probs (5,)), distinct enough to tell KL
    directions apart."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(5, generator=g, dtype=torch.float64).log_softmax(-1))


def two_tokens():
    """An autoregressive policy over 2 tokens from 3: parameters [theta_1 (3,), theta_2 (3, 3)] (the
    second token's logits given the first), the token log-probs of all 9 sequences (9, 2) under it
    and under a fixed reference, and each sequence's first token (9,)."""
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(3, 3, generator=g, dtype=torch.float64).requires_grad_()]
    ref_first, ref_second = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(3,), (3, 3)])
    first, second = torch.arange(9) // 3, torch.arange(9) % 3

    def token_logprobs(t1, t2):
        return torch.stack([t1.log_softmax(-1)[first], t2.log_softmax(-1)[first, second]], -1)

    return params, token_logprobs(*params), token_logprobs(ref_first, ref_second).detach(), first


def kl(logp, logq):
    """KL(p || q) of two distributions given as log-probs over the same outcomes, exactly."""
    return (logp.exp() * (logp - logq)).sum()


def expected(values, seq_logprobs):
    """E_{y ~ pi}[values(y)] with the samples held fixed: sum_y pi(y) values(y), pi(y) a constant
    (what a loss on sampled y averages to; its gradient is then the expected gradient)."""
    return (seq_logprobs.detach().exp() * values).sum()


def grad(scalar, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(scalar, params, retain_graph=True)])


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_loss_gradient_is_the_exact_gradient_of_its_divergence(kind):
    """k2 as a loss descends KL(pi || pi_ref), the divergence the RL objective penalises; GRPO's k3
    descends KL(pi_ref || pi), the other direction."""
    theta, ref = five_way()
    logp = theta.log_softmax(-1)
    loss = expected(kl_penalty(logp[:, None], ref[:, None], kind)[:, 0], logp)
    forward, reverse = grad(kl(logp, ref), [theta]), grad(kl(ref, logp), [theta])
    assert (forward - reverse).abs().max() > 0.05  # so that matching one is not matching both
    close(grad(loss, [theta]), forward if kind == "k2" else reverse, atol=1e-12)


def test_kl_values_k3_is_unbiased_k2_is_not():
    """``kl_ref`` reports k3's value: its expectation is KL(pi || pi_ref) exactly; k2's is not."""
    theta, ref = five_way()
    logp = theta.log_softmax(-1).detach()
    exact = kl(logp, ref)
    close(expected(kl_penalty(logp[:, None], ref[:, None], "k3")[:, 0], logp), exact, atol=1e-12)
    assert abs(expected(kl_penalty(logp[:, None], ref[:, None], "k2")[:, 0], logp) - exact) > 0.05


def test_k1_is_no_loss():
    """k1 = log(pi / pi_ref) as a loss has expected gradient 0 (noise only): kl_penalty refuses it and
    points to the reward."""
    theta, ref = five_way()
    logp = theta.log_softmax(-1)
    close(grad(expected(logp - ref, logp), [theta]), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="kl_reward"):
        kl_penalty(logp[:, None], ref[:, None], "k1")


def _kl_reward_loss(token_logprobs, ref_logprobs, seq_logprobs, coef, *overrides):
    """The policy loss of ``algo.kl_estimator=k1_reward`` over every outcome at once, each weighted
    by its probability (rows of ``token_logprobs``: the outcomes; task rewards and advantages 0),
    as the Learner drives the term: the KL reward after the no-grad pass, then one on-policy step.
    Under PPO the critic predicts 0 everywhere, and its value loss does not reach the policy."""
    from frugalrl.losses import LossInputs, TokenOutputs

    term = _terms(f"algo.kl_coef={coef}", "algo.kl_estimator=k1_reward", *overrides)[0]
    n, width = token_logprobs.shape
    mask = torch.ones_like(token_logprobs)
    inputs = LossInputs(torch.zeros(n, dtype=torch.float64), old_logprobs=token_logprobs.detach(),
                        ref_logprobs=ref_logprobs)
    term.begin(inputs, mask)
    term.finish(inputs, torch.zeros(n, dtype=torch.float64), mask)
    # advantages times n pi(y): the loss's mean over the n outcomes becomes the expectation under pi
    inputs.advantages = inputs.advantages * n * seq_logprobs.detach().exp()[:, None]
    inputs.old_logprobs = None
    out = TokenOutputs(token_logprobs, hidden=torch.zeros(n, width, 4))
    return term(out, mask, inputs, LossNorm.from_mask(mask, "seq-mean-token-sum"))


def test_kl_reward_gradient_is_the_exact_gradient_of_kl_one_token():
    theta, ref = five_way()
    logp = theta.log_softmax(-1)
    loss, metrics = _kl_reward_loss(logp[:, None], ref[:, None], logp, 0.5)
    close(grad(loss, [theta]), 0.5 * grad(kl(logp, ref), [theta]), atol=1e-12)
    assert "kl_ref" in metrics


@pytest.mark.parametrize("loss", ["pg", "ppo"])
def test_kl_reward_gradient_is_the_exact_gradient_of_the_sequence_kl(loss):
    """Over whole sequences, the KL reward's returns to go (pg), or GAE over token rewards that hold
    it (ppo, here with gamma = lambda = 1), give the gradient of the sequences' KL, including what
    flows through which prefixes are drawn."""
    params, lp, ref, _ = two_tokens()
    seq = lp.sum(-1)
    loss, _ = _kl_reward_loss(lp, ref, seq, 0.5, *(PPO if loss == "ppo" else []))
    close(grad(loss, params), 0.5 * grad(kl(seq, ref.sum(-1)), params), atol=1e-12)


def test_kl_loss_on_sequences_follows_each_position_with_its_prefix_held_fixed():
    """k2 per token gives, summed over positions, the gradient of each position's KL with the
    distribution of its prefixes held fixed: not the whole sequences' KL gradient (which
    ``k1_reward`` gives, above)."""
    params, lp, ref, first = two_tokens()
    seq = lp.sum(-1)
    k2 = expected(kl_penalty(lp, ref, "k2").sum(-1), seq)
    # position 1: one distribution; position 2: one per first token, weighted by its probability
    p1, r1 = lp[::3, 0], ref[::3, 0]
    per_position = kl(p1, r1) + sum(p1[a].detach().exp() * kl(lp[first == a, 1], ref[first == a, 1])
                                    for a in range(3))
    close(grad(k2, params), grad(per_position, params), atol=1e-12)
    assert (grad(k2, params) - grad(kl(seq, ref.sum(-1)), params)).abs().max() > 0.05


def test_astar_loss_value_and_gradient_by_hand():
    seq_lp = torch.tensor([-10.0, -4.0], requires_grad=True)
    ref = torch.tensor([-12.0, -4.0], requires_grad=True)
    adv = torch.tensor([0.5, -1.0])
    loss = astar_loss(seq_lp, ref, adv, beta2=0.1, num_seqs_total=4)
    # residuals: 0.1 * 2 - 0.5 = -0.3; 0.1 * 0 + 1 = 1.0 -> (0.09 + 1.0) / 4 sequences in the batch
    close(loss, 1.09 / 4)
    loss.backward()
    # d/d lp = 2 * beta2 * residual / 4: -0.015, 0.05; the reference gets no gradient
    close(seq_lp.grad, [-0.015, 0.05])
    assert ref.grad is None
    # micro-batches: halves with the same num_seqs_total add up to the whole
    halves = sum(astar_loss(seq_lp[i:i + 1], ref[i:i + 1], adv[i:i + 1], 0.1, 4) for i in range(2))
    close(halves, loss.detach())
    with pytest.raises(ValueError, match=r"\(n,\)"):
        astar_loss(seq_lp.unsqueeze(0), ref.unsqueeze(0), adv.unsqueeze(0), 0.1, 2)


# ------------------------------------------------------------------------------- gae, value loss


def test_gae_with_gamma_lambda_one_is_returns_to_go_minus_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0], [0.0, 2.0, 9.0, 9.0]])  # junk after the ends
    values = torch.tensor([[0.2, 0.4, 0.6, 5.0], [0.1, 0.3, 5.0, 5.0]])
    mask = lengths_to_mask([3, 2], 4)
    adv, ret = gae(rewards, values, mask)
    # returns-to-go: (1, 1, 1) and (2, 2); minus values; 0 on padding
    close(adv, [[0.8, 0.6, 0.4, 0.0], [1.9, 1.7, 0.0, 0.0]])
    close(ret, [[1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 0.0, 0.0]])


def test_gae_by_hand():
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.4]]), torch.ones(1, 2), gamma=0.5, lam=0.5)
    # t=1: delta = 1 + 0 - 0.4 = 0.6 -> A = 0.6
    # t=0: delta = 0 + 0.5 * 0.4 - 0.2 = 0 -> A = 0 + 0.25 * 0.6 = 0.15; returns = A + V
    close(adv, [[0.15, 0.6]])
    close(ret, [[0.35, 1.0]])


def test_gae_steps_over_masked_middle_tokens():
    mask = torch.tensor([[True, False, True]])
    adv, _ = gae(torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([[0.5, 9.0, 0.25]]), mask)
    # t=2: delta = 1 - 0.25 = 0.75; t=1 skipped; t=0: delta = 0 + 0.25 - 0.5 = -0.25 -> A = 0.5 = 1 - 0.5
    close(adv, [[0.5, 0.0, 0.75]])


def test_value_loss_clip_by_hand():
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = value_loss(values, old, returns, mask, LossNorm.from_mask(mask, "token-mean"), clip=0.2)
    # token 0: unclipped (1 - 2)^2 = 1; clipped V = 0.7 -> 1.69; max 1.69 (clipped branch, no gradient)
    # token 1: unclipped (0 - 1)^2 = 1; clipped V = 0.3 -> 0.49; max 1 (unclipped, grad V - R = -1)
    close(loss, 0.5 * (1.69 + 1.0) / 2)
    loss.backward()
    close(values.grad, [[0.0, -1.0 / 2]])


# ------------------------------------------------------------------------------- the loss registry

PPO = ["algo.loss=ppo", "algo.estimator=reinforce", "algo.reinforce_baseline=none"]  # as configs/ppo.yaml


def _terms(*overrides):
    from types import SimpleNamespace

    from frugalrl.config import load_config
    from frugalrl.losses import build_terms

    policy = SimpleNamespace(config=SimpleNamespace(hidden_size=4), parameters=lambda: iter([torch.zeros(1)]))
    return build_terms(load_config(overrides=list(overrides)), policy)


def test_every_configurable_loss_is_registered():
    from frugalrl.config import field_specs
    from frugalrl.losses import list_losses

    choices = next(s.choices for s in field_specs() if s.key == "algo.loss")
    assert list_losses() == sorted(c for c in choices if c != "auto")


@pytest.mark.parametrize("overrides, names", [
    ([], ["PolicyGradient"]),
    (["algo.estimator=astar", "rollout.temperature=1"], ["AStarRegression"]),  # auto: A*-PO's own loss
    (["algo.estimator=astar", "rollout.temperature=1", "algo.loss=pg"], ["PolicyGradient"]),
    ([*PPO, "algo.kl_coef=0.1", "algo.entropy_coef=0.01"], ["PPO", "KLPenalty", "EntropyBonus"]),
    ([*PPO, "algo.kl_coef=0.1", "algo.kl_estimator=k1_reward"], ["PPO"]),  # the KL in the reward: no loss term
])
def test_build_terms_by_name(overrides, names):
    assert [type(t).__name__ for t in _terms(*overrides)] == names


def test_terms_declare_what_the_update_computes():
    pg, = _terms()
    assert pg.zero_advantage_no_gradient and pg.filterable and not pg.needs_reference
    assert pg.metric_names == ("loss",)  # on-policy: clip fraction and ppo_kl are 0 by construction
    off, = _terms("train.mini_batches=2")
    assert off.metric_names == ("loss", "pg_clipfrac", "ppo_kl")
    astar, = _terms("algo.estimator=astar", "rollout.temperature=1")
    assert astar.needs_reference and not astar.zero_advantage_no_gradient
    ppo, kl = _terms(*PPO, "algo.kl_coef=0.1")
    assert ppo.needs_hidden and not ppo.filterable and "value_loss" in ppo.metric_names
    assert kl.needs_reference and kl.metric_names == ("loss", "kl_ref")
    assert not pg.needs_old_logprobs and off.needs_old_logprobs  # on-policy, the ratio needs none
    # the KL reward reads the sampler's and the reference's log-probs on-policy too, and A = 0 samples carry it
    in_reward, = _terms("algo.kl_coef=0.1", "algo.kl_estimator=k1_reward")
    assert in_reward.needs_old_logprobs and in_reward.needs_reference and not in_reward.zero_advantage_no_gradient
    assert in_reward.metric_names == ("loss", "kl_ref")
    assert set(ppo.state_dict()) == {"critic", "critic_optimizer"} and pg.state_dict() == {}


def test_register_loss_refuses_a_second_use_of_a_name():
    from frugalrl.losses import LossTerm, register_loss

    with pytest.raises(ValueError, match="already registered"):
        register_loss("pg")(type("Other", (LossTerm,), {}))


def test_kl_and_entropy_terms_add_up_to_their_formulas():
    from types import SimpleNamespace

    from frugalrl.losses import LossInputs

    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    ent, mask = torch.tensor([[0.5, 0.25]]), torch.ones(1, 2)
    norm = LossNorm.from_mask(mask, "token-mean")
    _, kl, bonus = _terms("algo.kl_coef=0.1", "algo.entropy_coef=0.01")
    out, inputs = SimpleNamespace(logprobs=lp, entropy=ent), LossInputs(torch.zeros(1), ref_logprobs=ref)
    kl_loss, kl_metrics = kl(out, mask, inputs, norm)
    # log(pi / pi_ref) = 0.5, -1: the loss is k2's token mean, the metric k3's (whichever loss trains)
    assert float(kl_loss) == pytest.approx(0.1 * (0.5 ** 2 + 1.0 ** 2) / 2 / 2)
    assert kl_metrics["kl_ref"] == pytest.approx((math.exp(-0.5) + 0.5 - 1 + math.exp(1.0) - 1.0 - 1) / 2)
    ent_loss, ent_metrics = bonus(out, mask, inputs, norm)
    assert float(ent_loss) == pytest.approx(-0.01 * 0.375) and ent_metrics["entropy"] == pytest.approx(0.375)


def test_update_reads_no_method_option():
    """update.Learner only orchestrates: the options that pick or tune a method are read by the
    registered loss terms (losses.py), never by update.py."""
    import ast
    import pathlib

    import frugalrl.update

    tree = ast.parse(pathlib.Path(frugalrl.update.__file__).read_text())
    read = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "algo"}
    assert read <= {"loss_agg"}, f"update.py reads method options {sorted(read - {'loss_agg'})}"
    names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not names & {"pg", "astar", "ppo", "gae", "kae", "grpo"}
