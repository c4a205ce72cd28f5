"""Per-prompt history, pass-rate estimates and rollout allocation (history.py, passrate.py, allocation.py).

The statistics are tested against simulations of what they claim to estimate: pass rates drawn from
a Beta, groups sampled, the realised frequencies compared with the predictions within a tolerance
set by the simulation's size; the signal values by running the actual estimators on sampled groups.
"""

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from frugalrl import trainer
from frugalrl.advantages import get_estimator
from frugalrl.allocation import (Allocator, allocate_budget, calibration_gap, keep_varied, reliability, signal_value,
                                 skip_probability)
from frugalrl.config import ConfigError, load_config
from frugalrl.data import PromptSampler
from frugalrl.history import PromptHistory
from frugalrl.passrate import (START, STRENGTHS, PassRateEstimator, PassRates, all_equal_probability, fit_prior,
                               log_predictive)
from test_resume import COMPARED, _kill, _overrides, _resume, _rows, _run_until_hang
from test_train import _toy_task


def rollout_options(**overrides):
    options = dict(allocation="uniform", batch_prompts=4, group_size=4, candidates=0, min_per_prompt=2,
                   max_per_prompt=8, skip_floor=0.1)
    return SimpleNamespace(**{**options, **overrides})


def beta(a, b) -> PassRates:
    """One prompt whose posterior is Beta(a, b)."""
    return PassRates(np.array([a], dtype=float), np.array([b], dtype=float), np.array([a / (a + b)]), np.ones(1))


# --- history -------------------------------------------------------------------------------

def test_history_records_visits_bounded_and_round_trips():
    h = PromptHistory(max_entries=3, population_window=3)  # population: exponential average, rate 1/2
    h.record(["x", "y", "x"], [1.0, 0.0, 0.0], 1)
    h.record(["x", "x"], [1.0, 1.0], 2, left_out=[0.2])
    assert h.get("x") == ([1, 2, 2], [0.0, 1.0, 1.0])  # oldest dropped at 3 entries
    assert h.visits("x") == [(1, [0.0]), (2, [1.0, 1.0])]
    # each prompt drawn counts once: step 1 x 0.5 and y 0; step 2 x 1.0 and a prompt left out at 0.2
    assert h.population == pytest.approx(0.5 * (0.5 + 0.0) / 2 + 0.5 * (1.0 + 0.2) / 2)
    restored = PromptHistory(max_entries=3)
    restored.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert restored.entries == h.entries and restored.population == h.population
    with pytest.raises(ValueError, match="one id per reward"):
        h.record(["x"], [1.0, 0.0], 3)


def test_kae_reads_a_shared_history_that_its_owner_records():
    batches = [(torch.tensor([1.0, 0.0, 0.5]), ["x", "x", "y"], 1), (torch.tensor([0.0, 1.0]), ["y", "x"], 2),
               (torch.tensor([1.0, 1.0, 0.0]), ["x", "y", "y"], 3)]
    own, shared = get_estimator("kae", bandwidth=3.0), get_estimator("kae", bandwidth=3.0)
    history = PromptHistory()
    shared.use_history(history)
    for rewards, ids, step in batches:
        torch.testing.assert_close(own.estimate(rewards, ids, step).advantages,
                                   shared.estimate(rewards, ids, step).advantages)
        assert step not in history.get(ids[0])[0]  # the estimator itself records nothing
        history.record(ids, rewards.tolist(), step)  # the owner does, after the estimate
    assert history.get("x") == ([1, 1, 2, 3], [1.0, 0.0, 1.0, 1.0])
    assert shared.state_dict() == {}  # the history's owner saves it


# --- pass rates ------------------------------------------------------------------------------

