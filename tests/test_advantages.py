"""Advantage estimators against numbers computed by hand (the arithmetic is in the comments)."""

import json
import math

import pytest
import torch

from frugalrl.advantages import AdvantageOutput, get_estimator, list_estimators, optimal_value

EPS = 1e-6
SQRT_HALF = math.sqrt(0.5)


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def build(name, **options):
    if name == "astar" and "v_star" not in options:
        options["v_star"] = {"a": 0.0, "b": 0.0, "c": 0.0}
    return get_estimator(name, **options)


# Shuffled batch with unequal groups: a = samples 0, 2, 4; b = samples 1, 5; c = sample 3.
IDS = ["a", "b", "a", "c", "a", "b"]
R = t(1.0, 0.0, 0.0, 5.0, 2.0, 1.0)


def test_list_estimators():
    assert list_estimators() == ["astar", "dr_grpo", "grpo", "kae", "reinforce", "reinforce_pp", "rloo"]


# ------------------------------------------------------------------------------- group baselines


def test_grpo_by_hand():
    out = build("grpo").estimate(R, IDS, step=1)
    assert isinstance(out, AdvantageOutput)
    # a: r = 1, 0, 2; mean 1; sample std sqrt((0 + 1 + 1) / 2) = 1 -> (0, -1, 1) / (1 + eps)
    # b: r = 0, 1; mean 0.5; sample std sqrt((0.25 + 0.25) / 1) = sqrt(0.5) -> -/+ 0.5 / (sqrt(.5) + eps)
    # c: a group of one -> advantage 0, baseline = its own reward 5
    b = 0.5 / (SQRT_HALF + EPS)
    close(out.advantages, [0.0, -b, -1 / (1 + EPS), 0.0, 1 / (1 + EPS), b])
    close(out.baselines, [1.0, 0.5, 1.0, 5.0, 1.0, 0.5])


def test_grpo_scale_false_and_dr_grpo_by_hand():
    # r - group mean: a: (1, 0, 2) - 1; b: (0, 1) - 0.5; c: 5 - 5
    expected = [0.0, -0.5, -1.0, 0.0, 1.0, 0.5]
    close(build("dr_grpo").estimate(R, IDS, 1).advantages, expected)
    close(build("grpo", scale=False).estimate(R, IDS, 1).advantages, expected)


def test_rloo_by_hand():
    ids, r = IDS[:3] + IDS[4:], t(1.0, 0.0, 0.0, 2.0, 1.0)  # a = samples 0, 2, 3; b = 1, 4
    out = build("rloo").estimate(r, ids, 1)
    # a: baselines (0 + 2)/2 = 1, (1 + 2)/2 = 1.5, (1 + 0)/2 = 0.5; b: baselines 1, 0
    close(out.baselines, [1.0, 1.0, 1.5, 0.5, 0.0])
    close(out.advantages, [0.0, -1.0, -1.5, 1.5, 1.0])


def test_rloo_group_of_one_is_an_error():
    with pytest.raises(ValueError, match=r"rloo needs G >= 2.*'c'"):
        build("rloo").estimate(R, IDS, 1)


def test_reinforce_by_hand():
    r = t(1.0, 0.0, 3.0)
    out = build("reinforce").estimate(r, ["a", "a", "b"], 1)  # prompts are ignored: batch baseline
    # batch sum 4: leave-one-out baselines (4-1)/2 = 1.5, (4-0)/2 = 2, (4-3)/2 = 0.5
    close(out.baselines, [1.5, 2.0, 0.5])
    close(out.advantages, [-0.5, -2.0, 2.5])
    out = build("reinforce", baseline="none").estimate(r, ["a", "a", "b"], 1)
    close(out.baselines, [0.0, 0.0, 0.0])
    close(out.advantages, r)
    # N = 1: no other sample, baseline 0
    close(build("reinforce").estimate(t(0.7), ["a"], 1).advantages, [0.7])


def test_reinforce_pp_by_hand():
    out = build("reinforce_pp").estimate(t(1.0, 2.0, 3.0, 6.0), ["a", "b", "a", "c"], 1)
    # batch mean 3; deviations -2, -1, 0, 3; sample var (4 + 1 + 0 + 9) / 3 = 14/3
    std = math.sqrt(14 / 3)
    close(out.advantages, [d / (std + EPS) for d in (-2.0, -1.0, 0.0, 3.0)])
    close(out.baselines, [3.0] * 4)


