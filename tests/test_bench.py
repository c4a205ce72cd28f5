"""Smoke tests of `frugalrl bench`: each bench at toy size on the tiny random model, through the CLI."""

import json
import math
import re
import subprocess
import time

import pytest

from frugalrl.cli import main


@pytest.fixture()
def toy_options(tmp_path, toy_run):
    """The toy run (conftest) with the bench's results in tmp_path."""
    return [*toy_run, f"bench.results_dir={tmp_path / 'results'}"]


def _summary(tmp_path) -> dict:
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert all(v is None or math.isfinite(v) for v in summary.values())
    return summary


@pytest.fixture()
def kae_preset(tmp_path):
    """A KAE preset that fits the toy pool: batches of 4 prompts, each kept 2 steps."""
    path = tmp_path / "kae-toy.yaml"
    path.write_text("algo: {estimator: kae, kae_bandwidth: 10.0}\ndata: {sticky_steps: 2}\n"
                    "rollout: {batch_prompts: 4, group_size: 2}\n")
    return f"bench.kae_preset={path}"


def _intervals(summary: dict, keys: list[str]) -> None:
    """Each key is a finite ratio with a finite 95 % interval: KEY_ci_low <= KEY_ci_high."""
    for key in keys:
        low, high = summary[f"{key}_ci_low"], summary[f"{key}_ci_high"]
        assert math.isfinite(summary[key]) and math.isfinite(low) and math.isfinite(high) and low <= high, key


