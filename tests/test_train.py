"""End-to-end: the RL loop raises the mean reward of a tiny random model on a toy reward."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from frugalrl.config import load_config
from frugalrl.data import Task
from frugalrl.trainer import train


def sevens(prompts, completions, **columns):
    """Fraction of the completion's characters that are '7' (a random model starts near 1/100)."""
    return [c.count("7") / max(1, len(c)) for c in completions]


def _toy_task(n=64):
    rows = [{"id": f"p{i}", "prompt": f"{i}=", "answer": "7"} for i in range(n)]
    return Task(rows, rows[:16], sevens)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "kae"])
def test_reward_goes_up(tmp_path, tiny_model_dir, estimator):
    cfg = load_config(overrides=[
        f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", f"algo.estimator={estimator}",
        "max_steps=40", "eval_every=0", "rollout.batch_prompts=8", "rollout.group_size=4",
        "rollout.max_new_tokens=8", "train.lr=3e-3", "train.warmup_steps=0", "train.micro_batch=16",
        "data.sticky_steps=4"])
    result = train(cfg, task=_toy_task())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert len(rewards) == 40 and result.steps == 40
    assert sum(rewards[-10:]) / 10 > 2 * sum(rewards[:10]) / 10 + 0.02
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "training.png").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_micro_batch_split_gives_same_update(tmp_path, tiny_model_dir):
    """One step with micro_batch 64, 16 or 8 leaves identical weights (normaliser is global)."""
    weights = []
    for mb in (64, 16, 8):
        cfg = load_config(overrides=[
            f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path / str(mb)}", "max_steps=1",
            "eval_every=0", "rollout.batch_prompts=16", "rollout.group_size=4", "rollout.max_new_tokens=8",
            "train.warmup_steps=0", "train.lr=1e-2", f"train.micro_batch={mb}", "algo.loss_agg=token-mean"])
        train(cfg, task=_toy_task())
        weights.append(load_file(tmp_path / str(mb) / "model" / "model.safetensors"))
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(initial[k], weights[0][k]) for k in initial), "the step must change the weights"
    # AdamW's first step moves each weight by lr * g / (|g| + 1e-8): where |g| is near 1e-8 the
    # summation order's round-off moves it by ~1e-6 (seen: one embedding entry of 2048 on an AVX2
    # CPU). A split that normalised per micro-batch would turn whole gradients, moving weights by ~lr.
    for other in weights[1:]:
        for name, value in weights[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-5, rtol=1e-5)


def _two_tiny_steps(tmp_path, tiny_model_dir, *options):
    """A two-step run of 4 prompts x G=2 on the tiny model, into tmp_path/run."""
    return load_config(overrides=[
        f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "max_steps=2", "eval_every=0",
        "rollout.batch_prompts=4", "rollout.group_size=2", "rollout.max_new_tokens=4", *options])


def test_threads_option_holds_for_the_run_and_is_given_back(tmp_path, tiny_model_dir):
    cfg = _two_tiny_steps(tmp_path, tiny_model_dir, "threads=2")
    before = torch.get_num_threads()  # conftest's 1
    seen = []
    train(cfg, task=_toy_task(), on_step=lambda *_: seen.append(torch.get_num_threads()))
    assert seen == [2, 2] and torch.get_num_threads() == before


def test_steps_with_every_sample_filtered_leave_the_weights_and_say_nothing(tmp_path, tiny_model_dir):
    """Equal rewards in every group: all advantages 0, so no optimizer step (and no torch warning)."""
    cfg = _two_tiny_steps(tmp_path, tiny_model_dir, "train.warmup_steps=0")
    rows = _toy_task().train_rows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, task=Task(rows, rows[:4], lambda prompts, completions, **_: [0.0] * len(completions)))
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["filtered_frac"] for r in steps if "reward_mean" in r] == [1.0, 1.0]
    initial = load_file(tiny_model_dir / "model.safetensors")
    final = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.equal(initial[k], final[k]) for k in initial)


def test_lr_schedule_warmup_then_cosine_to_zero():
    from frugalrl.trainer import lr_factor

    cfg = load_config(overrides=["train.lr_schedule=cosine", "train.warmup_steps=10", "max_steps=110"])
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 60) == pytest.approx(0.5)      # half-way through the decay: cos(pi/2)
    assert lr_factor(cfg, 110) == pytest.approx(0.0)
    constant = load_config(overrides=["train.lr_schedule=constant", "train.warmup_steps=10", "max_steps=110"])
    assert lr_factor(constant, 100) == 1.0