def test_astar_by_hand():
    est = get_estimator("astar", v_star={"a": 0.25, "b": 0.5})
    out = est.estimate(t(1.0, 0.0, 1.0), ["b", "a", "a"], 1)
    # A = r - V*: 1 - 0.5, 0 - 0.25, 1 - 0.25
    close(out.advantages, [0.5, -0.25, 0.75])
    close(out.baselines, [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="'zz'"):
        est.estimate(t(1.0, 0.0), ["a", "zz"], 1)


@pytest.mark.parametrize("name", list_estimators())
def test_shuffling_the_batch_permutes_the_output(name):
    keep = [0, 1, 2, 4, 5] if name == "rloo" else range(6)  # rloo: leave out c, the group of one
    ids, r = [IDS[i] for i in keep], R[list(keep)]
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    out = build(name).estimate(r, ids, 1)
    shuffled = build(name).estimate(r[perm], [ids[i] for i in perm], 1)
    close(shuffled.advantages, out.advantages[perm])
    close(shuffled.baselines, out.baselines[perm])


ZERO_SIGNAL = {"grpo": True, "dr_grpo": True, "rloo": True, "reinforce": False, "reinforce_pp": False,
               "kae": False, "astar": False}


@pytest.mark.parametrize("name", list_estimators())
def test_zero_signal_flag(name):
    est = build(name, v_star={"a": 0.3, "b": 0.3}) if name == "astar" else build(name)
    assert est.zero_signal_for_constant_groups is ZERO_SIGNAL[name]
    if name == "kae":  # kae's signal for a constant group comes from history: give it some
        est.estimate(t(0.0, 1.0), ["a", "b"], 1)
    out = est.estimate(t(1.0, 1.0, 0.0, 0.0, 1.0), ["a", "a", "b", "b", "a"], 2)
    if est.zero_signal_for_constant_groups:  # the trainer may drop such groups: they must give exactly 0
        assert torch.equal(out.advantages, torch.zeros(5))
    else:
        assert out.advantages.abs().sum() > 0


@pytest.mark.parametrize("name", list_estimators())
def test_constant_groups_carry_exactly_zero_signal_in_float64(name):
    # 0.1 and 0.7 are no sums of few powers of two: the float64 sum of three rounds, so r - mean
    # comes out ~1e-17 unless the estimator zeroes constant groups as its flag promises
    r = t(0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, dtype=torch.float64)
    est = build(name, v_star={"a": 0.3, "b": 0.3, "c": 0.3}) if name == "astar" else build(name)
    out = est.estimate(r, ["a"] * 3 + ["b"] * 3 + ["c"] * 2, 1)
    if est.zero_signal_for_constant_groups:
        assert torch.equal(out.advantages[:6], torch.zeros(6, dtype=torch.float64))
    assert out.advantages[6:].abs().min() > 0.1  # group c is not constant


@pytest.mark.parametrize("name", list_estimators())
def test_stateless_state_dict_and_dtype(name):
    est = build(name)
    out = est.estimate(t(1.0, 0.0, dtype=torch.float64), ["a", "a"], 1)
    assert out.advantages.dtype == out.baselines.dtype == torch.float64
    assert all(isinstance(v, float) for v in out.metrics.values())
    if name != "kae":
        assert est.state_dict() == {}
    json.dumps(est.state_dict())


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list_estimators())
@pytest.mark.parametrize("rewards, ids, step, match", [
    (t(1.0, 0.0), ["a"], 1, "prompt_ids has 1"),
    (t(1.0, 0.0, 1.0, 0.0).reshape(2, 2), ["a", "a"], 1, "1-D"),
    (t(1.0, float("nan")), ["a", "a"], 1, r"finite.*\[1\]"),
    (t(float("inf"), 0.0), ["a", "a"], 1, r"finite.*\[0\]"),
    (t(1.0, 0.0), ["a", "a"], 0, "step must be >= 1"),
    (t(), [], 1, "empty"),
    (t(1.0, 0.0), "aa", 1, "list of strings"),
    (t(1.0, 0.0), [1, 2], 1, "strings"),
])
def test_bad_input(name, rewards, ids, step, match):
    with pytest.raises(ValueError, match=match):
        build(name).estimate(rewards, ids, step)


