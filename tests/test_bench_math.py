"""The benches' arithmetic on synthetic data with known answers: the value bench's baseline MSE
and its Monte Carlo noise floor, the grad bench's floor, and the train bench's time to target.

Expectations are exact, not sampled: Bernoulli outcomes are enumerated, each as often as its
probability says (with p = 1/4, an outcome with k ones and n - k zeros has weight 3^(n - k) / 4^n,
so it appears 3^(n - k) times among 4^n probes), and a mean over the probes is then an
expectation.
"""

import itertools
from pathlib import Path

import pytest
import torch

from frugalrl.advantages import get_estimator
from frugalrl.bench.grad import ORACLE, GradProbe
from frugalrl.bench.options import GradOptions, ValueOptions
from frugalrl.bench.probe import Group, Probe, Samples, mean
from frugalrl.bench.train import RATIOS, RunRecord, ratio, target_accuracy
from frugalrl.config import load_config

KAE_PRESET = str(Path(__file__).resolve().parent.parent / "configs" / "kae.yaml")


def outcomes(n: int, ones_weight: int = 1, zeros_weight: int = 3) -> list[tuple[int, ...]]:
    """Every 0/1 outcome of n draws, each repeated ones_weight^k * zeros_weight^(n - k) times
    (k its ones): the population of n Bernoulli(1/4) draws by default."""
    return [o for o in itertools.product((0, 1), repeat=n)
            for _ in range(ones_weight ** sum(o) * zeros_weight ** (n - sum(o)))]


def estimates(rewards: torch.Tensor, names: tuple[str, ...]) -> dict:
    """The named estimators' outputs for (P, G) rewards, prompts p0, p1, ..."""
    P, G = rewards.shape
    ids = [f"p{p}" for p in range(P) for _ in range(G)]
    return {name: get_estimator(name).estimate(rewards.flatten(), ids, 1) for name in names}


def value_probe(P: int, G: int, M: int) -> Probe:
    """A Probe of P prompts for a 10-step run with one checkpoint, measured by hand (``measure``)."""
    rows = [{"id": f"p{p}", "prompt": "", "answer": ""} for p in range(P)]
    opts = ValueOptions(probes=P, mc_samples=M, every=10, groups=[G], kae_preset=KAE_PRESET, kae_priors=[])
    return Probe(load_config(overrides=["max_steps=10"]), opts, None, rows, None, pool=256)


def test_group_mean_mse_is_sigma2_over_g_after_the_noise_floor():
    """Bernoulli(1/4) rewards, G = 2 samples and M = 3 Monte Carlo samples per probe, all 4^5
    joint outcomes as probes: the group mean's MSE is sigma^2 / G = (3/16) / 2 and the
    leave-one-out mean's sigma^2 / (G - 1), exactly, once the Monte Carlo variance is removed
    (the raw squared error holds sigma^2 / M = 1/16 more), and their ratio is (G - 1) / G."""
    G, M, sigma2 = 2, 3, 3 / 16
    joint = torch.tensor(outcomes(G + M), dtype=torch.float64)  # (1024, 5)
    group, mc = joint[:, :G], joint[:, G:]
    probe = value_probe(len(joint), G, M)
    probe.measure(10, None, Samples(mc, []), {G: Group(Samples(group, []), estimates(group, ("grpo", "rloo")))})
    (raw,) = probe.sq_err[("grpo", G)]
    assert raw.mean().item() == pytest.approx(sigma2 / G + sigma2 / M, rel=1e-12)
    assert probe.mse("grpo", G) == pytest.approx(sigma2 / G, rel=1e-12)
    assert probe.mse("rloo", G) == pytest.approx(sigma2 / (G - 1), rel=1e-12)
    assert probe.mse_ratio("grpo", "rloo", G).value == pytest.approx((G - 1) / G, rel=1e-12)