def test_bench_value(tmp_path, toy_options, kae_preset, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text('{"other_bench": 1.0}')  # merged into, not replaced
    rc = main(["bench", "value", *toy_options, f"output_dir={tmp_path / 'run'}", "max_steps=4", "bench.every=2",
               "bench.probes=4", "bench.mc_samples=8", "bench.groups=[1,2,4]", "rollout.batch_prompts=4",
               "rollout.group_size=2", "train.micro_batch=16", "algo.vstar_n=4", kae_preset])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = _summary(tmp_path)
    assert summary["other_bench"] == 1.0
    keys = [f"value_mse_ratio_kae_vs_grpo_g{G}{suffix}" for G in (2, 4) for suffix in ("", "_every_step")]
    for key in keys:
        assert summary[key] == printed[key]
    _intervals(summary, keys)
    page = (tmp_path / "results" / "value.md").read_text()
    assert "frugalrl bench value" in page and "| G=1 | G=2 | G=4 |" in page
    for name in ("grpo", "rloo", "reinforce", "reinforce_pp", "kae", "kae_every_step"):
        assert f"| {name} (" in page
    assert "| grpo (group mean) | n/a |" in page  # no group baseline at G = 1
    assert "kae / grpo MSE ratio, KAE as its preset trains (95 % interval, probes resampled): G=2:" in page
    assert "best case for KAE" in page and "its own target" in page
    # the toy pool: 64 rows less a tenth held out (6), batches of 4 kept 2 steps: an epoch of 14 x 2 steps
    assert "batches of 4 prompts from the run's pool of 58, each for data.sticky_steps = 2 steps" in page
    assert "once an epoch, 28 steps" in page
    assert (tmp_path / "results" / "value.png").stat().st_size > 0


def test_schedule_visits_reads_the_training_sampler():
    from frugalrl.bench.probe import schedule_visits

    # 8 prompts in batches of 2 kept 2 steps: sampler steps 1-2, 3-4, 5-6, 7-8 hold four distinct
    # batches (one epoch). Probe 0 (offset 0) stands in at step 4 for a prompt of the batch of
    # steps 3-4: visits 3 and 4; probe 1 (offset 1) for one of the batch at sampler step 5, its
    # first: one visit, read back one step to run step 4.
    assert schedule_visits(8, 2, 2, 0, 2, [4]) == {3: [(0, 4)], 4: [(0, 4), (1, 4)]}


def test_schedule_visits_first_visits_and_sticky_history():
    from frugalrl.bench.probe import schedule_visits

    # a pool far larger than the run: a prompt's only visits are its sticky block's. 8 probes with
    # sticky_steps 4 sit at the block's 4 positions twice: 0, 1, 2 and 3 earlier visits (steps of
    # history) at a checkpoint, consecutive and ending at it
    visits = schedule_visits(10_000, 4, 4, 3, 8, [10, 20])
    for c in (10, 20):
        steps = {p: sorted(s for s, pairs in visits.items() if (p, c) in pairs) for p in range(8)}
        assert sorted(len(s) - 1 for s in steps.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
        assert all(s == list(range(c - len(s) + 1, c + 1)) for s in steps.values())
    assert all(c <= 20 for pairs in visits.values() for _, c in pairs) and max(visits) == 20


def test_schedule_visits_prompts_come_back_an_epoch_later():
    from frugalrl.bench.probe import schedule_visits

    # 4 prompts in batches of 2, no stickiness: each epoch (2 steps) visits every prompt once, so a
    # probe measured at step 5 was also visited once in steps 1-2 and once in steps 3-4
    steps = sorted(schedule_visits(4, 2, 1, 0, 1, [5]))
    assert len(steps) == 3 and steps[0] in (1, 2) and steps[1] in (3, 4) and steps[2] == 5


def _kae_preset_without_prior(tmp_path):
    """configs/kae.yaml with algo.kae_prior=none: KAE's own kernel arithmetic."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "configs" / "kae.yaml").read_text()
    assert "kae_prior: population" in text
    path = tmp_path / "kae-no-prior.yaml"
    path.write_text(text.replace("kae_prior: population", "kae_prior: none"))
    return str(path)


def test_kae_measured_as_its_preset_trains_on_bernoulli_rewards(tmp_path):
    """Rewards Bernoulli(1/4) (sigma^2 = 3/16) for every probe at every step, KAE as configs/kae.yaml
    trains without its prior (G = 2, batches kept 4 steps, triangular window of 10 steps). A baseline that weighs
    rewards w_j has MSE sigma^2 sum w^2 / (sum w)^2: the group mean's is sigma^2 / 2; KAE's, with
    the other sample (w = 1) and 0 to 3 earlier steps of 2 rewards each (w = 0.9, 0.8, 0.7), in
    equal shares, sigma^2 (1 + 2.62/7.84 + 3.9/19.36 + 4.88/33.64) / 4 = 0.420 sigma^2: a ratio of
    0.840; every probe at every step (lags 1 to 9 at checkpoints from step 10: sum w = 10,
    sum w^2 = 6.7), 0.067 sigma^2: 0.134."""
    import torch

    from frugalrl.bench.options import ValueOptions
    from frugalrl.bench.probe import Probe, Samples
    from frugalrl.config import load_config

    sigma2, P = 3 / 16, 128
    rows = [{"id": f"p{p}", "prompt": "", "answer": ""} for p in range(P)]
    opts = ValueOptions(probes=P, mc_samples=16, every=10, groups=[2], kae_preset=_kae_preset_without_prior(tmp_path),
                        kae_priors=[])
    probe = Probe(load_config(overrides=["max_steps=100"]), opts, None, rows, None, pool=20000)
    draws = torch.Generator().manual_seed(0)
    probe._sample = lambda model, rows, n: Samples(
        torch.bernoulli(torch.full((len(rows), n), 0.25, dtype=torch.float64), generator=draws), [])
    for step in range(1, 101):
        probe(step, None, None, None, None)
    assert len(probe.checkpoints) == 10
    assert probe.mse("grpo", 2) == pytest.approx(sigma2 / 2, rel=0.1)
    assert probe.mse("kae", 2) == pytest.approx(0.4202 * sigma2, rel=0.1)
    assert probe.mse("kae_every_step", 2) == pytest.approx(0.067 * sigma2, rel=0.15)
    for name, expected in (("kae", 0.840), ("kae_every_step", 0.134)):
        ratio = probe.mse_ratio(name, "grpo", 2)
        assert ratio.value == pytest.approx(expected, rel=0.15) and ratio.low < ratio.value < ratio.high
        assert ratio.n == P


def test_kae_prior_measured_on_a_beta_population(tmp_path):
    """Probes and training prompts with pass rates from Beta(1.2, 1.8) (mean 0.4, kappa 3), KAE as
    configs/kae.yaml schedules it at G = 2. A baseline weighing other rewards w_j and a prior
    pseudo-count kappa at the population mean has error [sum w^2 E p(1-p) + kappa^2 Var p] / (sum w +
    kappa)^2, with E p(1-p) = 0.18 and Var p = 0.06: over the 4 positions of a sticky block (the other
    sample, then 1 to 3 earlier steps of 2 rewards at w = 0.9, 0.8, 0.7) 0.0757 without the prior and
    0.0290 with it, a ratio of 0.38. The prior's kappa and mean come from the training rewards."""
    import math

    import numpy as np
    import torch

    from frugalrl.bench.options import ValueOptions
    from frugalrl.bench.probe import Probe, Samples
    from frugalrl.config import load_config

    P, rng = 128, np.random.default_rng(0)
    rate = dict(zip([f"p{p}" for p in range(P)], rng.beta(1.2, 1.8, P)))
    rows = [{"id": key, "prompt": "", "answer": ""} for key in rate]
    opts = ValueOptions(probes=P, mc_samples=16, every=10, groups=[2], kae_preset=_kae_preset_without_prior(tmp_path),
                        kae_priors=["population"])
    probe = Probe(load_config(overrides=["max_steps=100"]), opts, None, rows, None, pool=20000)
    draws = torch.Generator().manual_seed(0)
    probe._sample = lambda model, rows, n: Samples(torch.bernoulli(
        torch.tensor([[rate[r["id"]]] * n for r in rows], dtype=torch.float64), generator=draws), [])
    for step in range(1, 101):
        train = [{"id": f"t{step}-{j}"} for j in range(64) for _ in range(4)]
        rewards = torch.from_numpy(rng.binomial(1, np.repeat(rng.beta(1.2, 1.8, 64), 4)).astype(float))
        probe(step, None, train, None, rewards)
    assert probe.mse("kae", 2) == pytest.approx(0.0757, rel=0.15)
    assert probe.mse("kae_population", 2) == pytest.approx(0.0290, rel=0.2)
    assert abs(math.log(probe.rates.strength("population") / 3)) < 0.5


def test_schedule_visits_needs_a_pool_of_a_batch():
    from frugalrl.bench.probe import schedule_visits

    with pytest.raises(ValueError, match="batch_prompts=128 exceeds the 58"):
        schedule_visits(58, 128, 4, 0, 4, [10])


def test_bench_grad(tmp_path, toy_options, kae_preset, capsys):
    run = ["max_steps=4", "bench.every=2", "bench.probes=4", "bench.mc_samples=8", "bench.groups=[1,2,4]",
           "rollout.batch_prompts=4", "rollout.group_size=2", "train.micro_batch=16", "algo.vstar_n=4", kae_preset]
    for bench in ("value", "grad"):
        assert main(["bench", bench, *toy_options, f"output_dir={tmp_path / bench}", *run]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = _summary(tmp_path)
    keys = [f"{key}_g{G}" for key in ("grad_whole_mse_ratio_kae_vs_grpo", "grad_mse_ratio_kae_vs_grpo")
            for G in (2, 4)]
    # at the best step size only where GRPO's gradient is not 0 (the toy's groups are often all 0)
    keys += [key for G in (2, 4) for suffix in ("", "_every_step")
             if printed[key := f"grad_total_mse_ratio_kae_vs_grpo_g{G}{suffix}"] is not None]
    assert len(keys) > 5
    for key in keys:
        assert summary[key] == printed[key]
    _intervals(summary, keys)
    page = (tmp_path / "results" / "grad.md").read_text()
    assert "frugalrl bench grad" in page and "| G=1 | G=2 | G=4 |" in page
    for name in ("grpo", "rloo", "reinforce", "reinforce_pp", "kae", "kae_every_step", "grpo_scaled", "v_mc"):
        assert f"| {name} (" in page
    assert "| grpo (group mean) | n/a |" in page  # no group baseline at G = 1
    assert "kae / grpo, whole error at the best step size: G=" in page
    assert "kae / grpo, whole error E‖g − ∇J‖² at step size 1: G=2:" in page
    assert (tmp_path / "results" / "grad.png").stat().st_size > 0

    def cells(name, table):  # estimator `name`'s figures in the page's table 0 (whole error at the best
        # step size), 1 (whole error at step size 1), 2 (the baseline's part of it) or 3 (cross term)
        rows = [line for line in page.splitlines() if line.startswith(f"| {name} (")]
        return [float(c) for c in rows[table].strip("| ").split(" | ")[1:] if c != "n/a"]

    # GRPO's group-mean gradient is (G - 1)/G times RLOO's: the same error at the best step size
    assert cells("grpo", 0) and cells("grpo", 0) == pytest.approx(cells("rloo", 0), rel=1e-3)
    # the whole error is the sum of its parts: the baseline's, g_V's (the v_mc row) and the cross term
    for name in ("grpo", "kae"):
        for whole, part, cross, noise in zip(*(cells(name, t)[-2:] for t in (1, 2, 3)), cells("v_mc", 1)[-2:]):
            assert whole == pytest.approx(part + noise + cross, abs=1e-3 * max(map(abs, (part, noise, cross))))

    def steps(bench):  # the run's metrics, times left out
        lines = (tmp_path / bench / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in lines]

    assert steps("grad") == steps("value")  # the gradient work leaves the run, and so the probe samples, alike


def test_grad_whole_error_and_its_parts_by_hand():
    """Two checkpoints of made-up dot products: the whole error ||g||^2 - 2 g . grad J + ||grad J||^2
    (for v_mc, less the floor), the baseline's part ||g - g_MC||^2 - floor, the cross term what is
    left, and the kae / grpo ratios with an interval over the checkpoints."""
    from pathlib import Path

    from frugalrl.bench.grad import ORACLE, GradProbe, measure_ratio
    from frugalrl.bench.options import GradOptions
    from frugalrl.config import load_config

    opts = GradOptions(probes=2, every=10, groups=[2],
                       kae_preset=str(Path(__file__).resolve().parents[1] / "configs" / "kae.yaml"))
    probe = GradProbe(load_config(overrides=["max_steps=20"]), opts, None, [{"id": "a"}, {"id": "b"}], None, pool=256)
    probe.checkpoints = [(10, 0.5), (20, 0.5)]
    probe.true_norm, probe.mc_floor[2] = [2.0, 4.0], [0.1, 0.3]
    # name: ||g||^2, g . grad J, ||g - g_MC||^2 per checkpoint
    for name, sq, dot, err in (("kae", [3.0, 5.0], [1.0, 2.0], [0.5, 0.7]),
                               ("grpo", [6.0, 8.0], [1.5, 2.5], [1.1, 1.3]),
                               (ORACLE, [2.5, 4.5], [1.0, 2.0], None)):
        probe.true_sq[(name, 2)], probe.true_dot[(name, 2)] = sq, dot
        if err:
            probe.mc_err[(name, 2)] = err
    assert probe.whole("kae", 2) == pytest.approx([3.0, 5.0])  # 3 - 2 + 2, 5 - 4 + 4
    assert probe.whole("grpo", 2) == pytest.approx([5.0, 7.0])
    assert probe.whole(ORACLE, 2) == pytest.approx([2.4, 4.2])  # 2.5 - 0.1 - 2 + 2, 4.5 - 0.3 - 4 + 4
    assert probe.baseline_err("kae", 2) == pytest.approx([0.4, 0.4])
    assert probe.cross("kae", 2) == pytest.approx([0.2, 0.4])  # 3 - 0.4 - 2.4, 5 - 0.4 - 4.2
    assert probe.cross("grpo", 2) == pytest.approx([1.6, 1.8])
    assert probe.cross(ORACLE, 2) is None and probe.whole("rloo", 2) is None
    assert probe.relative(probe.whole("kae", 2)) == pytest.approx(4 / 3)  # mean 4 over mean ||grad J||^2 3
    whole = measure_ratio(probe, "whole", "kae", "grpo", 2)
    assert whole.value == pytest.approx(4 / 6) and whole.n == 2 and whole.low <= whole.high
    assert measure_ratio(probe, "baseline_err", "kae", "grpo", 2).value == pytest.approx(0.4)
    # best step size: 1 - 1.5^2 / (4 x 3) = 0.8125 for kae, 1 - 2^2 / (7 x 3) = 17/21 for grpo
    best = measure_ratio(probe, "true_relative", "kae", "grpo", 2)
    assert best.value == pytest.approx(0.8125 / (17 / 21)) and best.n == 2 and best.low <= best.high
    probe.true_norm = [-1.0, -1.0]  # no estimate of ||grad J||^2: no relative figure, no best step size
    assert probe.relative(probe.whole("kae", 2)) is None
    assert measure_ratio(probe, "true_relative", "kae", "grpo", 2) is None


def test_score_gradients_weights_per_sample_scores(tiny_model_dir, tokenizer):
    import torch
    from transformers import LlamaForCausalLM

    from frugalrl.bench.grad import score_gradients
    from frugalrl.rollout import generate, token_logprobs

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, ["12=", "12="], max_new_tokens=5, temperature=0.7)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # what the optimizer step left there: the probe must not touch it
        p.grad = torch.ones_like(p)
    scores = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        token_logprobs(model, rollout.select([i]).trimmed(), 0.7).sum(), params)]) for i in range(2)])
    # rewards (1, 0) of one prompt with V_MC = 0.25: the error weights V_MC - b of a leave-one-out
    # baseline (b = (0, 1)), and of V_MC itself as baseline (0: no error)
    weights = torch.tensor([[0.25, -0.75], [0.0, 0.0]], dtype=torch.float64)
    expected = torch.stack([0.25 * scores[0] - 0.75 * scores[1], torch.zeros_like(scores[0])])
    split = score_gradients(model, [rollout.select([0]), rollout.select([1])], weights, 0.7, micro_batch=1)
    whole = score_gradients(model, [rollout], weights, 0.7, micro_batch=2)
    for got in (split, whole):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert expected[0].abs().max() > 0
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