@pytest.mark.parametrize("name, options, match", [
    ("ppo", {}, r"unknown estimator 'ppo'.*'grpo'"),
    ("grpo", {"epsilon": 0.1}, r"unknown option.*epsilon.*eps="),
    ("dr_grpo", {"eps": 0.1}, "unknown option"),
    ("rloo", {"baseline": "loo"}, "unknown option"),
    ("astar", {}, "missing required option.*v_star"),
    ("astar", {"v_star": {"a": float("nan")}}, "non-finite"),
    ("kae", {"kernel": "gaussian"}, r"kernel='gaussian'.*triangular"),
    ("kae", {"bandwidth": 0}, "bandwidth"),
    ("kae", {"bandwidth": None}, "bandwidth"),
    ("kae", {"bandwidth_mode": "fixed"}, "bandwidth_mode"),
    ("kae", {"scale": "group"}, "scale"),
    ("kae", {"max_history": 0}, "max_history"),
    ("reinforce", {"baseline": "mean"}, "baseline"),
    ("reinforce_pp", {"eps": -1}, "eps"),
    ("grpo", {"eps": 0}, "eps"),
])
def test_bad_options_raise_value_error(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_estimator(name, **options)


# ------------------------------------------------------------------------------- kae


def test_kae_triangular_window_three_steps():
    est = get_estimator("kae", kernel="triangular", bandwidth=4.0, bandwidth_mode="window")
    # step 1, no history. x (G=2): leave-one-out -> baselines 0 and 1.
    # y (G=1): denominator 0 -> fallback to the batch leave-one-out mean (1 + 0)/2 = 0.5.
    out = est.estimate(t(1.0, 0.0, 0.5), ["x", "x", "y"], 1)
    close(out.baselines, [0.0, 1.0, 0.5])
    close(out.advantages, [1.0, -1.0, 0.0])
    assert out.metrics["kae_fallback"] == 1.0
    assert out.metrics["kae_history_weight_mean"] == 0.0

    # step 2: lag 1 -> u = 1/4 -> K = 0.75 for each step-1 entry. Shuffled order.
    # y (G=1): V = 0.75 * 0.5 / 0.75 = 0.5.
    # x (G=2, rewards 1, 1): V = (0.75*1 + 0.75*0 + 1*1) / (0.75 + 0.75 + 1) = 1.75 / 2.5 = 0.7
    # -- a constant group still gets a non-zero advantage from its history.
    out = est.estimate(t(1.0, 1.0, 1.0), ["y", "x", "x"], 2)
    close(out.baselines, [0.5, 0.7, 0.7])
    close(out.advantages, [0.5, 0.3, 0.3])
    assert out.metrics["kae_fallback"] == 0.0
    close(torch.tensor(out.metrics["kae_history_weight_mean"]), (0.75 + 1.5 + 1.5) / 3)

    # step 3, x alone (G=1): step-1 entries lag 2 -> K = 0.5; step-2 entries lag 1 -> K = 0.75.
    # V = (0.5*1 + 0.5*0 + 0.75*1 + 0.75*1) / (0.5 + 0.5 + 0.75 + 0.75) = 2.0 / 2.5 = 0.8
    out = est.estimate(t(0.0), ["x"], 3)
    close(out.baselines, [0.8])
    close(out.advantages, [-0.8])


def test_kae_exponential_window():
    est = get_estimator("kae", kernel="exponential", bandwidth=4.0)
    est.estimate(t(1.0, 0.0), ["x", "x"], 1)
    # step 2: K = exp(-1/4) for the two step-1 entries (rewards 1, 0); current x sample alone.
    w1 = math.exp(-0.25)
    out = est.estimate(t(1.0), ["x"], 2)
    close(out.baselines, [w1 * 1 / (2 * w1)])  # = 0.5
    # step 3: step-1 entries K = exp(-2/4), step-2 entry (reward 1) K = exp(-1/4); G = 2 now.
    w1, w2 = math.exp(-0.5), math.exp(-0.25)
    out = est.estimate(t(0.0, 1.0), ["x", "x"], 3)
    hist_num, hist_den = w1 * (1 + 0) + w2 * 1, 2 * w1 + w2
    close(out.baselines, [(hist_num + 1.0) / (hist_den + 1), (hist_num + 0.0) / (hist_den + 1)])


def test_kae_relative_bandwidth():
    est = get_estimator("kae", bandwidth=1.0, bandwidth_mode="relative")
    # step 1: x alone in a batch of one -> fallback baseline 0
    out = est.estimate(t(1.0), ["x"], 1)
    close(out.baselines, [0.0])
    assert out.metrics["kae_fallback"] == 1.0
    # step 2: d = (2-1)/(2*1) = 1/2 -> K = 0.5; V = 0.5*1 / 0.5 = 1
    close(est.estimate(t(0.0), ["x"], 2).advantages, [-1.0])
    # step 3: step-1 entry d = 2/3 -> K = 1/3 (reward 1); step-2 entry d = 1/3 -> K = 2/3 (reward 0)
    # sample r=1: V = (1/3 + 0) / (1 + 1) = 1/6; sample r=0: V = (1/3 + 1) / 2 = 2/3
    out = est.estimate(t(1.0, 0.0), ["x", "x"], 3)
    close(out.baselines, [1 / 6, 2 / 3])
    close(out.advantages, [5 / 6, -2 / 3])


def test_kae_auto_bandwidth():
    est = get_estimator("kae", bandwidth_mode="auto", auto_c=2.0)
    est.estimate(t(1.0, 1.0, 1.0, 0.0), ["x"] * 4, 1)
    # step 2: N(x) = 4 history + 4 current = 8 -> h = 2 * 8^(-1/3) = 1; d = (2-1)/(2*1) = 0.5 -> K = 0.5
    # V = (0.5 * (1+1+1+0) + 0) / (0.5 * 4 + 3) = 1.5 / 5 = 0.3 for every (zero-reward) sample
    out = est.estimate(t(0.0, 0.0, 0.0, 0.0), ["x"] * 4, 2)
    close(out.baselines, [0.3] * 4)
    # auto mode never prunes by weight (h moves with N(x)); only max_history bounds it
    est.estimate(t(0.0), ["x"], 1000)
    assert len(est.state_dict()["history"]["x"]) == 9


def test_kae_own_reward_never_in_own_baseline():
    def baselines(r0):
        est = get_estimator("kae", bandwidth=3.0)
        est.estimate(t(0.2, 0.9, 0.4), ["x", "y", "x"], 1)
        return est.estimate(t(r0, 0.5, 0.1), ["x", "x", "y"], 2).baselines

    low, high = baselines(0.0), baselines(1.0)
    assert low[0] == high[0]          # sample 0's baseline ignores its own reward
    assert low[1] != high[1]          # but its group-mate's baseline uses it
    assert low[2] == high[2]          # and another prompt's does not


def test_kae_fallback_counts():
    est = get_estimator("kae", bandwidth=2.0)
    # two G=1 prompts, no history: batch leave-one-out baselines 3 and 1
    out = est.estimate(t(1.0, 3.0), ["a", "b"], 1)
    close(out.baselines, [3.0, 1.0])
    close(out.advantages, [-2.0, 2.0])
    assert out.metrics["kae_fallback"] == 2.0
    # step 5: a's step-1 entry has lag 4 -> u = 2 -> K = 0: history too old, fallback again (N = 1 -> 0)
    out = est.estimate(t(2.0), ["a"], 5)
    close(out.baselines, [0.0])
    assert out.metrics["kae_fallback"] == 1.0


def test_kae_same_step_twice_counts_with_full_weight():
    est = get_estimator("kae")
    est.estimate(t(1.0), ["x"], 1)
    # lag clamped at 0 -> K(0) = 1: V = 1*1 / 1
    close(est.estimate(t(0.0), ["x"], 1).baselines, [1.0])


def test_kae_history_pruning():
    est = get_estimator("kae", bandwidth=2.0)  # triangular: weight 0 from lag 2 on
    est.estimate(t(1.0), ["x"], 1)
    est.estimate(t(0.5, 0.0), ["x", "y"], 2)
    est.estimate(t(0.0, 0.25), ["x", "y"], 3)
    # x's step-1 entry reached lag 2 (weight 0) at step 3 and was dropped
    assert est.state_dict()["history"] == {"x": [[2, 0.5], [3, 0.0]], "y": [[2, 0.0], [3, 0.25]]}
    # step 5, only z in the batch: x and y's newest entries (step 3) have lag 2 -> whole prompts forgotten
    out = est.estimate(t(1.0), ["z"], 5)
    assert est.state_dict()["history"] == {"z": [[5, 1.0]]}
    assert out.metrics["kae_history_size"] == 1.0

    # exponential kernel: K(1) = exp(-1) > 0 still counts; pruned only beyond u = 1
    est = get_estimator("kae", kernel="exponential", bandwidth=2.0)
    est.estimate(t(1.0), ["x"], 1)
    est.estimate(t(0.0), ["y"], 3)
    assert set(est.state_dict()["history"]) == {"x", "y"}
    est.estimate(t(0.0), ["y"], 4)
    assert set(est.state_dict()["history"]) == {"y"}


def test_kae_max_history():
    est = get_estimator("kae", bandwidth_mode="relative", max_history=3)
    for step in (1, 2):
        est.estimate(t(float(step), float(step) + 0.5), ["x", "x"], step)
    assert est.state_dict()["history"]["x"] == [[1, 1.5], [2, 2.0], [2, 2.5]]  # oldest dropped


def test_kae_batch_scale():
    est = get_estimator("kae", scale="batch")
    out = est.estimate(t(1.0, 0.0, 1.0, 1.0), ["x", "x", "y", "y"], 1)
    # unscaled: x -> (1, -1), y -> (0, 0); sample std of (1, -1, 0, 0) = sqrt(2/3)
    s = math.sqrt(2 / 3) + EPS
    close(out.advantages, [1 / s, -1 / s, 0.0, 0.0])
    close(out.baselines, [0.0, 1.0, 1.0, 1.0])  # baselines stay in reward units


def test_kae_state_dict_round_trip():
    est = get_estimator("kae", kernel="exponential", bandwidth=3.0)
    est.estimate(t(0.1, 0.7, 0.3), ["x", "y", "x"], 1)
    est.estimate(t(0.9, 0.2), ["y", "x"], 2)
    state = json.loads(json.dumps(est.state_dict()))
    assert state == est.state_dict()
    restored = get_estimator("kae", kernel="exponential", bandwidth=3.0)
    restored.load_state_dict(state)

    batch = (t(0.4, 0.6, 0.8), ["x", "y", "y"], 3)
    a, b = est.estimate(*batch), restored.estimate(*batch)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.baselines, b.baselines)
    assert a.metrics == b.metrics
    assert est.state_dict() == restored.state_dict()