def test_pass_rate_posterior_weighs_visits_by_age_in_steps():
    h = PromptHistory()
    est = PassRateEstimator(h, strength=2.0, memory=4.0)
    est.record(["x"] * 4, [1.0, 0.0, 0.0, 0.0], 1)   # read at step 6: 5 steps old, weight exp(-5/4)
    est.record(["x"] * 2, [1.0, 1.0], 5)             # 1 step old, weight exp(-1/4)
    rates = est.estimate(["x", "new"])
    assert est.now == 6
    pop, old, new = h.population, math.exp(-5 / 4), math.exp(-1 / 4)
    s, n = 2 * new + 1 * old, 2 * new + 4 * old
    np.testing.assert_allclose(rates.alpha, [2 * pop + s, 2 * pop])
    np.testing.assert_allclose(rates.beta, [2 * (1 - pop) + n - s, 2 * (1 - pop)])
    assert rates.samples[1] == 0 and rates.samples[0] == pytest.approx(n)


def test_pass_rate_state_round_trips_and_an_older_state_is_refitted():
    h = PromptHistory()
    est = PassRateEstimator(h)
    for step in (1, 2, 3):
        est.record(["x"] * 4 + ["y"] * 4, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0], step)
    state = json.loads(json.dumps(est.state_dict()))
    again = PassRateEstimator(h)
    again.load_state_dict(state)
    assert again.now == 4 and again.params == est.params and again.window == est.window
    np.testing.assert_array_equal(again.estimate(["x", "y"]).alpha, est.estimate(["x", "y"]).alpha)
    # written when a visit's weight came from its rank: kappa and tau start over, read at the next step
    older = PassRateEstimator(h)
    older.load_state_dict({"params": {"population": [0.7, 2.0]}, "window": [[[0.5], 4, 1.0, [], []]]})
    assert older.now == 4 and older.window == []
    assert older.params == {"population": [START["strength"], START["memory"]]}


def test_cross_prompt_prior_borrows_from_similar_prompts():
    h = PromptHistory()
    h.record(["a1", "a2", "b1", "b2"], [1.0, 1.0, 0.0, 0.0], 1)
    # two clusters of directions: a* near (1, 0), b* near (0, 1); the queries sit in each cluster
    vectors = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0], [1.0, 0.0], [0.0, 1.0]])
    ids = ["a1", "a2", "b1", "b2", "qa", "qb"]
    est = PassRateEstimator(h, prior="cross_prompt", embeddings=(ids, vectors), neighbors=2)
    qa, qb = est.priors(["qa", "qb"])
    pop = h.population  # 0.5; two neighbours against a pull of two toward it
    assert qa == pytest.approx((2 * 1.0 + 2 * pop) / 4) and qb == pytest.approx((2 * 0.0 + 2 * pop) / 4)
    assert list(est.priors(["qa", "qb"], "population")) == [pop, pop]
    # a prompt with history is not its own neighbour: a1's neighbours are a2 and one b
    assert est.priors(["a1"])[0] < qa


def test_unknown_prior_and_missing_inputs_are_errors():
    with pytest.raises(ValueError, match="choose one of"):
        PassRateEstimator(PromptHistory(), prior="nope")
    with pytest.raises(ValueError, match="astar"):
        PassRateEstimator(PromptHistory(), prior="vstar")
    with pytest.raises(ValueError, match="embeddings"):
        PassRateEstimator(PromptHistory(), kinds=["cross_prompt"])


# --- the Beta-Binomial against simulation ------------------------------------------------------

@pytest.mark.parametrize("a, b, n", [(0.37, 0.60, 4), (2.0, 5.0, 2), (30.0, 10.0, 8)])
def test_beta_binomial_predictions_match_simulated_frequencies(a, b, n):
    """p ~ Beta(a, b), k ~ Binomial(n, p): every P(k) and P(all equal) within 4 standard errors of
    the simulated frequencies."""
    M = 40_000
    rng = np.random.default_rng(0)
    k = rng.binomial(n, rng.beta(a, b, M))
    frequency = np.bincount(k, minlength=n + 1) / M
    predicted = np.exp(log_predictive(a, b, n, np.arange(n + 1)))
    assert predicted.sum() == pytest.approx(1.0)
    np.testing.assert_array_less(np.abs(frequency - predicted), 4 * np.sqrt(predicted * (1 - predicted) / M) + 1e-9)
    q = all_equal_probability(a, b, n)
    realised = frequency[0] + frequency[n]
    assert abs(realised - q) < 4 * math.sqrt(q * (1 - q) / M)
    if (a, b) == (0.37, 0.60):  # the population: the posterior mean plugged in misses by 0.21
        mean = a / (a + b)
        assert realised - (mean ** n + (1 - mean) ** n) > 0.2