def test_bench_rollout(tmp_path, toy_options, capsys):
    from datetime import datetime, timezone

    t0 = time.perf_counter()
    rc = main(["bench", "rollout", *toy_options, "bench.batches=[4,8]", "bench.rounds=1", "bench.new_tokens=6",
               "bench.matmul_size=64"])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    # under the command: the commit, the date and the bench's wall time, which `frugalrl bench` measured
    line = (tmp_path / "results" / "rollout.md").read_text().split("```\n\n")[1].splitlines()[0]
    found = re.fullmatch(r"Commit (unknown|[0-9a-f]{7,}(?: \(with uncommitted changes\))?); finished "
                         r"(\d{4}-\d\d-\d\d) \d\d:\d\d UTC; bench wall time (\d+) s\.", line)
    assert found, line
    assert found[2] == datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert int(found[3]) <= elapsed + 0.5
    summary = _summary(tmp_path)
    for key in ("rollout_fastgen_vs_hf", "rollout_fraction_of_ceiling", "rollout_fastgen_tok_s_b4",
                "rollout_hf_tok_s_b8", "rollout_train_tok_s"):
        assert summary[key] > 0
    assert 0 < summary["rollout_train_fraction_of_ceiling"] < 1.5  # of a ceiling measured in the same run
    page = (tmp_path / "results" / "rollout.md").read_text()
    assert "frugalrl bench rollout" in page and "| 4 |" in page and "| 8 |" in page
    assert "Training (the 8 prompts with their completions" in page
    assert (tmp_path / "results" / "rollout.png").stat().st_size > 0

    # a labelled page beside it: its own file and LABEL_ keys; the unlabelled keys stay as they were
    # (and groups of 2: each distinct prompt prefilled once, and the work counts those prompt tokens)
    assert main(["bench", "rollout", *toy_options, "bench.batches=[4]", "bench.rounds=1", "bench.new_tokens=6",
                 "bench.matmul_size=64", "bench.label=real", "bench.group_size=2"]) == 0
    labelled = _summary(tmp_path)
    assert labelled["real_rollout_ceiling_fraction"] > 0 and labelled["real_train_ceiling_fraction"] > 0
    page = (tmp_path / "results" / "rollout-real.md").read_text()
    prefilled = int(re.search(r"counting the ([\d,]+) prompt tokens", page)[1].replace(",", ""))
    assert "B / 2 distinct prompts, each 2 times" in page and 2 <= prefilled <= 2 * 20  # 2 prompts, not 4
    assert labelled["real_work_ceiling_fraction"] == pytest.approx(
        labelled["real_rollout_ceiling_fraction"] * (1 + prefilled / (4 * 6)))
    assert labelled["rollout_hf_tok_s_b8"] == summary["rollout_hf_tok_s_b8"]
    assert (tmp_path / "results" / "rollout-real.md").is_file() and (tmp_path / "results" / "rollout-real.png").is_file()