def test_stateless_estimator_rejects_state():
    with pytest.raises(ValueError, match="stateless"):
        get_estimator("grpo").load_state_dict({"history": {}})


# ------------------------------------------------------------------------------- optimal_value


def test_optimal_value_by_hand():
    # beta = 1, r = (0, 1): log((e^0 + e^1) / 2) = log(1.859141) = 0.620115
    close(optimal_value(t(0.0, 1.0), 1.0), 0.620115, atol=1e-6)
    # beta = 0.5, r = (0, 0, 1, 1): 0.5 * log((2 + 2 e^2) / 4) = 0.5 * log(4.194528) = 0.716890
    close(optimal_value(t(0.0, 0.0, 1.0, 1.0), 0.5), 0.716890, atol=1e-6)
    # batch dims: V* over the last dim only
    v = optimal_value(t(0.0, 1.0, 0.0, 0.0, 1.0, 1.0).reshape(2, 3), 0.0)
    close(v, [1 / 3, 2 / 3])


def test_optimal_value_limits():
    r = t(0.0, 1.0, 0.5)
    close(optimal_value(r, 0.0), 0.5)                        # beta = 0 is defined as the mean
    # beta -> inf tends to the mean: mean + var_pop / (2 beta) = 0.5 + (1/6) / 2e4, in float32 too
    close(optimal_value(r, 1e4), 0.5 + 1 / 12e4, atol=1e-7)
    # beta -> 0+ tends to the max: 1 + beta * log(1/3 + tiny) = 1 - 1.1e-3 at beta = 1e-3
    close(optimal_value(r, 1e-3), 1.0 + 1e-3 * math.log(1 / 3), atol=1e-6)
    assert optimal_value(r, 1e-4) > optimal_value(r, 0.5) > r.mean()


def test_optimal_value_is_stable():
    # r / beta = 1e6 would overflow exp(); logsumexp keeps it exact
    close(optimal_value(t(1000.0, 1000.0), 1e-3), 1000.0)
    assert torch.isfinite(optimal_value(t(-1e4, 1e4), 1e-3))


@pytest.mark.parametrize("rewards, beta", [(t(1.0), -0.5), (t(1.0), float("nan")),
                                           (t(float("nan")), 0.5), (t(), 0.5)])
def test_optimal_value_bad_input(rewards, beta):
    with pytest.raises(ValueError):
        optimal_value(rewards, beta)