def test_cosine_decay_ends_at_the_last_optimizer_step():
    from frugalrl.trainer import lr_factor

    # 55 rollout batches x 2 mini-batches = 110 optimizer steps
    cfg = load_config(overrides=["train.lr_schedule=cosine", "train.warmup_steps=10", "max_steps=55",
                                 "train.mini_batches=2"])
    assert lr_factor(cfg, 60) == pytest.approx(0.5) and lr_factor(cfg, 110) == pytest.approx(0.0)


def _lrs(run_dir) -> list[float]:
    return [r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r]


def test_lr_schedule_counts_optimizer_steps_and_resumes_there(tmp_path, tiny_model_dir):
    """train.mini_batches=2: after k rollout batches the lr is lr_factor at 2k optimizer steps, in
    a run and in the run resumed from its checkpoint."""
    from frugalrl.config import apply_overrides
    from frugalrl.trainer import lr_factor

    cfg = _two_tiny_steps(tmp_path, tiny_model_dir, "train.mini_batches=2", "train.warmup_steps=8",
                          "train.lr_schedule=constant", "train.lr=1e-3", "save_every=2")
    train(cfg, task=_toy_task())
    train(apply_overrides(cfg, ["max_steps=3", f"resume={tmp_path / 'run'}"]), task=_toy_task())
    assert _lrs(tmp_path / "run") == pytest.approx([1e-3 * lr_factor(cfg, 2 * k) for k in (1, 2, 3)])


def test_kae_without_recurring_prompts_warns_and_reports_its_history_weight(tmp_path, tiny_model_dir):
    """64 prompts in batches of 4 come back every 16 steps, beyond the default window of 10:
    KAE's history never counts, which the run says at start and in its summary."""
    import io

    from rich.console import Console

    from frugalrl.config import apply_overrides
    from frugalrl.trainer import kae_history_warning

    cfg = _two_tiny_steps(tmp_path, tiny_model_dir, "algo.estimator=kae")
    out = io.StringIO()
    train(cfg, Console(file=out, width=400), task=_toy_task())
    text = " ".join(out.getvalue().split())
    assert "data.sticky_steps" in text and "rloo" in text
    assert "KAE history weight (kae_history_weight_mean)" in text
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kae_history_weight_mean"] for r in rows if "reward_mean" in r] == [0.0, 0.0]
    longer = apply_overrides(cfg, ["max_steps=100"])
    warning = kae_history_warning(longer, 64)
    assert "every 16 steps" in warning and "data.sticky_steps" in warning and "algo.kae_bandwidth" in warning
    for fix in (["data.sticky_steps=2"], ["algo.kae_bandwidth=17"], ["algo.kae_bandwidth_mode=relative"],
                ["algo.estimator=rloo"]):
        assert kae_history_warning(apply_overrides(longer, fix), 64) is None, fix
    # a run too short for any prompt to come back: only sticky batches help
    assert "max_steps=100" in kae_history_warning(apply_overrides(longer, ["algo.kae_bandwidth_mode=relative"]), 4000)
    # sticky batches come back at once, but a window under a step still forgets them
    assert "algo.kae_bandwidth" in kae_history_warning(apply_overrides(longer, ["data.sticky_steps=2",
                                                                                 "algo.kae_bandwidth=0.5"]), 64)


def test_a_reward_past_its_deadline_is_stopped_and_the_run_goes_on(tmp_path, tiny_model_dir):
    """The reward never returns on its first call: that step scores 0 (reward.on_error=zero) within
    the deadline plus a little, and the next step scores as usual."""
    marker = tmp_path / "called"
    reward = tmp_path / "stuck_once.py"
    reward.write_text(f"import pathlib\n"
                      f"def stuck_once(prompts, completions, **columns):\n"
                      f"    marker = pathlib.Path({str(marker)!r})\n"
                      f"    if not marker.exists():\n"
                      f"        marker.touch()\n"
                      f"        while True:\n"
                      f"            pass\n"
                      f"    return [1.0] * len(completions)\n")
    cfg = _two_tiny_steps(tmp_path, tiny_model_dir, f"reward.funcs=[{reward}:stuck_once]", "reward.timeout_s=1",
                          "reward.on_error=zero")
    train(cfg, task=_toy_task())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["reward_mean"], r["reward_timeouts"]) for r in rows] == [(0.0, 1), (1.0, 0)]
    assert rows[0]["step_s"] - rows[1]["step_s"] < 1 + 1.5  # the deadline, and a margin for the worker's restart
