"""Smoke tests of `frugalrl bench`: each bench at toy size on the tiny random model, through the CLI."""

import json
import math

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


def test_bench_value(tmp_path, toy_options, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text('{"other_bench": 1.0}')  # merged into, not replaced
    rc = main(["bench", "value", *toy_options, f"output_dir={tmp_path / 'run'}", "max_steps=4", "bench.every=2",
               "bench.probes=4", "bench.mc_samples=8", "bench.groups=[1,2,4]", "rollout.batch_prompts=4",
               "rollout.group_size=2", "train.micro_batch=16", "algo.vstar_n=4"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = _summary(tmp_path)
    assert summary["other_bench"] == 1.0
    for key in ("value_mse_ratio_kae_vs_grpo_g2", "value_mse_ratio_kae_vs_grpo_g4"):
        assert summary[key] == printed[key]
    page = (tmp_path / "results" / "value.md").read_text()
    assert "frugalrl bench value" in page and "| G=1 | G=2 | G=4 |" in page
    for name in ("grpo", "rloo", "reinforce", "reinforce_pp", "kae"):
        assert f"| {name} (" in page
    assert "| grpo (group mean) | n/a |" in page  # no group baseline at G = 1
    assert "kae / grpo MSE ratio: G=2:" in page and "its own target" in page
    assert (tmp_path / "results" / "value.png").stat().st_size > 0


def test_bench_grad(tmp_path, toy_options, capsys):
    run = ["max_steps=4", "bench.every=2", "bench.probes=4", "bench.mc_samples=8", "bench.groups=[1,2,4]",
           "rollout.batch_prompts=4", "rollout.group_size=2", "train.micro_batch=16", "algo.vstar_n=4"]
    for bench in ("value", "grad"):
        assert main(["bench", bench, *toy_options, f"output_dir={tmp_path / bench}", *run]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = _summary(tmp_path)
    for key in ("grad_mse_ratio_kae_vs_grpo_g2", "grad_mse_ratio_kae_vs_grpo_g4",
                "grad_total_mse_ratio_kae_vs_grpo_g2", "grad_total_mse_ratio_kae_vs_grpo_g4"):
        assert summary[key] == printed[key]
    page = (tmp_path / "results" / "grad.md").read_text()
    assert "frugalrl bench grad" in page and "| G=1 | G=2 | G=4 |" in page
    for name in ("grpo", "rloo", "reinforce", "reinforce_pp", "kae", "grpo_scaled", "v_mc"):
        assert f"| {name} (" in page
    assert "| grpo (group mean) | n/a |" in page  # no group baseline at G = 1
    assert "kae / grpo, gradient error from the baseline: G=2:" in page
    assert "kae / grpo, whole error at the best step size: G=2:" in page
    assert (tmp_path / "results" / "grad.png").stat().st_size > 0

    def cells(name, table):  # estimator `name`'s figures in the page's first (0) or second (1) table
        rows = [line for line in page.splitlines() if line.startswith(f"| {name} (")]
        return [float(c) for c in rows[table].strip("| ").split(" | ")[1:] if c != "n/a"]

    # GRPO's group-mean gradient is (G - 1)/G times RLOO's: the same error at the best step size
    assert cells("grpo", 1) and cells("grpo", 1) == pytest.approx(cells("rloo", 1), rel=1e-3)

    def steps(bench):  # the run's metrics, times left out
        lines = (tmp_path / bench / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in lines]

    assert steps("grad") == steps("value")  # the gradient work leaves the run, and so the probe samples, alike


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
    rc = main(["bench", "rollout", *toy_options, "bench.batches=[4,8]", "bench.rounds=1", "bench.new_tokens=6",
               "bench.matmul_size=64"])
    assert rc == 0
    summary = _summary(tmp_path)
    for key in ("rollout_fastgen_vs_hf", "rollout_fraction_of_ceiling", "rollout_fastgen_tok_s_b4",
                "rollout_hf_tok_s_b8"):
        assert summary[key] > 0
    page = (tmp_path / "results" / "rollout.md").read_text()
    assert "frugalrl bench rollout" in page and "| 4 |" in page and "| 8 |" in page
    assert (tmp_path / "results" / "rollout.png").stat().st_size > 0


def test_bench_peer(tmp_path, toy_options):
    # no skip without trl: `make test` installs the bench extra, and this is the test that TRL really trains
    rc = main(["bench", "peer", *toy_options, f"output_dir={tmp_path / 'runs'}", "bench.steps=2", "bench.warmup=1",
               "bench.rounds=1", "rollout.batch_prompts=4", "rollout.group_size=2", "train.micro_batch=4"])
    assert rc == 0
    summary = _summary(tmp_path)
    for key in ("step_time_ratio_ours_vs_trl", "peak_rss_ratio_ours_vs_trl", "peer_trl_s_per_step",
                "peer_trl_peak_rss_mb"):
        assert summary[key] > 0
    assert summary["peer_completions"] == 16  # 2 steps x 4 prompts x G=2
    page = (tmp_path / "results" / "peer.md").read_text()
    assert "frugalrl bench peer" in page and "loss_type='grpo'" in page and "scale_rewards='group'" in page
    for side in ("frugalrl", "TRL GRPOTrainer"):
        row = next(line for line in page.splitlines() if line.startswith(f"| {side} |"))
        assert row.split(" | ")[3] == "16"  # completions: equal samples on both sides
    assert (tmp_path / "runs" / "trl-1" / "model" / "config.json").is_file()
    assert (tmp_path / "results" / "peer.png").stat().st_size > 0


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
    rc = main(["bench", "train", *toy_options, f"output_dir={tmp_path / 'runs'}", "rollout.batch_prompts=8",
               "bench.runs=[grpo,kae,astar,ppo]", "bench.seeds=[0]", "bench.samples=32", "bench.target_run=grpo",
               f"bench.configs_dir={configs}", "algo.vstar_prompts=16", "algo.vstar_n=2"])
    assert rc == 0
    summary = _summary(tmp_path)
    assert summary["peak_rss_ratio_astar_vs_ppo"] > 0
    # written even where a side never reached the target (null), so no stale number survives
    assert {"time_to_target_ratio_dash_vs_grpo", "time_to_target_ratio_kae_g2_vs_grpo_g8", "time_ratio_astar_vs_ppo",
            "time_ratio_astar_vs_ppo_no_stage1", "time_ratio_astar_vs_grpo"} <= summary.keys()
    assert summary["time_to_target_ratio_dash_vs_grpo"] is None  # dash not among the runs
    page = (tmp_path / "results" / "train.md").read_text()
    assert "frugalrl bench train" in page and "| kae | kae |" in page and "A*-PO / PPO, peak RSS" in page
    assert "n/a: one side of the ratio was not run" in page
    assert "32 sampled completions" in page and "32 samples" in page  # stage 1: 16 prompts x 2
    assert "on 6 prompts" in page  # a tenth of the toy file is held out
    steps = [json.loads(line) for line in (tmp_path / "runs" / "kae-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in steps if "reward_mean" in r] == [16, 32]  # 8 prompts x G=2, two steps
    assert (tmp_path / "runs" / "astar-seed0" / "vstar.json").is_file()
    assert (tmp_path / "results" / "train.png").stat().st_size > 0


def test_run_child_reports_the_child_peak_not_the_parent(tmp_path):
    """A child smaller than this process reads as small (ru_maxrss would start from our RSS)."""
    from frugalrl.bench.report import run_child

    ballast = b"\x01" * (600 * 2**20)  # 600 MB, written: this process's RSS is now above it
    seconds, peak = run_child("platform", [], tmp_path / "platform.log")
    assert ballast[-1] == 1 and seconds > 0
    assert 1 < peak < 300, peak
    with pytest.raises(RuntimeError, match="failed with exit code 2"):
        run_child("frugalrl.cli", ["no-such-command"], tmp_path / "bad.log")
