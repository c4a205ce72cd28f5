"""Bad input and bad steps: clear one-line errors before any work, guarded updates."""

import json
import shutil

import pytest
import torch

from frugalrl import checkpoint, trainer
from frugalrl.cli import main
from frugalrl.config import ConfigError, load_config
from frugalrl.evaluation import score
from frugalrl.rewards import RewardError
from frugalrl.update import Learner
from test_train import _toy_task


def _one_line_error(capsys, argv, code=2) -> str:
    """The error line of a failed command (after any progress output), without a traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"frugalrl {argv[0]}: error: "), err
    return err.splitlines()[-1]


# --- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_need_two_completions(estimator):
    with pytest.raises(ConfigError, match="rollout.group_size >= 2"):
        load_config(overrides=[f"algo.estimator={estimator}", "rollout.group_size=1"])
    load_config(overrides=["algo.estimator=kae", "rollout.group_size=1"])


def test_astar_samples_at_the_temperature_of_its_v_star():
    with pytest.raises(ConfigError, match=r"rollout.temperature=1.0") as e:
        load_config(overrides=["algo.estimator=astar", "rollout.group_size=1"])  # default temperature 0.7
    assert "rollout.temperature=0.7" in str(e.value)
    with pytest.raises(ConfigError, match=r"rollout.top_p=0.9 samples another distribution; set rollout.top_p=1.0"):
        load_config(overrides=["algo.estimator=astar", "rollout.group_size=1", "rollout.temperature=1.0",
                               "rollout.top_p=0.9"])
    load_config(overrides=["algo.estimator=astar", "rollout.group_size=1", "rollout.temperature=1.0"])
    load_config(overrides=["algo.estimator=rloo", "rollout.temperature=0.7"])


def test_resume_must_continue_in_place():
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(overrides=["resume=runs/a", "output_dir=runs/b"])


# --- model and data ------------------------------------------------------------------------

def test_missing_model_directory(tmp_path, capsys):
    err = _one_line_error(capsys, ["train", f"model.name_or_path={tmp_path / 'nope'}", f"output_dir={tmp_path}"])
    assert "model.name_or_path" in err and "no such directory" in err


def test_model_directory_without_tokenizer(tmp_path, tiny_model_dir, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, model_dir / name)
    err = _one_line_error(capsys, ["train", f"model.name_or_path={model_dir}", f"output_dir={tmp_path / 'run'}"])
    assert "tokenizer" in err and str(model_dir) in err


def test_prompt_longer_than_context(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "1+1=", "answer": 2, "id": f"short{i}"} for i in range(20)]
    rows.append({"prompt": "1+" * 70 + "1=", "answer": 71, "id": "long"})  # 142 tokens, context is 128
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = _one_line_error(capsys, ["train", f"data.train_path={data}", f"model.name_or_path={tiny_model_dir}",
                                   f"output_dir={tmp_path / 'run'}"])
    assert "prompt long" in err and "context of 128 tokens" in err and "drop it" in err


# --- rewards --------------------------------------------------------------------------------

def _rows(n=2):
    return [{"id": str(i), "prompt": f"{i}=", "answer": "1"} for i in range(n)]


def broken(prompts, completions, **columns):
    raise KeyError("answer")


@pytest.mark.parametrize("reward_fn, match", [
    (lambda p, c, **k: [1.0], r"'reward' returned 1 values for 2 completions"),
    (lambda p, c, **k: [1.0, "x"], r"str 'x' at index 1"),
    (lambda p, c, **k: [1.0, float("nan")], r"nan at index 1"),
    (broken, r"'broken' raised KeyError"),
])
def test_reward_outputs_are_checked(reward_fn, match):
    with pytest.raises(RewardError, match=match):
        score(reward_fn, _rows(), ["a", "b"])


def test_reward_none_scores_zero():
    assert score(lambda p, c, **k: [None, 1], _rows(), ["a", "b"]).tolist() == [0.0, 1.0]


# --- non-finite steps ------------------------------------------------------------------------

class _PoisonedAfterTwo(Learner):
    """From the third update on, infinite advantages: a non-finite loss and gradient."""

    def update(self, rollout, rewards, advantages):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls <= 2:
            return super().update(rollout, rewards, advantages)
        before = [p.detach().clone() for p in self.model.parameters()]
        out = super().update(rollout, rewards, advantages + float("inf"))
        assert all(torch.equal(a, p) for a, p in zip(before, self.model.parameters())), "a bad step moved weights"
        return out


def test_bad_steps_are_skipped_then_stop_with_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "Learner", _PoisonedAfterTwo)
    monkeypatch.setattr(trainer, "load_task", lambda cfg: _toy_task())
    run_dir = tmp_path / "run"
    err = _one_line_error(capsys, [
        "train", f"model.name_or_path={tiny_model_dir}", f"output_dir={run_dir}", "max_steps=20", "save_every=1",
        "eval_every=0", "train.max_bad_steps=3", "rollout.batch_prompts=4", "rollout.max_new_tokens=8"], code=1)
    assert "steps 3..5" in err and "checkpoint-0000002" in err and "train.max_bad_steps" in err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_step"] for r in rows] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert all(0.0 <= r["truncation_rate"] <= 1.0 for r in rows)
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["checkpoint-0000001", "checkpoint-0000002"]
