"""FSDP2 sharding (train.strategy=fsdp): torchrun ranks on CPU (gloo) train what one process trains,
resume a killed run step for step, and each hold about 1/N of the weights and optimizer state."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frugalrl import checkpoint, sharding
from frugalrl.cli import main


def _torchrun(args: list[str], nproc: int = 2, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], env=env, capture_output=True, text=True, timeout=600, **kwargs)


def _train(options: list[str], nproc: int = 2) -> None:
    done = _torchrun(["-m", "frugalrl.cli", "train", *options], nproc)
    assert done.returncode == 0, done.stderr[-3000:]


def _rows(run_dir) -> list[dict]:
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if "reward_mean" in r]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


@pytest.fixture()
def run_options(toy_run, tmp_path):
    """Three steps of the toy run (conftest) at a constant learning rate."""
    return [*toy_run, "rollout.batch_prompts=8", "max_steps=3", "eval_every=0", "threads=1", "train.lr=1e-3",
            "train.warmup_steps=0", "train.lr_schedule=constant", f"model.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.parametrize("algo", [
    # filtering drops the groups of equal rewards: ranks keep different numbers of micro-batches
    ["algo.estimator=grpo", "rollout.group_size=2", "train.micro_batch=3"],
    # a reference model (sharded too), V* from stage 1; filtering by a threshold, again unequal ranks
    ["algo.estimator=astar", "rollout.temperature=1", "rollout.group_size=2", "train.micro_batch=3",
     "train.filter_threshold=0.05"],
], ids=["grpo", "astar"])
def test_fsdp_two_ranks_match_one_process(tmp_path, tiny_model_dir, run_options, algo):
    fsdp = [*run_options, *algo, "train.strategy=fsdp"]
    _train([*fsdp, f"output_dir={tmp_path / 'two'}"])
    assert main(["train", *fsdp, f"output_dir={tmp_path / 'one'}"]) == 0  # FSDP over one process
    assert main(["train", *run_options, *algo, f"output_dir={tmp_path / 'ddp'}"]) == 0  # and no FSDP at all
    two = _rows(tmp_path / "two")
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    ours = _weights(tmp_path / "two")
    assert any((ours[k] - start[k]).abs().max() > 1e-4 for k in ours)  # it did train
    for other in ("one", "ddp"):
        rows = _rows(tmp_path / other)
        assert len(rows) == len(two) == 3
        for key in ("loss", "reward_mean"):
            assert [r[key] for r in two] == pytest.approx([r[key] for r in rows], abs=1e-4), (other, key)
        theirs = _weights(tmp_path / other)
        assert ours.keys() == theirs.keys()  # one Hugging Face directory, tied weights as they were
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=0)


# The reward of the toy run, which hangs on its HANG_AT-th call in a process, after writing the
# process id into the HANG_PIDS directory: with eval_every=0 a rank calls it once per step, so
# HANG_AT=5 stops both ranks in step 5.
HANGING_REWARD = """
import os, time
calls = 0

def sevens(prompts, completions, **columns):
    global calls
    calls += 1
    if calls == int(os.environ.get("HANG_AT", "0")):
        open(os.path.join(os.environ["HANG_PIDS"], str(os.getpid())), "w").close()
        time.sleep(600)
    return [c.count('7') / max(1, len(c)) for c in completions]