def test_value_noise_floor_by_hand():
    """Two probes, two checkpoints: per probe, the mean squared error over the checkpoints minus
    the mean of s^2 / M."""
    probe = value_probe(2, 2, 4)
    mcs = [[[1, 0, 1, 0], [1, 1, 1, 0]],   # V_MC 0.5, 0.75; s^2 / M = (1/3) / 4, (1/4) / 4
           [[0, 0, 0, 0], [1, 1, 1, 1]]]   # V_MC 0, 1; no variance
    groups = [[[1, 1], [0, 1]], [[1, 0], [1, 1]]]  # group means 1, 0.5; 0.5, 1
    for mc, group in zip(mcs, groups):
        rewards = torch.tensor(group, dtype=torch.float64)
        probe.measure(10, None, Samples(torch.tensor(mc, dtype=torch.float64), []),
                      {2: Group(Samples(rewards, []), estimates(rewards, ("grpo",)))})
    # errors per probe: checkpoint 1 (0.5, 0.5), (-0.25, -0.25); checkpoint 2 (0.5, 0.5), (0, 0)
    assert [e.tolist() for e in probe.sq_err[("grpo", 2)]] == [[0.25, 0.0625], [0.25, 0.0]]
    expected = [0.25 - (1 / 12) / 2, 0.0625 / 2 - (1 / 16) / 2]  # = [5/24, 0]
    assert probe.probe_mse("grpo", 2).tolist() == pytest.approx(expected)
    assert probe.mse("grpo", 2) == pytest.approx(5 / 48)


def grad_probe(P: int, G: int, scores: torch.Tensor) -> GradProbe:
    """A GradProbe whose per-sample scores grad log pi are the rows of ``scores`` (N, D)."""
    rows = [{"id": f"p{p}", "prompt": "", "answer": ""} for p in range(P)]
    opts = GradOptions(probes=P, every=10, groups=[G], kae_preset=KAE_PRESET)
    probe = GradProbe(load_config(overrides=["max_steps=10"]), opts, None, rows, None, pool=256)
    probe._grads = lambda model, samples, weights: weights @ scores  # in place of backward passes
    return probe


# two probes, two samples each; probe 0's scores lie along the first axis and probe 1's along the
# second, so the floor's cross term between probes, which its random signs cancel only on
# average, is 0 here: S_0 = (4, 0), S_1 = (0, 1)
SCORES = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
REWARDS = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)


def measure_grad_checkpoint(probe: GradProbe, v: list[float], var_v: list[float]) -> None:
    probe.values.append(torch.tensor(v, dtype=torch.float64))
    group = Group(Samples(REWARDS, []), estimates(REWARDS, ("grpo",)))
    probe._measure_group(None, 2, group, torch.tensor(var_v, dtype=torch.float64), torch.zeros(2))


def test_grad_noise_floor_by_hand():
    """N = 4: the floor is (1/N^2) sum_x c_x ||S_x||^2 and grpo's error ||(1/N) sum (V - b) s||^2."""
    probe = grad_probe(2, 2, SCORES)
    measure_grad_checkpoint(probe, [0.5, 0.75], [0.04, 0.09])
    floor = (0.04 * 16 + 0.09 * 1) / 16
    assert probe.mc_floor[2] == [pytest.approx(floor)]
    # V - b: probe 0 (0.5 - 0.5) = 0, probe 1 (0.75 - 1) = -0.25 -> (1/4)(-0.25)(0, 2 - 1) = (0, -1/16)
    assert probe.mc_err[("grpo", 2)] == [pytest.approx(1 / 256)]
    assert probe.baseline_err("grpo", 2) == [pytest.approx(1 / 256 - floor)]
    # g_MC itself: r - V_MC = 0.5, -0.5, 0.25, 0.25 -> (1/4) ((0.5 - 1.5, 0) + (0, 0.5 - 0.25)) = (-1/4, 1/16)
    assert probe.true_sq[(ORACLE, 2)] == [pytest.approx(1 / 16 + 1 / 256)]
    assert ORACLE not in {name for name, _ in probe.mc_err}


def test_grad_noise_floor_subtraction_is_exact_in_expectation():
    """V = 1/2 for both probes, V_MC from M = 2 samples each, over all 4 x 4 Monte Carlo outcomes
    (equally likely): the mean error less the mean floor is the error against V itself,
    ||(1/N) sum_i (V - b_i) s_i||^2 with grpo's group means b = 1/2, 1/2, 1, 1: (1/4) (0, -1 + 1/2)."""
    probe = grad_probe(2, 2, SCORES)
    for mc in itertools.product(outcomes(2, 1, 1), repeat=2):
        mc = torch.tensor(mc, dtype=torch.float64)  # (2 probes, M = 2)
        measure_grad_checkpoint(probe, mc.mean(dim=1).tolist(), (mc.var(dim=1) / 2).tolist())
    assert len(probe.mc_err[("grpo", 2)]) == 16
    assert mean(probe.baseline_err("grpo", 2)) == pytest.approx(1 / 64, rel=1e-12)