@pytest.mark.parametrize("kappa", [0.5, 3.0, 30.0])
def test_fitted_strength_recovers_the_simulated_population(kappa):
    """First visits of n = 4 from p ~ Beta(kappa mu, kappa (1 - mu)): the fitted kappa's mean over 20
    simulated windows of 2,048 groups is within 3 of its standard errors (over those windows) plus
    half a grid step of the truth."""
    rng, mu, M = np.random.default_rng(1), 0.4, 2048
    none = np.zeros((M, 1))
    fits = [np.log(fit_prior(np.full(M, mu), np.full(M, 4.0), rng.binomial(4, rng.beta(kappa * mu, kappa * (1 - mu), M))
                             .astype(float), none, none, none, STRENGTHS, np.array([2.0]))[0]) for _ in range(20)]
    half_step = math.log(STRENGTHS[1] / STRENGTHS[0]) / 2
    assert abs(np.mean(fits) - math.log(kappa)) < 3 * np.std(fits) / math.sqrt(len(fits)) + half_step


def _simulate(pool: np.ndarray, steps: int, batch: int, G: int, redraw: float, seed: int = 0):
    """A run over ``pool`` pass rates (shuffled epochs of ``batch`` prompts, G completions each), each
    prompt's pass rate redrawn from the pool's with probability ``redraw`` at each epoch; every
    group predicted by the estimator before it is recorded. Returns (estimator, [(predicted
    all-equal chance, realised) per group after the first epoch])."""
    rng = np.random.default_rng(seed)
    p = pool.copy()
    est = PassRateEstimator(PromptHistory())
    order, out = [], []
    for step in range(1, steps + 1):
        if len(order) < batch:
            order = list(rng.permutation(len(p)))
            p = np.where(rng.random(len(p)) < redraw, rng.permutation(pool), p)
        chosen, order = order[:batch], order[batch:]
        ids = [f"x{i}" for i in chosen]
        rates = est.estimate(ids)
        rewards = rng.binomial(1, np.repeat(p[chosen], G)).astype(float)
        equal = ~keep_varied(rewards, np.repeat(np.arange(batch), G))
        if step > len(pool) // batch:
            out += list(zip(all_equal_probability(rates.alpha, rates.beta, G), equal))
        est.record([k for k in ids for _ in range(G)], rewards.tolist(), step)
    return est, out


def test_predictions_with_the_fitted_prior_are_calibrated_on_a_simulated_run():
    """A U-shaped pool (the issue's Beta(0.37, 0.60)), revisited for 10 epochs: in every bin of the
    predicted chance of an all-equal group that holds 200 groups or more, the realised share is
    within 4 standard errors of the bin's mean prediction."""
    pool = np.random.default_rng(2).beta(0.37, 0.60, 256)
    est, groups = _simulate(pool, 88, 32, 4, redraw=0.0)
    predicted, realised = map(np.array, zip(*groups))
    bins = np.minimum((predicted * 10).astype(int), 9)
    for b in np.unique(bins):
        inside = bins == b
        if inside.sum() >= 200:
            q = predicted[inside].mean()
            assert abs(realised[inside].mean() - q) < 4 * math.sqrt(q * (1 - q) / inside.sum()), b
    assert est.strength() < 2  # U-shaped: kappa near 1, not the start value


def test_memory_is_fitted_to_how_fast_pass_rates_move():
    """Pass rates that never change between visits give a long memory; pass rates redrawn at every
    epoch (4 steps) with probability 1/2 (a policy that moves between visits) a short one."""
    pool = np.random.default_rng(3).beta(0.5, 0.5, 128)
    static, _ = _simulate(pool, 60, 32, 4, redraw=0.0)
    moving, _ = _simulate(pool, 60, 32, 4, redraw=0.5)
    assert static.memory() >= 64 and moving.memory() <= 8