def test_bench_profile(tmp_path, toy_options):
    from frugalrl.profiling import PHASES

    assert main(["bench", "profile", *toy_options, f"output_dir={tmp_path / 'run'}", "rollout.batch_prompts=4",
                 "bench.skip=1", "bench.steps=2", "bench.top=5", "bench.label=toy"]) == 0
    summary = _summary(tmp_path)
    shares = {name: summary[f"profile_toy_{name}_share"] for name in (*PHASES, "other")}
    # the toy's rewards vary within groups: every phase of the step ran, and none outside the step
    assert all(shares[name] > 0 for name in ("generate", "reward", "forward", "backward", "optimizer")), shares
    assert all(share >= 0 for share in shares.values()) and sum(shares.values()) == pytest.approx(1.0)
    assert summary["profile_toy_step_s"] > 0
    page = (tmp_path / "results" / "profile-toy.md").read_text()
    assert "| backward |" in page and "`aten::" in page and "Steps 2-3 of a run" in page
    assert main(["bench", "profile", *toy_options, "bench.label=Bad-Label"]) == 2


def test_bench_peer(tmp_path, toy_options):
    """TRL for real, with its defaults (bench.trl=same is built by test_peer_trl_settings_* and
    trained by the budget bench's DASH-vs-TRL runs): an optimizer step every 8 completions (2 per
    rollout batch of 16), seconds per rollout batch, accuracy curves on both sides, equal samples,
    the label's page and keys; then bench.resume reuses both runs."""
    # no skip without trl: `make test` installs the bench extra, and this is the test that TRL really trains
    from frugalrl.config import load_config

    options = [*toy_options, f"output_dir={tmp_path / 'runs'}", "bench.steps=2", "bench.warmup=1", "bench.rounds=1",
               "seed=5", "rollout.batch_prompts=8", "rollout.group_size=2", "algo.estimator=rloo",
               "bench.trl=defaults", "bench.eval_every=1", "bench.label=toy", "data.eval_size=8"]
    assert main(["bench", "peer", *options]) == 0
    summary = _summary(tmp_path)
    for key in ("toy_step_time_ratio_vs_trl", "toy_peak_rss_ratio_vs_trl", "toy_peer_trl_s_per_step"):
        assert summary[key] > 0
        assert summary[f"{key}_ci_low"] is None and summary[f"{key}_ci_high"] is None  # one round: no interval
    assert summary["toy_peer_completions"] == 32  # 2 steps x 8 prompts x G=2
    page = (tmp_path / "results" / "peer-toy.md").read_text()
    # read back from TRL's GRPOConfig: its own defaults, steps_per_generation what it derived (16 / 8)
    assert "`steps_per_generation=2`" in page and "`max_steps=4`" in page and "`learning_rate=1e-06`" in page
    assert "`loss_type='dapo'`" in page and "`generation_batch_size=16`" in page
    for side in ("frugalrl", "TRL GRPOTrainer"):
        row = next(line for line in page.splitlines() if line.startswith(f"| {side} |"))
        assert row.split(" | ")[3] == "32"  # completions: equal samples on both sides
    assert "| 1 | 5 | 5 |" in page  # round 1's seeds: frugalrl's config, TRL's GRPOConfig
    assert load_config(str(tmp_path / "runs" / "frugalrl-1" / "peer-config.yaml")).seed == 5
    for side in ("frugalrl", "trl"):
        result = json.loads((tmp_path / "runs" / f"{side}-1" / "peer-result.json").read_text())
        assert [point[1] for point in result["curve"]] == [0, 16, 32]  # before, after each rollout batch
        assert len(result["step_end_s"]) == (2 if side == "frugalrl" else 4)
        assert (tmp_path / "runs" / f"{side}-1" / "model" / "config.json").is_file()
    assert (tmp_path / "results" / "peer-toy.png").stat().st_size > 0
    assert (tmp_path / "results" / "peer-toy-curves.png").stat().st_size > 0
    stamps = {side: (tmp_path / "runs" / f"{side}-1" / "peer.log").stat().st_mtime for side in ("frugalrl", "trl")}
    assert main(["bench", "peer", *options, "bench.resume=true"]) == 0
    assert stamps == {side: (tmp_path / "runs" / f"{side}-1" / "peer.log").stat().st_mtime for side in stamps}


