"""Crash safety: a run killed at any point resumes to exactly the run that was never stopped."""

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

from frugalrl import checkpoint, trainer
from frugalrl.cli import main
from frugalrl.config import load_config
from test_train import _toy_task

TESTS = Path(__file__).resolve().parent
STEPS = 8
# Deterministic per-step measures: equal in the resumed and the uninterrupted run.
COMPARED = ("reward_mean", "loss", "grad_norm", "baseline_mean", "tokens_generated", "lr", "samples")

# A real training process on the toy task (whose reward has signal even for a random model),
# through the command line. It announces HANG and sleeps, so that the test can SIGKILL it at
# a known point: "reward:N" on the N-th reward call (i.e. in step N), "save:N" while the
# checkpoint of step N is written (files there, manifest not yet, not renamed into place).
DRIVER = """
import contextlib, functools, sys, time
sys.path.insert(0, {tests!r})
from frugalrl import checkpoint, cli, trainer
from test_train import _toy_task

mode, at = sys.argv[1].split(":")
task = _toy_task()

def hang():
    print("HANG", flush=True)
    time.sleep(600)

calls = 0
@functools.wraps(task.reward_fn)
def reward(*args, **kwargs):
    global calls
    calls += 1
    if mode == "reward" and calls == int(at):
        hang()
    return task.reward_fn(*args, **kwargs)

real_atomic_dir = checkpoint.atomic_dir
@contextlib.contextmanager
def slow_atomic_dir(final):
    with real_atomic_dir(final) as tmp:
        yield tmp
        if mode == "save" and final.name == f"checkpoint-{{int(at):07d}}":
            hang()

checkpoint.atomic_dir = slow_atomic_dir
trainer.load_task = lambda cfg: type(task)(task.train_rows, task.eval_rows, reward)
sys.exit(cli.main(["train", *sys.argv[2:]]))
"""


def _overrides(model_dir, run_dir, *extra):
    # kae with sticky prompts and a warm-up: estimator history, sampler position and scheduler
    # all carry over a resume.
    return [f"model.name_or_path={model_dir}", f"output_dir={run_dir}", f"max_steps={STEPS}", "save_every=2",
            "eval_every=0", "max_wall_s=0", "threads=1", "rollout.batch_prompts=4", "rollout.group_size=4",
            "rollout.max_new_tokens=8", "train.lr=3e-3", "train.warmup_steps=4", "algo.estimator=kae",
            "data.sticky_steps=2", *extra]


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """metrics.jsonl rows of the uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer.train(load_config(overrides=_overrides(tiny_model_dir, run_dir)), task=_toy_task())
    return _rows(run_dir)


def _run_until_hang(tmp_path, mode: str, args: list[str]) -> subprocess.Popen:
    """Start the driver; return once it hangs at ``mode`` (it is still alive)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS)))
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(driver), mode, *args], stdout=subprocess.PIPE, stderr=log,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the run's progress lines come first: its stdout is not a terminal
        if line.strip() == "HANG":
            return proc
    proc.wait()
    pytest.fail("the driver ended before hanging:\n" + (tmp_path / "driver.log").read_text()[-3000:])


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _resume(monkeypatch, run_dir) -> int:
    monkeypatch.setattr(trainer, "load_task", lambda cfg: _toy_task())
    return main(["train", "--resume", str(run_dir)])


def _assert_same_steps(rows, reference):
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # none missing, none twice
    for got, want in zip(steps, reference):
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, f"step {got['step']}"


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, reference,
                                                                      monkeypatch):
    run_dir = tmp_path / "run"
    proc = _run_until_hang(tmp_path, "reward:6", _overrides(tiny_model_dir, run_dir))
    _kill(proc)  # in step 6: checkpoint-4 is on disk, and so is step 5's metrics row
    assert checkpoint.latest_checkpoint(run_dir).name == "checkpoint-0000004"
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4, 5]

    assert _resume(monkeypatch, run_dir) == 0
    _assert_same_steps(_rows(run_dir), reference)
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_sigkill_while_saving_resumes_from_previous_checkpoint(tmp_path, tiny_model_dir, reference, monkeypatch):
    run_dir = tmp_path / "run"
    proc = _run_until_hang(tmp_path, "save:6", _overrides(tiny_model_dir, run_dir))
    _kill(proc)
    (partial,) = run_dir.glob(".tmp-checkpoint-0000006-*")
    assert not (partial / checkpoint.MANIFEST).exists()
    # What a non-atomic writer would leave: the half-written directory under the final name.
    shutil.copytree(partial, run_dir / "checkpoint-0000006")
    assert checkpoint.latest_checkpoint(run_dir).name == "checkpoint-0000004"

    assert _resume(monkeypatch, run_dir) == 0
    _assert_same_steps(_rows(run_dir), reference)
    assert not list(run_dir.glob(".tmp-*"))  # the crash's leftovers are gone
    assert checkpoint.is_complete(run_dir / "checkpoint-0000006")  # rewritten by the resumed run