def test_population_mean_is_not_biased_by_which_prompts_skip_rolls_out():
    """Skip rolls out fewer of the prompts it predicts solved or failed, so the mean over the groups
    it rolled out is pulled toward 0.5; the population mean, over every prompt drawn, follows the
    pool's mean pass rate."""
    rng = np.random.default_rng(4)
    pool = rng.beta(0.3, 0.9, 128)  # mean 0.25, mostly never solved
    rows = [{"id": f"x{i}", "prompt": ""} for i in range(len(pool))]
    history = PromptHistory()
    allocator = Allocator(rollout_options(allocation="skip", batch_prompts=16, skip_floor=0.05),
                          PromptSampler(rows, 16, seed=0), PassRateEstimator(history),
                          gain=get_estimator("rloo").expected_gain_terms, seed=0)
    population, rolled = [], []
    for step in range(1, 121):
        plan = allocator.plan()
        rewards = rng.binomial(1, np.repeat([pool[int(r["id"][1:])] for r in plan.rows], 4)).astype(float)
        allocator.record([(plan, rewards)], step)
        if step > 40:
            population.append(history.population)
            rolled.append(rewards.mean())
    truth = pool.mean()
    assert np.mean(rolled) - truth > 0.05  # skip's selection: what was rolled out is not the pool
    assert abs(np.mean(population) - truth) < 0.03


# --- the signal value against simulation ---------------------------------------------------------

def _kae_with_history_and_prior(P: int):
    kae = get_estimator("kae", bandwidth=10.0)
    rng = np.random.default_rng(5)
    kae.estimate(torch.from_numpy(rng.binomial(1, 0.5, 2 * P).astype(float)), [f"x{i}" for i in range(P)
                                                                              for _ in range(2)], 1)
    kae.use_prior(lambda ids: (np.full(len(ids), 0.3), 1.5))
    return kae


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_none", "reinforce_loo", "kae", "astar"])
@pytest.mark.parametrize("n", [2, 4])
def test_signal_value_is_the_expected_gain_of_the_estimators_update(name, n):
    """p ~ Beta(0.8, 1.2); n completions per prompt; the estimator run on the batch; for each group
    p (1 - p) sum_g A_g (r_g - p), the first-order increase of p from one step on the group's
    update under the one-parameter model: its mean is the signal value, within 4 standard errors."""
    P, a, b = 20_000, 0.8, 1.2
    rng = np.random.default_rng(6 + n)
    p = rng.beta(a, b, P)
    r = rng.binomial(1, np.repeat(p, n)).astype(float)
    ids = [f"x{i}" for i in range(P) for _ in range(n)]
    est = {"reinforce_none": lambda: get_estimator("reinforce", baseline="none"),
           "reinforce_loo": lambda: get_estimator("reinforce", baseline="loo"),
           "kae": lambda: _kae_with_history_and_prior(P),
           "astar": lambda: get_estimator("astar", v_star={f"x{i}": float(v) for i, v in enumerate(rng.random(P))})
           }.get(name, lambda: get_estimator(name))()
    advantages = est.estimate(torch.from_numpy(r), ids, 2).advantages.numpy()
    gain = p * (1 - p) * (advantages * (r - np.repeat(p, n))).reshape(P, n).sum(1)
    predicted = signal_value(beta(a, b), n, est.expected_gain_terms)[0]
    assert abs(gain.mean() - predicted) < 4 * gain.std() / math.sqrt(P)


# --- the allocator's arithmetic ----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(30))
def test_budget_dynamic_programme_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    C, lo, hi = int(rng.integers(2, 6)), int(rng.integers(1, 3)), int(rng.integers(3, 5))
    budget = int(rng.integers(lo, C * hi + 1))
    values = rng.normal(size=(C, hi + 1))
    values[:, 0] = 0
    choices = [n for n in range(hi + 1) if n == 0 or lo <= n]
    feasible = [c for c in itertools.product(choices, repeat=C) if sum(c) == budget]
    if not feasible:
        with pytest.raises(ValueError, match="cannot spend exactly"):
            allocate_budget(values, budget, lo, hi)
        return
    counts = allocate_budget(values, budget, lo, hi)
    assert sum(counts) == budget and all(n == 0 or lo <= n <= hi for n in counts)
    best = max(sum(values[c, n] for c, n in enumerate(f)) for f in feasible)
    assert sum(values[c, n] for c, n in enumerate(counts)) == pytest.approx(best)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "kae"])