def test_peer_rounds_take_seeds_and_give_error_bars(tmp_path, toy_options, monkeypatch):
    """Two rounds of made-up runs: seeds 5 and 6 on both sides, one data split, and the page's
    figures are the hand-computed means, ratios and intervals of their numbers."""
    from frugalrl.bench import peer

    # (side, seed) -> (s/step, peak RSS MB, accuracy)
    made_up = {("frugalrl", 5): (1.0, 100.0, 0.5), ("trl", 5): (4.0, 200.0, 0.4),
               ("frugalrl", 6): (3.0, 100.0, 0.7), ("trl", 6): (4.0, 200.0, 0.4)}
    calls = []

    def fake_run(side, cfg, run_dir, warmup, task, trl, resume):
        calls.append((side, cfg.seed, cfg.data.seed))
        s_per_step, rss, accuracy = made_up[side, cfg.seed]
        settings = {"seed": cfg.seed, "epsilon": 0.2} if side == "trl" else {}
        return peer.Run(cfg.seed, s_per_step, rss, 16, accuracy, 0.1, 0.2, settings, [])

    monkeypatch.setattr(peer, "_run", fake_run)
    assert main(["bench", "peer", *toy_options, f"output_dir={tmp_path / 'runs'}", "bench.steps=2",
                 "bench.warmup=1", "bench.rounds=2", "seed=5"]) == 0
    assert calls == [("frugalrl", 5, 5), ("trl", 5, 5), ("frugalrl", 6, 5), ("trl", 6, 5)]
    summary = _summary(tmp_path)
    # s/step: mean 2 / mean 4; resampling the two paired rounds gives 1/4, 2/4 (mixed) or 3/4
    assert summary["step_time_ratio_ours_vs_trl"] == pytest.approx(0.5)
    assert (summary["step_time_ratio_ours_vs_trl_ci_low"], summary["step_time_ratio_ours_vs_trl_ci_high"]) == \
        pytest.approx((0.25, 0.75))
    assert summary["peak_rss_ratio_ours_vs_trl"] == pytest.approx(0.5)
    # accuracy: 0.6 ± t95(1) 12.706 x sd 0.1414 / sqrt(2) = 0.6 ± 1.2706; TRL's two equal rounds: no spread
    assert (summary["peer_ours_accuracy"], summary["peer_ours_accuracy_ci_low"],
            summary["peer_ours_accuracy_ci_high"]) == pytest.approx((0.6, -0.6706, 1.8706))
    assert (summary["peer_trl_accuracy_ci_low"], summary["peer_trl_accuracy_ci_high"]) == pytest.approx((0.4, 0.4))
    # per-round differences 0.1 and 0.3
    assert (summary["peer_accuracy_gap_ours_minus_trl"], summary["peer_accuracy_gap_ours_minus_trl_ci_low"],
            summary["peer_accuracy_gap_ours_minus_trl_ci_high"]) == pytest.approx((0.2, -1.0706, 1.4706))
    page = (tmp_path / "results" / "peer.md").read_text()
    assert "| 1 | 5 | 5 | 1.000 | 4.000 |" in page and "| 2 | 6 | 6 | 3.000 | 4.000 |" in page
    assert "seconds per step **0.5 [0.25, 0.75]**" in page and "`epsilon=0.2`" in page


def test_peer_time_to_target_against_trl_defaults(tmp_path, toy_options, monkeypatch):
    """bench.trl=defaults with accuracy curves: the time to 0.95 x TRL's mean final accuracy on
    each curve, read between readings, and frugalrl's over TRL's under the label's keys."""
    from frugalrl.bench import peer

    # (side, seed) -> curve of (training s, completions, accuracy); TRL's finals 0.4 and 0.6: target 0.475
    curves = {("frugalrl", 0): [(0.0, 0, 0.2), (10.0, 8, 0.5), (20.0, 16, 0.6)],
              ("trl", 0): [(0.0, 0, 0.2), (40.0, 8, 0.3), (80.0, 16, 0.4)],
              ("frugalrl", 1): [(0.0, 0, 0.2), (10.0, 8, 0.3), (20.0, 16, 0.7)],
              ("trl", 1): [(0.0, 0, 0.2), (40.0, 8, 0.6), (80.0, 16, 0.6)]}
    modes = []

    def fake_run(side, cfg, run_dir, warmup, task, trl, resume):
        modes.append((trl, resume, cfg.eval_every, cfg.max_wall_s))
        curve = curves[side, cfg.seed]
        settings = {"seed": cfg.seed, "learning_rate": 1e-6} if side == "trl" else {}
        return peer.Run(cfg.seed, 1.0, 100.0 if side == "frugalrl" else 400.0, 16, curve[-1][2], 0.1, 0.2, settings,
                        curve)

    monkeypatch.setattr(peer, "_run", fake_run)
    # rloo: TRL runs its own defaults, so no refusal of what it cannot reproduce
    assert main(["bench", "peer", *toy_options, f"output_dir={tmp_path / 'runs'}", "bench.steps=2", "bench.warmup=1",
                 "bench.rounds=2", "seed=0", "algo.estimator=rloo", "max_wall_s=60", "bench.trl=defaults",
                 "bench.eval_every=1", "bench.label=toy", "bench.resume=true"]) == 0
    assert set(modes) == {("defaults", True, 1, 0.0)}
    summary = _summary(tmp_path)
    # TRL at 0.475: round 0 never gets there (final 0.4), so no ratio, and the page says why
    assert summary["toy_time_to_target_ratio_vs_trl"] is None
    page = (tmp_path / "results" / "peer-toy.md").read_text()
    assert "TRL GRPOTrainer in 1 of 2 rounds" in page and "`learning_rate=1e-06`" in page
    assert summary["toy_peak_rss_ratio_vs_trl"] == pytest.approx(0.25)
    assert (tmp_path / "results" / "peer-toy-curves.png").stat().st_size > 0
    # TRL's finals 0.4 and 0.4 (round 1's curve lowered): target 0.38; frugalrl 0 -> 10 s at 0.2 -> 0.5 crosses
    # at 6 s in round 0 and 0.2 -> 0.3 -> 0.7 at 12 s in round 1; TRL 0.3 -> 0.4 crosses at 72 s, 0.2 -> 0.4 at 76 s
    curves["trl", 1] = [(0.0, 0, 0.2), (40.0, 8, 0.2), (80.0, 16, 0.4)]
    assert main(["bench", "peer", *toy_options, f"output_dir={tmp_path / 'runs'}", "bench.steps=2", "bench.warmup=1",
                 "bench.rounds=2", "seed=0", "algo.estimator=rloo", "bench.trl=defaults", "bench.eval_every=1",
                 "bench.label=toy"]) == 0
    summary = _summary(tmp_path)
    assert summary["toy_time_to_target_ratio_vs_trl"] == pytest.approx(18 / 148)
    assert "(target <= 0.2)" in (tmp_path / "results" / "peer-toy.md").read_text()


def test_peer_trl_defaults_keep_grpo_config_but_for_the_budget():
    from frugalrl.bench import configure
    from frugalrl.bench.peer import _trl_args

    _, cfg, _ = configure("peer", None, ["rollout.batch_prompts=8", "rollout.group_size=4", "rollout.max_new_tokens=12",
                                         "train.lr=0.001", "max_steps=3"])
    args = _trl_args(cfg, "defaults")
    assert (args.num_generations, args.generation_batch_size, args.max_completion_length) == (4, 32, 12)
    assert args.learning_rate == 1e-6 and args.loss_type == "dapo" and args.temperature == 1.0  # TRL's own
    # 32 completions per rollout batch, an optimizer step every 8: 4 per batch, 3 batches
    assert args.per_device_train_batch_size == 8 and args.steps_per_generation == 4 and args.max_steps == 12
    assert not args.bf16


