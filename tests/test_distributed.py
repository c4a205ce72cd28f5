"""Data parallelism: torchrun ranks on CPU (gloo) train what one process trains on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from frugalrl import fastgen
from frugalrl.cli import main
from frugalrl.distributed import Dist, _buckets


@pytest.fixture()
def run_options(toy_run):
    """Three steps of the toy run (conftest), whose rewards vary between samples of the random
    model, so that every step has a gradient."""
    return [*toy_run, "rollout.batch_prompts=8", "max_steps=3", "eval_every=0", "threads=1", "train.lr=1e-3",
            "train.warmup_steps=0"]


def _torchrun(options: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "frugalrl.cli", "train", *options], env=env, capture_output=True, text=True,
                          timeout=600)


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _steps(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward_mean" in r]


def _rewards(run_dir) -> list[float]:
    return [r["reward_mean"] for r in _steps(run_dir)]


@pytest.mark.parametrize("algo", [
    # GRPO groups split over ranks with micro-batches that straddle nothing; filtering drops equal groups
    ["algo.estimator=grpo", "rollout.group_size=2", "train.micro_batch=3"],
    # KAE's history from the global batch; two clipped off-policy steps on shuffled mini-batches
    ["algo.estimator=kae", "rollout.group_size=2", "data.sticky_steps=2", "train.mini_batches=2",
     "algo.loss_agg=token-mean", "train.micro_batch=4"],
    # unequal groups from the budget allocator, split over ranks by completions
    ["algo.estimator=rloo", "rollout.group_size=2", "rollout.allocation=budget", "rollout.candidates=12",
     "rollout.max_per_prompt=4"],
    # dynamic sampling's rounds: kept groups land unevenly on the ranks
    ["algo.estimator=grpo", "rollout.group_size=2", "rollout.dynamic_sampling=true", "train.micro_batch=3"],
], ids=["grpo", "kae-minibatches", "budget", "dynamic-sampling"])
def test_two_ranks_match_one_process(tmp_path, tiny_model_dir, run_options, algo):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = _torchrun([*run_options, *algo, f"output_dir={ddp}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", *run_options, *algo, f"output_dir={single}"]) == 0
    assert _rewards(ddp) == pytest.approx(_rewards(single), abs=1e-6)  # the same samples, step for step
    if "rollout.allocation=budget" in algo:  # groups of unequal size did occur
        assert any(r["completions_per_prompt_max"] > 2 for r in _steps(single))
    if "rollout.dynamic_sampling=true" in algo:  # and groups were dropped
        assert any(r["dynamic_dropped_groups"] > 0 for r in _steps(single))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    ours, theirs = _weights(ddp), _weights(single)
    assert ours.keys() == theirs.keys()
    assert any((ours[k] - start[k]).abs().max() > 1e-4 for k in ours)  # it did train
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)


def test_batch_that_does_not_split_over_ranks_is_a_clear_error(tmp_path, run_options):
    done = _torchrun([*run_options, "rollout.batch_prompts=7", f"output_dir={tmp_path / 'x'}"])
    assert done.returncode != 0  # each rank exits with 2; torchrun reports the failure as 1
    assert "rollout.batch_prompts=7 does not split evenly over 2 ranks" in done.stderr


def test_fastgen_sample_does_not_depend_on_the_rest_of_the_batch(tiny_model_dir):
    """What makes ranks agree: with given uniforms, each row's tokens are the same generated
    alone, in halves or in one batch (compaction and prompt de-duplication included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (6, 5), generator=g)
    ids[1] = ids[0]  # a repeated prompt is prefilled once
    uniforms = 1.0 - torch.rand(6, 12, generator=g)
    common = dict(max_new_tokens=12, eos_token_id=2, pad_token_id=0, temperature=1.5)
    whole = fastgen.generate(model, ids, uniforms=uniforms, **common).tokens
    halves = [fastgen.generate(model, ids[s], uniforms=uniforms[s], **common).tokens for s in (slice(0, 3), slice(3, 6))]
    for part, rows in zip(halves, (slice(0, 3), slice(3, 6))):
        assert torch.equal(part, whole[rows, :part.shape[1]])
        assert (whole[rows, part.shape[1]:] == 0).all()  # the longer batch only pads
    assert not torch.equal(whole, fastgen.generate(model, ids, uniforms=1.0 - uniforms + 1e-6, **common).tokens)
    with pytest.raises(ValueError, match="uniforms must be"):
        fastgen.generate(model, ids, uniforms=uniforms[:, :4], **common)


def test_gradient_buckets_keep_order_and_split_by_dtype_and_size(monkeypatch):
    monkeypatch.setattr("frugalrl.distributed._BUCKET_ELEMENTS", 10)
    tensors = [torch.zeros(4), torch.zeros(6), torch.zeros(3), torch.zeros(2, dtype=torch.float64), torch.zeros(20)]
    sizes = [[t.numel() for t in b] for b in _buckets(tensors)]
    assert sizes == [[4, 6], [3], [2], [20]]


def test_single_process_dist_is_the_identity():
    dist = Dist()
    assert dist.shard(8) == slice(0, 8) and dist.is_main and not dist.active
    x = torch.arange(3.0)
    assert dist.gather(x) is x and dist.sum([1.0, 2.0]) == [1.0, 2.0] and dist.max([3.0]) == [3.0]
    assert dist.main_first(lambda: 5) == 5