def test_budget_goes_to_the_one_prompt_that_can_teach(estimator):
    p = np.array([0.0, 1.0, 0.4, 1.0, 0.0])
    sure = PassRates(1e4 * p + 1e-3, 1e4 * (1 - p) + 1e-3, p, np.ones(5))  # near-certain posteriors
    gain = get_estimator(estimator).expected_gain_terms
    values = np.stack([signal_value(sure, n, gain) for n in range(17)], axis=1)
    assert allocate_budget(values, 16, 2, 16) == [0, 0, 16, 0, 0]


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo"])
def test_budget_fills_the_prompts_worth_most_per_completion(estimator):
    """Every estimator's gain grows about linearly in n (grpo a little faster), so the exact
    programme gives the most completions to the prompts of the highest p (1 - p), in order."""
    p = np.array([0.05, 0.3, 0.95, 0.5])
    sure = PassRates(1e4 * p, 1e4 * (1 - p), p, np.ones(4))
    gain = get_estimator(estimator).expected_gain_terms
    values = np.stack([signal_value(sure, n, gain) for n in range(9)], axis=1)
    assert allocate_budget(values, 16, 2, 8) == [0, 8, 0, 8]


def test_skip_probability_grows_with_evidence_and_respects_the_floor():
    h = PromptHistory()
    est = PassRateEstimator(h, strength=2.0, memory=8.0)
    gain = get_estimator("rloo").expected_gain_terms
    h.record(["mid"] * 4, [1.0, 0.0, 1.0, 0.0], 1)
    q = []
    for step in range(2, 6):
        h.record(["zero"] * 4, [0.0] * 4, step)
        q.append(skip_probability(est.estimate(["zero"]), est.fresh(), gain, 4, floor=0.01)[0])
    assert all(b > a for a, b in zip(q, q[1:]))  # more all-zero visits, likelier skipped
    skip = skip_probability(est.estimate(["zero", "mid", "never"]), est.fresh(), gain, 4, floor=0.3)
    assert skip[0] == pytest.approx(0.7)  # capped at 1 - floor
    assert skip[1] == 0.0 and skip[2] == pytest.approx(0.0, abs=1e-9)  # worth a fresh prompt or more: kept


def test_skip_follows_the_signal_value_not_the_chance_of_an_all_equal_group():
    """A pool of prompts nearly all solved or failed (population Beta(0.05, 0.05)): a prompt whose
    posterior is Beta(3, 3) has one chance in four of an all-equal group, yet is worth 12 fresh
    prompts, so it is never skipped."""
    fresh = beta(0.05, 0.05)
    middling = beta(3.0, 3.0)
    gain = get_estimator("kae").expected_gain_terms
    assert all_equal_probability(3.0, 3.0, 4) > 0.2
    assert signal_value(middling, 4, gain)[0] > 10 * signal_value(fresh, 4, gain)[0]
    assert skip_probability(middling, fresh, gain, 4, floor=0.1)[0] == 0.0


def test_skip_never_starves_a_prompt_and_considers_every_prompt_drawn():
    rows = [{"id": f"p{i}", "prompt": str(i)} for i in range(8)]
    history = PromptHistory()
    for step in range(1, 30):  # every prompt: many all-zero visits, so every one is worth little
        history.record([r["id"] for r in rows for _ in range(4)], [0.0] * 32, step)
    history.population = 0.5  # while a fresh prompt is expected at 0.5
    sampler = PromptSampler(rows, 2, seed=0)
    drawn, more = [], sampler.more
    sampler.more = lambda n: drawn.append(n) or more(n)
    allocator = Allocator(rollout_options(allocation="skip", batch_prompts=2, skip_floor=0.2), sampler,
                          PassRateEstimator(history, strength=2.0, memory=8.0),
                          gain=get_estimator("rloo").expected_gain_terms, seed=0)
    seen = set()
    for _ in range(60):
        drawn.clear()
        plan = allocator.plan()
        assert len(plan.rows) == 2 and plan.counts == [4, 4] and plan.skipped == plan.considered - 2
        assert plan.considered == 2 + sum(drawn) and len(plan.left_out) == plan.skipped
        seen |= {r["id"] for r in plan.rows}
    assert seen == {r["id"] for r in rows}


