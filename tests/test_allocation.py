"""Per-prompt history, pass-rate estimates and rollout allocation (history.py, passrate.py, allocation.py)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from frugalrl import trainer
from frugalrl.advantages import get_estimator
from frugalrl.allocation import (Allocator, all_equal_probability, allocate_budget, keep_varied, signal_value,
                                 skip_probability)
from frugalrl.config import ConfigError, load_config
from frugalrl.data import PromptSampler
from frugalrl.history import PromptHistory
from frugalrl.passrate import PassRateEstimator
from test_resume import COMPARED, _kill, _overrides, _resume, _rows, _run_until_hang
from test_train import _toy_task


def rollout_options(**overrides):
    options = dict(allocation="uniform", batch_prompts=4, group_size=4, candidates=0, min_per_prompt=2,
                   max_per_prompt=8, skip_floor=0.1)
    return SimpleNamespace(**{**options, **overrides})


# --- history -------------------------------------------------------------------------------

def test_history_records_visits_bounded_and_round_trips():
    h = PromptHistory(max_entries=3, population_window=3)  # population: exponential average, rate 1/2
    h.record(["x", "y", "x"], [1.0, 0.0, 0.0], 1)
    h.record(["x", "x"], [1.0, 1.0], 2)
    assert h.get("x") == ([1, 2, 2], [0.0, 1.0, 1.0])  # oldest dropped at 3 entries
    assert h.visits("x") == [(1, [0.0]), (2, [1.0, 1.0])]
    assert h.population == pytest.approx(0.5 * (1 / 3) + 0.5 * 1.0)
    restored = PromptHistory(max_entries=3)
    restored.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert restored.entries == h.entries and restored.population == h.population
    with pytest.raises(ValueError, match="one id per reward"):
        h.record(["x"], [1.0, 0.0], 3)


def test_kae_reads_a_shared_history_as_its_own():
    batches = [(torch.tensor([1.0, 0.0, 0.5]), ["x", "x", "y"], 1), (torch.tensor([0.0, 1.0]), ["y", "x"], 2),
               (torch.tensor([1.0, 1.0, 0.0]), ["x", "y", "y"], 3)]
    own, shared = get_estimator("kae", bandwidth=3.0), get_estimator("kae", bandwidth=3.0)
    history = PromptHistory()
    shared.use_history(history)
    for batch in batches:
        torch.testing.assert_close(own.estimate(*batch).advantages, shared.estimate(*batch).advantages)
    assert history.get("x") == ([1, 1, 2, 3], [1.0, 0.0, 1.0, 1.0])
    assert shared.state_dict() == {}  # the history's owner saves it
    # other estimators record into a shared history too
    rloo = get_estimator("rloo")
    rloo.use_history(other := PromptHistory())
    rloo.estimate(torch.tensor([1.0, 0.0]), ["z", "z"], 4)
    assert other.get("z") == ([4, 4], [1.0, 0.0])


# --- pass rates ------------------------------------------------------------------------------

def test_pass_rate_posterior_by_hand():
    h = PromptHistory()
    h.record(["x"] * 4, [1.0, 0.0, 0.0, 0.0], 1)   # older visit: weight exp(-1/2)
    h.record(["x"] * 2, [1.0, 1.0], 5)             # newest visit: weight 1
    est = PassRateEstimator(h, visits_bandwidth=2.0, strength=2.0)
    rates = est.estimate(["x", "new"])
    pop = h.population
    w = math.exp(-0.5)
    s, n = 2 + w * 1, 2 + w * 4
    np.testing.assert_allclose(rates.alpha, [2 * pop + s, 2 * pop])
    np.testing.assert_allclose(rates.beta, [2 * (1 - pop) + n - s, 2 * (1 - pop)])
    np.testing.assert_allclose(rates.mean[1], pop)  # no history: the prior
    assert rates.samples[1] == 0 and rates.samples[0] == pytest.approx(n)
    p = rates.mean[0]
    assert rates.std[0] == pytest.approx(math.sqrt(p * (1 - p) / (2 + n + 1)))


def test_cross_prompt_prior_borrows_from_similar_prompts():
    h = PromptHistory()
    h.record(["a1", "a2", "b1", "b2"], [1.0, 1.0, 0.0, 0.0], 1)
    # two clusters of directions: a* near (1, 0), b* near (0, 1); the queries sit in each cluster
    vectors = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0], [1.0, 0.0], [0.0, 1.0]])
    ids = ["a1", "a2", "b1", "b2", "qa", "qb"]
    est = PassRateEstimator(h, prior="cross_prompt", embeddings=(ids, vectors), neighbors=2, strength=1.0)
    qa, qb = est.priors(["qa", "qb"])
    pop = h.population  # 0.5
    assert qa == pytest.approx((2 * 1.0 + pop) / 3) and qb == pytest.approx((2 * 0.0 + pop) / 3)
    population = est.priors(["qa", "qb"], "population")
    assert list(population) == [pop, pop]
    # a prompt with history is not its own neighbour: a1's neighbours are a2 and one b
    assert est.priors(["a1"])[0] < qa


def test_unknown_prior_and_missing_inputs_are_errors():
    with pytest.raises(ValueError, match="choose one of"):
        PassRateEstimator(PromptHistory(), prior="nope")
    with pytest.raises(ValueError, match="astar"):
        PassRateEstimator(PromptHistory(), prior="vstar")


# --- the allocator's arithmetic ------------------------------------------------------------

def test_signal_values_by_hand():
    # group baseline: (1 - p^n - (1-p)^n) p (1-p); p = 0.5, n = 2: (1 - 0.5) * 0.25
    assert signal_value(np.array([0.5]), 2)[0] == pytest.approx(0.125)
    assert signal_value(np.array([0.5]), 1)[0] == 0  # one sample of a group baseline teaches nothing
    assert all_equal_probability(np.array([0.2]), 3)[0] == pytest.approx(0.2**3 + 0.8**3)
    # outside baseline b: n (p - 2pb + b^2); p = 0.3, b = 0 (a V* of 0): each sample is worth p
    assert signal_value(np.array([0.3]), 4, np.array([0.0]))[0] == pytest.approx(1.2)
    assert signal_value(np.array([0.3]), 1, np.array([0.3]))[0] == pytest.approx(0.21)  # p (1 - p)


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_spent_exactly_within_min_and_max(seed):
    rng = np.random.default_rng(seed)
    C, lo, hi = int(rng.integers(3, 12)), int(rng.integers(1, 4)), int(rng.integers(4, 9))
    budget = int(rng.integers(lo, C * hi + 1))
    values = np.sort(rng.random((C, hi + 1)), axis=1)
    values[:, 0] = 0
    try:
        counts = allocate_budget(values, budget, lo, hi)
    except ValueError as e:  # only where no counts in {0} u [lo, hi] can sum to the budget
        assert "cannot spend exactly" in str(e)
        reachable = {0}
        for _ in range(C):
            reachable |= {r + n for r in reachable for n in range(lo, hi + 1)}
        assert budget not in reachable
        return
    assert sum(counts) == budget and all(n == 0 or lo <= n <= hi for n in counts)
    # exact: no single move of completions between two candidates does better
    total = sum(values[c, n] for c, n in enumerate(counts))
    for a in range(C):
        for b in range(C):
            for k in range(1, hi + 1):
                na, nb = counts[a] - k, counts[b] + k
                if a != b and (na == 0 or lo <= na <= hi) and lo <= nb <= hi:
                    assert values[a, na] + values[b, nb] - values[a, counts[a]] - values[b, counts[b]] <= 1e-12
    assert total >= 0


@pytest.mark.parametrize("baseline", ["group", "outside"])
def test_budget_goes_to_the_one_prompt_that_can_teach(baseline):
    p = np.array([0.0, 1.0, 0.4, 1.0, 0.0])[:, None]
    n = np.arange(17)[None, :]
    values = signal_value(p, n, None if baseline == "group" else p)
    assert allocate_budget(values, 16, 2, 16) == [0, 0, 16, 0, 0]


def test_group_values_favour_middling_prompts_and_spread():
    p = np.array([0.5, 0.5, 0.05, 0.95])[:, None]
    counts = allocate_budget(signal_value(p, np.arange(9)[None, :]), 8, 2, 8)
    assert sum(counts) == 8 and counts[0] >= 2 and counts[1] >= 2


def test_skip_probability_grows_with_evidence_and_respects_the_floor():
    h = PromptHistory()
    est = PassRateEstimator(h, strength=2.0)
    h.record(["mid"] * 4, [1.0, 0.0, 1.0, 0.0], 1)
    q = []
    for step in range(2, 6):
        h.record(["zero"] * 4, [0.0] * 4, step)
        q.append(skip_probability(est.estimate(["zero"]), 4, floor=0.01)[0])
    assert all(b > a for a, b in zip(q, q[1:]))  # more all-zero visits, likelier skipped
    rates = est.estimate(["zero", "mid", "never"])
    skip = skip_probability(rates, 4, floor=0.3)
    assert skip[0] == pytest.approx(0.7)  # capped at 1 - floor
    assert skip[1] < skip[0] and skip[2] == 0.0  # no evidence, no skip


def test_skip_never_starves_a_prompt():
    rows = [{"id": f"p{i}", "prompt": str(i)} for i in range(8)]
    history = PromptHistory()
    for step in range(1, 30):  # every prompt: many all-zero visits, so every one is predicted all-equal
        history.record([r["id"] for r in rows for _ in range(4)], [0.0] * 32, step)
    sampler = PromptSampler(rows, 2, seed=0)
    allocator = Allocator(rollout_options(allocation="skip", batch_prompts=2, skip_floor=0.2), sampler,
                          PassRateEstimator(history), group_baseline=True, seed=0)
    seen = set()
    for _ in range(60):
        plan = allocator.plan()
        assert len(plan.rows) == 2 and plan.counts == [4, 4]
        assert plan.considered >= 2 and plan.skipped == plan.considered - 2
        seen |= {r["id"] for r in plan.rows}
    assert seen == {r["id"] for r in rows}


def test_budget_plan_and_metrics():
    rows = [{"id": f"p{i}", "prompt": str(i)} for i in range(8)]
    history = PromptHistory()
    history.record(["p0"] * 4 + ["p1"] * 4, [0.0] * 4 + [1.0, 0.0, 1.0, 0.0], 1)
    allocator = Allocator(rollout_options(allocation="budget", batch_prompts=2, group_size=4, candidates=4,
                                          min_per_prompt=2, max_per_prompt=4),
                          PromptSampler(rows, 2, seed=0), PassRateEstimator(history), group_baseline=True)
    plan = allocator.plan()
    assert sum(plan.counts) == 8 and plan.considered == 4 and len(plan.rows) + plan.skipped == 4
    assert all(2 <= n <= 4 for n in plan.counts)
    rewards = np.concatenate([np.full(n, float(i % 2)) for i, n in enumerate(plan.counts)])  # every group all-equal
    m = allocator.metrics(plan, rewards)
    assert m["all_equal_realised"] == 1.0 and m["completions_per_prompt_max"] == max(plan.counts)
    assert m["prompts_rolled_out"] == len(plan.rows) and m["prompts_considered"] == 4
    realised = np.array([float(i % 2) for i in range(len(plan.counts))])
    assert m["passrate_brier"] == pytest.approx(float(((plan.rates.mean - realised) ** 2).mean()))
    if plan.first.any():
        assert "prior_brier_population" in m


def test_keep_varied():
    assert keep_varied(np.array([1.0, 1.0, 0.0, 1.0, 0.5]), np.array([0, 0, 1, 1, 2])).tolist() == [False, True,
                                                                                                    False]


def test_config_rules():
    with pytest.raises(ConfigError, match="min_per_prompt >= 2"):
        load_config(overrides=["rollout.allocation=budget", "rollout.min_per_prompt=1"])
    with pytest.raises(ConfigError, match="cannot spend"):
        load_config(overrides=["rollout.allocation=budget", "rollout.candidates=4", "rollout.max_per_prompt=2"])
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        load_config(overrides=["rollout.allocation=skip", "rollout.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="astar"):
        load_config(overrides=["rollout.passrate_prior=vstar"])


# --- in training ------------------------------------------------------------------------------

def _steps(run_dir):
    return [r for r in _rows(run_dir) if "reward_mean" in r]


@pytest.mark.parametrize("options", [
    ["rollout.allocation=budget", "algo.estimator=rloo", "rollout.candidates=8", "rollout.max_per_prompt=6"],
    ["rollout.allocation=skip", "algo.estimator=grpo", "rollout.passrate_prior=cross_prompt",
     "rollout.prior_neighbors=4"],
    ["rollout.dynamic_sampling=true", "algo.estimator=grpo", "rollout.dynamic_max_rounds=3"],
], ids=["budget", "skip-cross-prompt", "dynamic"])
def test_training_with_an_allocation(tmp_path, tiny_model_dir, options):
    run_dir = tmp_path / "run"
    cfg = load_config(overrides=[*_overrides(tiny_model_dir, run_dir, "max_steps=4", "save_every=0"), *options])
    trainer.train(cfg, task=_toy_task(16))
    steps = _steps(run_dir)
    assert len(steps) == 4
    for row in steps:
        assert row["completions_per_prompt_mean"] * row["prompts_rolled_out"] == pytest.approx(16)
        assert 0 <= row["passrate_brier"] <= 1
    if "rollout.dynamic_sampling=true" in options:
        assert all(r["samples"] - p["samples"] == 16 * r["dynamic_rounds"] for p, r in zip(steps, steps[1:]))
    assert "prior_brier_population" in steps[0]  # every prompt is on its first visit at step 1
    if "rollout.passrate_prior=cross_prompt" in options:
        assert "prior_brier_cross_prompt" in steps[0]


@pytest.mark.parametrize("allocation", ["skip", "budget"])
def test_sigkill_and_resume_with_an_allocation_matches_uninterrupted(tmp_path, tiny_model_dir, monkeypatch,
                                                                      allocation):
    extra = [f"rollout.allocation={allocation}", "rollout.candidates=6", "rollout.max_per_prompt=6",
             "rollout.skip_floor=0.5"]
    reference = tmp_path / "reference"
    trainer.train(load_config(overrides=_overrides(tiny_model_dir, reference, *extra)), task=_toy_task())
    run_dir = tmp_path / "run"
    _kill(_run_until_hang(tmp_path, "reward:6", _overrides(tiny_model_dir, run_dir, *extra)))
    assert _resume(monkeypatch, run_dir) == 0
    got, want = _steps(run_dir), _steps(reference)
    keys = (*COMPARED, "prompts_considered", "completions_per_prompt_max", "passrate_brier")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in want]
