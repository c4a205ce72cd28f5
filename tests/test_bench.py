"""Smoke tests of `frugalrl bench`: each bench at toy size on the tiny random model, through the CLI."""

import json
import math

import pytest

from frugalrl.cli import main


@pytest.fixture()
def toy_options(tmp_path, tiny_model_dir):
    """Run-config options for a toy task: 64 prompts; reward = the share of '7's in the completion,
    so that a random model gets rewards that vary between samples."""
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}=", "answer": "7"}) + "\n" for i in range(64)))
    reward = tmp_path / "sevens.py"
    reward.write_text("def sevens(prompts, completions, **columns):\n"
                      "    return [c.count('7') / max(1, len(c)) for c in completions]\n")
    return [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", f"reward.funcs=[{reward}:sevens]",
            "rollout.max_new_tokens=8", f"bench.results_dir={tmp_path / 'results'}"]


def _summary(tmp_path) -> dict:
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert all(math.isfinite(v) for v in summary.values())
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


def test_bench_rejects_unknown_bench_option(capsys):
    assert main(["bench", "value", "bench.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