def test_record_enters_every_round_and_reports_calibration():
    rows = [{"id": f"p{i}", "prompt": str(i)} for i in range(8)]
    history = PromptHistory()
    history.record(["p0"] * 4 + ["p1"] * 4, [0.0] * 4 + [1.0, 0.0, 1.0, 0.0], 1)
    allocator = Allocator(rollout_options(allocation="budget", batch_prompts=2, group_size=4, candidates=4,
                                          min_per_prompt=2, max_per_prompt=4),
                          PromptSampler(rows, 2, seed=0), PassRateEstimator(history),
                          gain=get_estimator("rloo").expected_gain_terms)
    plan = allocator.plan()
    assert sum(plan.counts) == 8 and plan.considered == 4 and len(plan.rows) + plan.skipped == 4
    assert all(2 <= n <= 4 for n in plan.counts) and len(plan.left_out) == plan.skipped
    extra = allocator.extra(2)  # a second round, as dynamic sampling draws it
    rewards = np.concatenate([np.full(n, float(i % 2)) for i, n in enumerate(plan.counts)])  # every group all-equal
    more = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    m = allocator.record([(plan, rewards), (extra, more)], 2)
    groups = len(plan.rows) + 2
    assert m["prompts_considered"] == 6 and m["prompts_rolled_out"] == groups
    assert m["all_equal_realised"] == pytest.approx((len(plan.rows) + 1) / groups)
    assert sum(m.get(f"all_equal_bin{b}_groups", 0) for b in range(10)) == groups
    assert "passrate_logpred_first" in m and "prior_brier_population" in m and m["first_visits"] >= 2
    # every completion of both rounds is in the history, at this step
    assert sum(len(history.get(r["id"])[0]) for r in rows) == 8 + 8 + 8
    assert all(history.get(r["id"])[0][-1] == 2 for r in extra.rows)
    assert calibration_gap([m]) is not None and len(reliability([m])) >= 1


def test_keep_varied():
    assert keep_varied(np.array([1.0, 1.0, 0.0, 1.0, 0.5]), np.array([0, 0, 1, 1, 2])).tolist() == [False, True,
                                                                                                    False]


# --- KAE borrows strength ----------------------------------------------------------------------

def test_kae_prior_baseline_is_the_posterior_mean_given_the_other_samples():
    """First visits at G = 2 of prompts with p ~ Beta(1.2, 1.8): KAE shrunk toward the population
    prior (p0 = 0.4, kappa = 3) gives each sample the posterior mean of p given the other sample;
    simulated, the mean true p among samples with that baseline equals it, and the baseline's
    error is below that of the other sample alone (KAE without a prior)."""
    P = 20_000
    rng = np.random.default_rng(7)
    p = rng.beta(1.2, 1.8, P)
    r = torch.from_numpy(rng.binomial(1, np.repeat(p, 2)).astype(float))
    ids = [f"x{i}" for i in range(P) for _ in range(2)]
    def shrunk():
        kae = get_estimator("kae")
        kae.use_prior(lambda keys: (0.4, 3.0))
        return kae

    b = shrunk().estimate(r, ids, 1).baselines.numpy()
    truth = np.repeat(p, 2)
    for value in np.unique(b):
        inside = b == value
        assert abs(truth[inside].mean() - value) < 4 * truth[inside].std() / math.sqrt(inside.sum())
    plain = get_estimator("kae").estimate(r, ids, 1).baselines.numpy()
    assert ((b - truth) ** 2).mean() < 0.6 * ((plain - truth) ** 2).mean()
    # never the sample's own reward: flipping it leaves its baseline alone
    flipped = r.clone()
    flipped[0] = 1 - flipped[0]
    assert shrunk().estimate(flipped, ids, 1).baselines[0] == b[0]