def test_sigterm_checkpoints_the_current_step_and_exits_143(tmp_path, tiny_model_dir):
    """The real command on a JSONL task, without save_every: the signal alone checkpoints."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": 2 * i}) + "\n" for i in range(40)))
    run_dir = tmp_path / "run"
    args = [f"data.train_path={data}", f"model.name_or_path={tiny_model_dir}", f"output_dir={run_dir}",
            "max_steps=100000", "eval_every=0", "max_wall_s=0", "threads=1", "rollout.batch_prompts=4",
            "rollout.max_new_tokens=4"]
    with open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "frugalrl.cli", "train", *args], stderr=err)
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training has started
        assert proc.poll() is None, (tmp_path / "err.log").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    message = (tmp_path / "err.log").read_text().strip().splitlines()[-1]
    assert "SIGTERM" in message and f"--resume {run_dir}" in message
    last = _rows(run_dir)[-1]["step"]
    assert checkpoint.latest_checkpoint(run_dir).name == f"checkpoint-{last:07d}"

    # The run continues from there, on the command line (max_steps changed by an override).
    assert main(["train", "--resume", str(run_dir), f"max_steps={last + 1}"]) == 0
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, last + 2))


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    cfg = load_config(overrides=_overrides(tiny_model_dir, run_dir, "max_steps=2", "save_total_limit=1"))
    trainer.train(cfg, task=_toy_task())
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["checkpoint-0000002"]
    with pytest.raises(ValueError, match="--resume"):
        trainer.train(cfg, task=_toy_task())


def test_resume_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("max_steps: 3\n")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "no config.yaml" in lines[0] and "no complete checkpoint" in lines[1]


def test_checkpoint_state_is_json_and_tensors(tmp_path, tiny_model_dir):
    """RNG states: python and numpy as JSON, torch as a tensor; nothing needs pickle to load."""
    run_dir = tmp_path / "run"
    trainer.train(load_config(overrides=_overrides(tiny_model_dir, run_dir, "max_steps=2")), task=_toy_task())
    state, tensors = checkpoint.load_training_state(run_dir / "checkpoint-0000002")  # weights_only=True
    assert set(state["rng"]) == {"python", "numpy"} and state["step"] == 2 and state["history"]["history"]
    assert tensors["torch_rng"].dtype == torch.uint8 and "optimizer" in tensors


def test_clean_up_after_crash_restores_a_checkpoint_moved_aside(tmp_path):
    """A kill between atomic_dir's two renames leaves the old copy aside: it is put back."""
    with checkpoint.atomic_dir(tmp_path / "checkpoint-0000002") as tmp:
        (tmp / "a.txt").write_text("good")
    (tmp_path / "checkpoint-0000002").rename(tmp_path / ".old-checkpoint-0000002-123")
    (tmp_path / ".tmp-checkpoint-0000003-123").mkdir()
    checkpoint.clean_up_after_crash(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000002"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-0000002"


def test_resume_on_other_training_data_is_refused(tmp_path, tiny_model_dir):
    """The sampler's saved position indexes the training prompts: other prompts would silently
    train on a different schedule."""
    run_dir = tmp_path / "run"
    trainer.train(load_config(overrides=_overrides(tiny_model_dir, run_dir, "max_steps=2")), task=_toy_task())
    resumed = load_config(overrides=_overrides(tiny_model_dir, run_dir, f"resume={run_dir}"))
    with pytest.raises(ValueError, match="training prompts differ"):
        trainer.train(resumed, task=_toy_task(n=32))