def record(curve: list[tuple[float, float]], seed: int = 0, stage1_s: float = 0.0) -> RunRecord:
    """A run whose evaluations read ``curve`` (wall seconds, accuracy), 256 samples apart."""
    return RunRecord("x", seed, [(wall, 256 * i, acc) for i, (wall, acc) in enumerate(curve)], train_s=40.0,
                     process_s=45.0, peak_rss_mb=100.0, tokens_generated=0, tokens_trained=0, eval_prompts=64,
                     stage1_s=stage1_s)


CURVE = [(0.0, 0.2), (10.0, 0.3), (20.0, 0.45), (30.0, 0.4), (40.0, 0.5)]


@pytest.mark.parametrize("target, expected", [
    (0.45, 20.0),   # a reading exactly at the target counts
    (0.42, 20.0),   # the first reading above it, not the last
    (0.48, 40.0),   # the dip at 30 s does not count
    (0.2, 0.0),     # the starting reading
    (0.51, None),   # never reached
])
def test_time_to_target_on_a_hand_built_curve(target, expected):
    assert record(CURVE).time_to(target) == expected


def test_time_to_target_with_stage_one_and_final():
    run = record(CURVE, stage1_s=5.0)
    assert run.time_to(0.42, with_stage1=True) == 25.0
    assert run.time_to(0.51, with_stage1=True) is None
    assert run.final == 0.5  # the last reading, not the best


def test_target_is_start_plus_a_fraction_of_the_target_runs_gain():
    # start: mean first reading of every run and seed (0.2, 0.2, 0.3) = 0.2333; grpo's mean final
    # (0.5 + 0.7) / 2 = 0.6; target = 0.2333 + 0.75 x (0.6 - 0.2333) = 0.5083
    records = {"grpo": [record([(0.0, 0.2), (9.0, 0.5)]), record([(0.0, 0.2), (9.0, 0.7)], 1)],
               "kae": [record([(0.0, 0.3), (9.0, 0.1)])]}
    start, target = target_accuracy(records, "grpo", 0.75)
    assert start == pytest.approx(0.7 / 3) and target == pytest.approx(0.7 / 3 + 0.75 * (0.6 - 0.7 / 3))


def test_time_to_target_ratio_over_seeds():
    """Mean over seeds / mean over seeds; stage 1 only in the ratio that says so; no ratio, and
    why, where a run is missing or a seed never reached the target."""
    dash = [record(CURVE, 0), record([(0.0, 0.2), (15.0, 0.5)], 1)]        # 20 s and 15 s to 0.42
    grpo = [record([(0.0, 0.2), (50.0, 0.45)], 0), record([(0.0, 0.2), (20.0, 0.6)], 1)]  # 50 s and 20 s
    estimate, why = ratio({"dash": dash, "grpo": grpo}, "time_to_target_ratio_dash_vs_grpo", 0.42)
    assert RATIOS["time_to_target_ratio_dash_vs_grpo"] == ("dash_vs_grpo", "time")
    assert estimate.value == pytest.approx((20.0 + 15.0) / (50.0 + 20.0)) and why == ""
    assert estimate.low <= estimate.value <= estimate.high and estimate.n == 2

    astar = [record(CURVE, 0, stage1_s=10.0), record(CURVE, 1, stage1_s=30.0)]  # 20 s each, + stage 1
    with_stage1, _ = ratio({"astar": astar, "ppo": grpo}, "time_ratio_astar_vs_ppo", 0.42)
    without, _ = ratio({"astar": astar, "ppo": grpo}, "time_ratio_astar_vs_ppo_no_stage1", 0.42)
    assert with_stage1.value == pytest.approx((30.0 + 50.0) / 70.0)
    assert without.value == pytest.approx(40.0 / 70.0)

    assert ratio({"dash": dash}, "time_to_target_ratio_dash_vs_grpo", 0.42) == (None, "grpo not run")
    estimate, why = ratio({"dash": dash, "grpo": grpo}, "time_to_target_ratio_dash_vs_grpo", 0.55)
    assert estimate is None and "dash (seeds 0, 1)" in why and "grpo (seeds 0)" in why