def test_config_rules():
    with pytest.raises(ConfigError, match="min_per_prompt >= 2"):
        load_config(overrides=["rollout.allocation=budget", "rollout.min_per_prompt=1"])
    with pytest.raises(ConfigError, match="cannot spend"):
        load_config(overrides=["rollout.allocation=budget", "rollout.candidates=4", "rollout.max_per_prompt=2"])
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        load_config(overrides=["rollout.allocation=skip", "rollout.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="astar"):
        load_config(overrides=["rollout.passrate_prior=vstar"])
    with pytest.raises(ConfigError, match="algo.kae_prior=population shapes KAE's baseline"):
        load_config(overrides=["algo.kae_prior=population"])


# --- in training ------------------------------------------------------------------------------

def _steps(run_dir):
    return [r for r in _rows(run_dir) if "reward_mean" in r]


@pytest.mark.parametrize("options", [
    ["rollout.allocation=budget", "algo.estimator=rloo", "rollout.candidates=8", "rollout.max_per_prompt=6"],
    ["rollout.allocation=skip", "algo.estimator=grpo", "rollout.passrate_prior=cross_prompt",
     "rollout.prior_neighbors=4"],
    ["rollout.dynamic_sampling=true", "algo.estimator=grpo", "rollout.dynamic_max_rounds=3"],
    ["algo.estimator=kae", "algo.kae_prior=cross_prompt", "data.sticky_steps=2", "rollout.prior_neighbors=4"],
    ["algo.estimator=kae", "algo.kae_prior=vstar", "algo.vstar_n=2"],
], ids=["budget", "skip-cross-prompt", "dynamic", "kae-prior", "kae-vstar-prior"])
def test_training_with_an_allocation(tmp_path, tiny_model_dir, options):
    run_dir = tmp_path / "run"
    cfg = load_config(overrides=[*_overrides(tiny_model_dir, run_dir, "max_steps=4", "save_every=0"), *options,
                                 f"algo.vstar_path={tmp_path / 'vstar.json'}"])
    trainer.train(cfg, task=_toy_task(16))
    steps = _steps(run_dir)
    assert len(steps) == 4
    for before, row in zip([{"samples": 0}, *steps], steps):  # every completion generated is accounted for
        generated = row["samples"] - before["samples"]
        assert row["completions_per_prompt_mean"] * row["prompts_rolled_out"] == pytest.approx(generated)
        assert generated == 16 * row.get("dynamic_rounds", 1)
        assert row["prompts_considered"] >= row["prompts_rolled_out"]
    assert "prior_brier_population" in steps[0] and "passrate_logpred_first" in steps[0]
    if "rollout.passrate_prior=cross_prompt" in options:
        assert "prior_brier_cross_prompt" in steps[0]
    for kind in ("cross_prompt", "vstar"):
        if f"algo.kae_prior={kind}" in options:
            assert all(r["kae_prior_weight_mean"] > 0 for r in steps) and f"prior_brier_{kind}" in steps[0]
    assert "passrate_logpred_revisit" in steps[-1] or "rollout.allocation=budget" in options


@pytest.mark.parametrize("allocation", ["skip", "budget"])
def test_sigkill_and_resume_with_an_allocation_matches_uninterrupted(tmp_path, tiny_model_dir, monkeypatch,
                                                                      allocation):
    extra = [f"rollout.allocation={allocation}", "rollout.candidates=6", "rollout.max_per_prompt=6",
             "rollout.skip_floor=0.5", "algo.kae_prior=population"]
    reference = tmp_path / "reference"
    trainer.train(load_config(overrides=_overrides(tiny_model_dir, reference, *extra)), task=_toy_task())
    run_dir = tmp_path / "run"
    _kill(_run_until_hang(tmp_path, "reward:6", _overrides(tiny_model_dir, run_dir, *extra)))
    assert _resume(monkeypatch, run_dir) == 0
    got, want = _steps(run_dir), _steps(reference)
    keys = (*COMPARED, "prompts_considered", "completions_per_prompt_max", "all_equal_predicted", "passrate_strength",
            "passrate_memory", "kae_prior_weight_mean")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]