def test_peer_trl_settings_come_from_the_grpo_config():
    from frugalrl.bench import configure
    from frugalrl.bench.peer import _trl_args, trl_settings, trl_settings_line

    _, cfg, _ = configure("peer", None, ["rollout.batch_prompts=4", "rollout.group_size=2", "train.micro_batch=4",
                                         "train.lr=0.001"])
    args = _trl_args(cfg)
    args.epsilon, args.top_k = 0.3, 5  # what the trainer runs with, whatever frugalrl's config says
    line = trl_settings_line(trl_settings(args))
    assert "`epsilon=0.3`" in line and "`top_k=5`" in line and "`learning_rate=0.001`" in line
    assert "`lr_scheduler_type='cosine'`" in line and "`gradient_accumulation_steps=2`" in line
    assert "`loss_type='grpo'`" in line and "`scale_rewards='group'`" in line  # frugalrl's grpo, in TRL's terms
    assert "seed" not in line  # per round, in its own table


def test_bench_peer_refuses_what_trl_cannot_run(capsys):
    assert main(["bench", "peer", "algo.estimator=rloo", "train.ppo_epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "algo.estimator=rloo" in err and "train.ppo_epochs=2" in err


def test_bench_rejects_unknown_bench_option(capsys):
    assert main(["bench", "value", "bench.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_bench_train(tmp_path, toy_options, capsys):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    # grpo: 8 prompts x G=4 = 32 completions a step; astar: 8 x G=1
    rc = main(["bench", "train", *toy_options, f"output_dir={tmp_path / 'runs'}", "rollout.batch_prompts=8",
               "bench.runs=[grpo,astar]", "bench.seeds=[0,1]", "bench.samples=64", "bench.target_run=grpo",
               "bench.eval_every_samples=32", f"bench.configs_dir={configs}", "algo.vstar_prompts=16",
               "algo.vstar_n=2"])
    assert rc == 0
    summary = _summary(tmp_path)
    rss = summary["peak_rss_ratio_astar_vs_grpo"]
    assert 0 < summary["peak_rss_ratio_astar_vs_grpo_ci_low"] <= rss <= summary["peak_rss_ratio_astar_vs_grpo_ci_high"]
    # written even where a side was not run (null, with its interval), so no stale number survives
    for key in ("time_to_target_ratio_dash_vs_grpo", "time_ratio_astar_vs_ppo", "final_accuracy_ratio_dash_vs_grpo",
                "train_time_ratio_kae_g2_vs_grpo_g8"):
        assert summary[key] is None and summary[f"{key}_ci_low"] is None and summary[f"{key}_ci_high"] is None
    for key in ("time_ratio_astar_vs_grpo", "final_accuracy_ratio_astar_vs_grpo", "train_time_ratio_astar_vs_grpo"):
        assert {key, f"{key}_ci_low", f"{key}_ci_high"} <= summary.keys()
    page = (tmp_path / "results" / "train.md").read_text()
    assert "frugalrl bench train" in page
    # steps x completions, accuracy read every N steps
    assert "| grpo | grpo | 2 x 32 | 1 |" in page and "| astar | astar | 8 x 8 | 4 |" in page
    assert f"| A*-PO / GRPO, peak RSS | {rss:.3g} [" in page
    assert "| A*-PO / PPO, time to target, stage 1 included | n/a: ppo not run |" in page
    assert ("- A*-PO / GRPO (`astar` vs `grpo`): `rollout.temperature` 1.0 vs 0.7; `training prompts` the first 16 "
            "vs all") in page
    assert "64 sampled completions" in page and "32 samples" in page  # stage 1: 16 prompts x 2
    assert "on 6 prompts" in page  # a tenth of the toy file is held out
    for label, steps in (("grpo", [32, 64]), ("astar", [8 * i for i in range(1, 9)])):
        metrics = (tmp_path / "runs" / f"{label}-seed1" / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in metrics]
        assert [r["samples"] for r in rows if "reward_mean" in r] == steps
        assert [r["samples"] for r in rows if "eval_accuracy" in r] == [0, 32, 64]  # read at equal samples
    assert (tmp_path / "runs" / "astar-seed0" / "vstar.json").is_file()
    assert (tmp_path / "results" / "train.png").stat().st_size > 0


def test_bench_train_needs_whole_steps(tmp_path, toy_options, capsys):
    """An interval that is not a whole number of some run's steps, or a target run that is not run, stops
    the bench before any run, naming it."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["bench", "train", *toy_options, f"output_dir={tmp_path / 'runs'}", "rollout.batch_prompts=8",
                 "bench.runs=[ppo,grpo]", "bench.target_run=grpo", "bench.samples=64", "bench.eval_every_samples=48",
                 f"bench.configs_dir={configs}"]) == 2
    assert "bench.eval_every_samples=48 is not a whole number of steps of run grpo" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["bench", "train", *toy_options, f"output_dir={tmp_path / 'runs'}", "bench.runs=[ppo]",
                 "bench.target_run=grpo_g8", f"bench.configs_dir={configs}"]) == 2
    assert "bench.target_run=grpo_g8 is not among bench.runs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_bench_train_ratios_on_hand_built_runs():
    """Paired ratios of means over seeds, their bootstrap interval, stage 1, and why a ratio is n/a."""
    from frugalrl.bench.train import RunRecord, ratio

    def runs(label, curves, stage1_s=0.0):  # curves: (wall_s, accuracy) readings of each seed
        return [RunRecord(label, seed, [(w, 0, a) for w, a in curve], train_s=100.0 * (seed + 1), process_s=0.0,
                          peak_rss_mb=500.0, tokens_generated=0, tokens_trained=0, eval_prompts=4, stage1_s=stage1_s)
                for seed, curve in enumerate(curves)]

    records = {"astar": runs("astar", [[(0, 0.2), (10, 0.5), (20, 0.6)], [(0, 0.2), (30, 0.55)]], stage1_s=5.0),
               "ppo": runs("ppo", [[(0, 0.2), (20, 0.5)], [(0, 0.2), (25, 0.4), (40, 0.6)]])}
    # target 0.5: astar at 10 s and 30 s, ppo at 20 s and 40 s
    est, why = ratio(records, "time_ratio_astar_vs_ppo_no_stage1", 0.5)
    assert why == "" and est.value == pytest.approx(40 / 60) and est.n == 2
    # resampled seed pairs: (0, 0) gives 10/20, (1, 1) gives 30/40, each about a quarter of the resamples
    assert (est.low, est.high) == (pytest.approx(0.5), pytest.approx(0.75))
    assert ratio(records, "time_ratio_astar_vs_ppo", 0.5)[0].value == pytest.approx((15 + 35) / 60)
    assert ratio(records, "final_accuracy_ratio_astar_vs_ppo", 0.5)[0].value == pytest.approx(1.15 / 1.1)
    assert ratio(records, "train_time_ratio_astar_vs_ppo", 0.5)[0].value == pytest.approx(1.0)
    # astar's seed 1 peaks at 0.55, ppo's seed 0 at 0.5
    assert ratio(records, "time_ratio_astar_vs_ppo", 0.58) == (None, "target not reached by astar (seeds 1) and "
                                                                     "ppo (seeds 0)")
    assert ratio(records, "time_ratio_astar_vs_grpo", 0.5) == (None, "grpo not run")
    # at or below the start, every run reaches the target at 0 s
    assert ratio(records, "time_ratio_astar_vs_ppo_no_stage1", 0.2) == (None, "ppo was at the target before "
                                                                            "training in every seed")


def test_run_child_reports_the_child_peak_not_the_parent(tmp_path):
    """A child smaller than this process reads as small (ru_maxrss would start from our RSS)."""
    from frugalrl.bench.report import run_child

    ballast = b"\x01" * (600 * 2**20)  # 600 MB, written: this process's RSS is now above it
    seconds, peak = run_child("platform", [], tmp_path / "platform.log")
    assert ballast[-1] == 1 and seconds > 0
    assert 1 < peak < 300, peak
    with pytest.raises(RuntimeError, match="failed with exit code 2"):
        run_child("frugalrl.cli", ["no-such-command"], tmp_path / "bad.log")


def test_source_commit_names_the_checkout_and_its_changes(tmp_path, monkeypatch):
    from frugalrl.bench import report

    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    code, page = repo / "report.py", repo / "results" / "page.md"
    code.write_text("a\n")
    page.write_text("old\n")
    monkeypatch.setattr(report, "__file__", str(code))  # as if frugalrl ran from this checkout

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    assert report.source_commit() == "unknown"  # report.py not tracked: not frugalrl's checkout
    git("add", ".")
    git("commit", "-q", "-m", "start")
    head = git("rev-parse", "--short", "HEAD")
    assert report.source_commit() == head
    page.write_text("new\n")  # a bench rewrote its page: not a change of the code
    assert report.source_commit(repo / "results") == head
    assert report.source_commit() == f"{head} (with uncommitted changes)"
    code.write_text("b\n")
    assert report.source_commit(repo / "results") == f"{head} (with uncommitted changes)"
    (repo / "new.py").write_text("")  # untracked files do not count
    git("checkout", "-q", "--", "report.py")
    assert report.source_commit(repo / "results") == head
    monkeypatch.setattr(report, "__file__", str(tmp_path / "report.py"))
    assert report.source_commit() == "unknown"  # outside a git checkout


def test_budget_reads_crossings_between_readings():
    from frugalrl.bench.stats import crossing

    curve = [(0.0, 0, 0.1), (10.0, 100, 0.3), (20.0, 200, 0.5)]
    assert crossing(curve, 0.4, 0) == pytest.approx(15.0) and crossing(curve, 0.4, 1) == pytest.approx(150.0)
    assert crossing(curve, 0.3, 1) == 100 and crossing(curve, 0.05, 0) == 0.0  # at a reading; before training
    assert crossing(curve, 0.6, 0) is None


def test_budget_reads_steps_to_target_from_the_samples_each_step_generated():
    from frugalrl.bench.budget import steps_to
    from frugalrl.bench.train import RunRecord

    # dynamic sampling: steps generate 64, 96 and 64 completions; readings after steps 1, 2 and 3
    rows = [{"step": 1, "samples": 64}, {"step": 2, "samples": 160}, {"step": 3, "samples": 224}]
    run = RunRecord("dynamic", 0, [(0.0, 0, 0.1), (1.0, 64, 0.2), (2.0, 160, 0.4), (3.0, 224, 0.5)], 3.0, 4.0, 0,
                    0, 0, 0)
    assert steps_to(run, rows, 0.3) == pytest.approx(1.5) and steps_to(run, rows, 0.5) == 3
    assert steps_to(run, rows, 0.05) == 0 and steps_to(run, rows, 0.6) is None


def test_bench_budget(tmp_path, toy_options):
    from itertools import accumulate
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    rc = main(["bench", "budget", *toy_options, f"output_dir={tmp_path / 'runs'}", "rollout.batch_prompts=8",
               "bench.tasks=[embedded]", "bench.runs=[uniform,dynamic,budget_cross]", "bench.seeds=[0,1]",
               "bench.steps=3", "bench.eval_every=1", "bench.pool=64", f"bench.configs_dir={configs}",
               "rollout.candidates=12", "rollout.prior_neighbors=4", "bench.dash_samples=64",
               "bench.dash_eval_every_samples=32", "bench.dash_seeds=[0]"])
    assert rc == 0
    summary = _summary(tmp_path)
    # every key written, null where the run is missing or the target was met before training
    for key in ("budget_cross_time_to_target_ratio_vs_rloo", "dynamic_samples_to_target_ratio_vs_rloo",
                "budget_time_to_target_ratio_vs_rloo", "prior_brier_ratio_cross_prompt_vs_population",
                "all_equal_calibration_gap", "dynamic_steps_to_target_ratio_vs_rloo"):
        assert {key, f"{key}_ci_low", f"{key}_ci_high"} <= summary.keys()
    assert summary["budget_time_to_target_ratio_vs_rloo"] is None  # budget not run
    assert summary["prior_brier_ratio_cross_prompt_vs_population"] > 0
    assert 0 <= summary["all_equal_calibration_gap"] <= 1
    page = (tmp_path / "results" / "budget.md").read_text()
    assert "frugalrl bench budget" in page and "3 steps of 32 trained completions" in page
    assert "95 % half-width" in page and "What it took: 2 seeds" in page
    assert (tmp_path / "results" / "budget-embedded-calibration.png").stat().st_size > 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "embedded" / "dynamic-seed1" / "metrics.jsonl")
            .read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    # dynamic sampling counts every round's completions
    assert [r["samples"] for r in steps] == list(accumulate(32 * r["dynamic_rounds"] for r in steps))
    assert (tmp_path / "results" / "budget-embedded.png").stat().st_size > 0
    # DASH vs TRL: both read at 0, 32 and 64 completions
    trl = json.loads((tmp_path / "runs" / "dash-vs-trl" / "trl_grpo-seed0" / "peer-result.json").read_text())
    assert [c[1] for c in trl["curve"]] == [0, 32, 64] and trl["curve"][1][0] < trl["curve"][2][0]
    assert "time_to_target_ratio_dash_vs_trl_grpo" in summary and "DASH vs TRL" in page


def test_bench_real_at_toy_size(tmp_path, toy_options):
    """bench real's protocol on the toy run in place of SmolLM2: its keys (with intervals over 2
    seeds), the J = 8 vs J = 4 delta, nulls for runs not made, the conclusions table."""
    from pathlib import Path

    from frugalrl.config import load_config

    base = Path(__file__).resolve().parents[1] / "configs" / "smollm2-arithmetic.yaml"
    # the toy file's rows have a prompt, not a reasoning-gym question: no template
    rc = main(["bench", "real", *toy_options, "data.prompt_template=", f"output_dir={tmp_path / 'runs'}",
               f"bench.base_config={base}", "bench.runs=[kae_j8,kae_j4]", "bench.seeds=[0,1]",
               "bench.samples=512", "bench.eval_every_samples=256"])
    assert rc == 0
    summary = _summary(tmp_path)
    _intervals(summary, ["real_final_accuracy_kae_j8", "real_final_accuracy_kae_j4",
                         "real_final_accuracy_delta_kae_j8_vs_kae_j4"])
    for key in ("real_final_accuracy_ppo", "real_final_accuracy_delta_ppo_vs_rloo_g4",
                "real_skip_samples_to_target_ratio_vs_rloo"):
        assert summary[key] is None and summary[f"{key}_ci_low"] is None
    saved = load_config(tmp_path / "runs" / "kae_j8-seed1" / "bench-config.yaml")
    # the base file, the bench's defaults, the command line, the run's options, in that order
    assert (saved.train.lr, saved.max_wall_s, saved.data.prompt_template, saved.rollout.max_new_tokens) == (2e-5, 0, "", 8)
    assert (saved.algo.estimator, saved.rollout.batch_prompts, saved.data.sticky_steps, saved.seed) == ("kae", 32, 8, 1)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "kae_j8-seed1" / "metrics.jsonl").open()]
    assert [r["samples"] for r in rows if "eval_accuracy" in r] == [0, 256, 512]  # read at equal samples
    assert len([r for r in rows if "reward_mean" in r]) == 8
    page = (tmp_path / "results" / "real.md").read_text()
    assert "frugalrl bench real" in page and "| kae_j8 | algo.estimator=kae" in page
    assert "mean reward at visits 1..8:" in page and "mean reward at visits 1..4:" in page
    assert "final accuracy ppo - rloo_g4: not run | not run |" in page
    assert "Reused" not in page

    # bench.resume: finished runs of the same config are reused, an unfinished one runs again
    (tmp_path / "runs" / "kae_j4-seed1" / "model" / "manifest.json").unlink()
    before = summary["real_final_accuracy_kae_j8"]
    assert main(["bench", "real", *toy_options, "data.prompt_template=", f"output_dir={tmp_path / 'runs'}",
                 f"bench.base_config={base}", "bench.runs=[kae_j8,kae_j4]", "bench.seeds=[0,1]",
                 "bench.samples=512", "bench.eval_every_samples=256", "bench.resume=true"]) == 0
    page = (tmp_path / "results" / "real.md").read_text()
    assert "Reused from an earlier invocation's finished run directories" in page
    assert "kae_j8 seed 0, kae_j4 seed 0, kae_j8 seed 1." in page
    assert (tmp_path / "runs" / "kae_j4-seed1" / "model" / "manifest.json").is_file()
    assert _summary(tmp_path)["real_final_accuracy_kae_j8"] == before


def test_bench_real_verdicts():
    """A conclusion holds when the interval of its difference has the toy's sign, is reversed when it has
    the other, is not resolved when it spans 0; "the same" holds when it spans 0."""
    from frugalrl.bench.real import verdict
    from frugalrl.bench.stats import Estimate

    assert verdict(Estimate(0.05, 0.01, 0.09, 3), 1) == "holds"
    assert verdict(Estimate(-0.05, -0.09, -0.01, 3), 1) == "reversed"
    assert verdict(Estimate(0.05, -0.01, 0.11, 3), 1).startswith("not resolved")
    assert verdict(Estimate(-0.05, -0.09, -0.01, 3), -1) == "holds"
    assert verdict(Estimate(0.02, -0.32, 0.37, 2), -1).startswith("not resolved")  # the toy found < 0
    assert verdict(Estimate(0.05, 0.01, 0.09, 3), -1) == "reversed"
    assert verdict(Estimate(-0.02, -0.02, -0.02, 2), -1).startswith("not resolved")  # two seeds that agree exactly
    assert verdict(Estimate(0.01, -0.02, 0.04, 3), 0).startswith("holds")
    assert verdict(Estimate(0.05, 0.01, 0.09, 3), 0) == "does not hold"
    assert verdict(Estimate(0.05, 0.05, 0.05, 1), 1) == "one seed: no verdict" and verdict(None, 1) == "not run"

    from frugalrl.bench.real import conclusions  # skip never reaching the target is a finding, not a blank

    rows = conclusions({}, {}, {}, None, [(None, 640.0), (None, 960.0)])
    assert ["target not reached within the budget: skip in 2 of 2 seeds, rloo_pool64 in 0 of 2",
            "does not hold"] == rows[-1][1:]


def test_rollout_bench_counts_a_shared_prefix_once():
    import torch

    from frugalrl import fastgen
    from frugalrl.bench.rollout import prefilled_tokens

    n = fastgen.MIN_SHARED_PREFIX + 2
    lengths = [n + 3, n + 1, n + 6]
    P = max(lengths)
    mask = (torch.arange(P) >= P - torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.randint(3, 50, (3, P), generator=torch.Generator().manual_seed(0))
    for row, length in zip(ids, lengths):
        row[P - length:P - length + n] = torch.arange(n) + 3  # every prompt starts alike
    assert prefilled_tokens(ids, mask) == sum(lengths) - 2 * n  # the prefix once, each rest once
    ids[1, P - lengths[1]] = 99  # no common start: every prompt whole
    assert prefilled_tokens(ids, mask) == sum(lengths)