"""
STEPS = 6
COMPARED = ("reward_mean", "loss", "grad_norm", "baseline_mean", "tokens_generated", "lr", "samples")


def test_sigkilled_sharded_run_resumes_step_for_step(tmp_path, toy_run, run_options):
    reward = tmp_path / "hanging.py"
    reward.write_text(HANGING_REWARD)
    # KAE with sticky prompts and a warm-up: estimator history, sampler and schedule carry over too
    options = [*(o for o in run_options if not o.startswith(("reward.funcs", "max_steps", "train.warmup"))),
               f"reward.funcs=[{reward}:sevens]", f"max_steps={STEPS}", "save_every=2", "train.strategy=fsdp",
               "algo.estimator=kae", "data.sticky_steps=2", "rollout.group_size=2", "train.warmup_steps=3",
               "train.micro_batch=3"]
    _train([*options, f"output_dir={tmp_path / 'whole'}"])
    reference = _rows(tmp_path / "whole")

    run_dir, pids = tmp_path / "killed", tmp_path / "pids"
    pids.mkdir()
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "frugalrl.cli", "train", *options, f"output_dir={run_dir}"],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "HANG_AT": "5", "HANG_PIDS": str(pids)})
    try:
        deadline = time.monotonic() + 300
        while len(list(pids.iterdir())) < 2:  # both ranks in step 5
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        for rank in pids.iterdir():  # kill -9 of every rank, then of the launcher
            os.kill(int(rank.name), signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=30)
    saved = checkpoint.latest_checkpoint(run_dir)
    assert saved.name == "checkpoint-0000004" and sharding.is_sharded_checkpoint(saved)
    assert len(list((saved / sharding.SHARDED).glob("*.distcp"))) == 2  # one file per rank
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4]
    one_process = tmp_path / "on-one-process"
    shutil.copytree(run_dir, one_process)

    _train(["--resume", str(run_dir)])  # same number of processes: the same run, step for step
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for got, want in zip(rows, reference):
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, f"step {got['step']}"
    for name, tensor in _weights(tmp_path / "whole").items():
        torch.testing.assert_close(_weights(run_dir)[name], tensor, atol=0, rtol=0)

    # on one process instead of two: the shards are re-sharded as they load; equal up to rounding
    assert main(["train", "--resume", str(one_process), f"output_dir={one_process}"]) == 0
    for got, want in zip(_rows(one_process)[4:], reference[4:]):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
        assert got["reward_mean"] == pytest.approx(want["reward_mean"], abs=1e-4)


def test_resuming_with_the_other_strategy_is_refused(tmp_path, run_options, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *run_options, "max_steps=1", "save_every=1", f"output_dir={run_dir}"]) == 0
    assert main(["train", "--resume", str(run_dir), "train.strategy=fsdp"]) == 2
    assert "saved with train.strategy=ddp" in capsys.readouterr().err


SHARE = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from frugalrl import distributed, sharding
from frugalrl.config import load_config

cfg = load_config(overrides=["train.strategy=fsdp"])
dist = distributed.init("cpu")
model = sharding.shard(AutoModelForCausalLM.from_pretrained(sys.argv[1]), cfg, dist)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(input_ids=torch.arange(1, 9).view(1, 8), labels=torch.arange(1, 9).view(1, 8)).loss.backward()
optimizer.step()  # AdamW's moments exist from here on
local, total = sharding.local_share(model, optimizer)
with sharding.full_weights(model) as whole:
    whole_elements = sum(p.numel() for p in whole.parameters())
result = {"rank": dist.rank, "local": local, "total": total, "whole": whole_elements}
open(f"{sys.argv[2]}/rank-{dist.rank}.json", "w").write(json.dumps(result))
dist.barrier()  # both ranks done before either tears gloo down (once, without it, rank 0 aborted at exit)
distributed.close(dist)
"""


def test_each_rank_holds_about_half_of_the_weights_and_optimizer_state(tmp_path, tiny_model_dir):
    script = tmp_path / "share.py"
    script.write_text(SHARE)
    done = _torchrun([str(script), str(tiny_model_dir), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank-*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    total = ranks[0]["total"]
    parameters = sum(p.numel() for p in load_file(str(tiny_model_dir / "model.safetensors")).values())
    # weights + AdamW's two moments; the tied lm_head counts once
    assert total == 3 * ranks[0]["whole"] and ranks[0]["whole"] <= parameters
    assert sum(r["local"] for r in ranks) == total  # the shards partition it
    for r in ranks:
        assert r["total"] == total and 0.45 < r["local"] / total < 0.55


def test_bench_scale_at_toy_size(tmp_path, toy_run, capsys):
    """`frugalrl bench scale` end to end on a random Llama of toy size built by the bench."""
    options = [o for o in toy_run if not o.startswith("model.name_or_path")]
    assert main(["bench", "scale", *options, f"output_dir={tmp_path / 'runs'}", "max_steps=2",
                 f"bench.results_dir={tmp_path / 'results'}", "bench.hidden_size=32", "bench.layers=2",
                 "bench.intermediate_size=64", "bench.heads=2"]) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["scale_ddp_peak_rss_mb"] > 100 and summary["scale_fsdp_peak_rss_mb"] > 100
    assert 0.5 < summary["fsdp_to_ddp_peak_rss_ratio"] < 2  # the toy model is all overhead: about 1
    page = (tmp_path / "results" / "scale.md").read_text()
    assert "frugalrl bench scale" in page and "fsdp" in page
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
