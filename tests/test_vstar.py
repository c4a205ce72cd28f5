"""A*-PO stage 1 (vstar.py): V* from reference samples, the cache and its staleness checks."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from frugalrl import vstar
from frugalrl.advantages import optimal_value
from frugalrl.cli import main
from frugalrl.config import load_config
from frugalrl.data import Task

ROWS = [{"id": f"p{i}", "prompt": f"{i}=", "answer": "7"} for i in range(6)]
SOLVABLE = {"p1", "p4"}


def solvable_only(prompts, completions, id, **columns):
    """1 for the prompts in SOLVABLE whatever the completion; 0 for the others."""
    return [float(i in SOLVABLE) for i in id]


def sevens(prompts, completions, **columns):
    return [c.count("7") / max(1, len(c)) for c in completions]


TASK = Task(ROWS, ROWS[:2], sevens)


def config(tmp_path, tiny_model_dir, *overrides):
    return load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"model.cache_dir={tmp_path / 'cache'}",
                                  "algo.estimator=astar", "rollout.temperature=1", "algo.vstar_n=4",
                                  "rollout.max_new_tokens=6",
                                  "rollout.batch_prompts=2", "rollout.group_size=1", *overrides])


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A copy of the tiny model's directory, free to be changed."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def perturb_saved_weights(model_dir):
    changed = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    changed.save_pretrained(model_dir)


@pytest.fixture
def hashed_bytes(monkeypatch):
    """Counts the bytes vstar feeds to SHA-1 (one-element list)."""
    count = [0]

    class Counting:
        def __init__(self, data=b""):
            self._h = real()
            self.update(data)

        def update(self, data):
            count[0] += len(data)
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    real = vstar.hashlib.sha1
    monkeypatch.setattr(vstar, "hashlib", SimpleNamespace(sha1=Counting))
    return count


@pytest.fixture
def generate_calls(monkeypatch):
    """Counts stage 1's generate calls."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    real = vstar.generate
    monkeypatch.setattr(vstar, "generate", counting)
    return calls


def test_prepare_builds_once_then_reuses(tmp_path, tiny_model_dir, model, tokenizer, generate_calls):
    cfg = config(tmp_path, tiny_model_dir)
    v_star, rows = vstar.prepare(cfg, model, tokenizer, TASK)
    assert sum(generate_calls) == 4 * len(ROWS) and rows == ROWS
    [path] = (tmp_path / "cache").glob("vstar-*.json")
    cache = json.loads(path.read_text())
    meta = cache["meta"]
    assert meta["n"] == 4 and meta["beta1"] == 0.5 and meta["temperature"] == 1.0 and meta["prompts"] == 6
    assert meta["weights"] == vstar.weights_hash(tiny_model_dir, tmp_path / "cache") and meta["dtype"] == "float32"
    assert cache["model"] == str(tiny_model_dir)
    for row in ROWS:
        entry = cache["prompts"][row["id"]]
        assert len(entry["rewards"]) == 4
        assert entry["v_star"] == pytest.approx(float(optimal_value(torch.tensor(entry["rewards"]), 0.5)))
        assert v_star[row["id"]] == entry["v_star"]
    # a second run with the same settings samples nothing
    assert vstar.prepare(cfg, model, tokenizer, TASK) == (v_star, rows)
    assert sum(generate_calls) == 4 * len(ROWS)
    # a changed setting gets its own default file instead of a stale one
    vstar.prepare(config(tmp_path, tiny_model_dir, "algo.astar_beta1=0"), model, tokenizer, TASK)
    assert len(list((tmp_path / "cache").glob("vstar-*.json"))) == 2


def test_stage_one_leaves_the_training_rng_alone(tmp_path, tiny_model_dir, model, tokenizer):
    torch.manual_seed(3)
    vstar.prepare(config(tmp_path, tiny_model_dir), model, tokenizer, TASK)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(3), after)


def test_beta1_zero_is_the_mean_and_unsolved_prompts_can_be_dropped(tmp_path, tiny_model_dir, model, tokenizer):
    task = Task(ROWS, ROWS[:2], solvable_only)
    cfg = config(tmp_path, tiny_model_dir, "algo.astar_beta1=0")
    v_star, rows = vstar.prepare(cfg, model, tokenizer, task)
    assert v_star == {r["id"]: float(r["id"] in SOLVABLE) for r in ROWS} and rows == ROWS
    drop = config(tmp_path, tiny_model_dir, "algo.astar_beta1=0", "algo.vstar_drop_unsolved=true")
    v_star, rows = vstar.prepare(drop, model, tokenizer, task)
    assert [r["id"] for r in rows] == ["p1", "p4"] and set(v_star) == SOLVABLE
    # stage 1 on the first N prompts only; training then uses those
    v_star, rows = vstar.prepare(config(tmp_path, tiny_model_dir, "algo.vstar_prompts=3"), model, tokenizer, task)
    assert rows == ROWS[:3] and set(v_star) == {"p0", "p1", "p2"}


def test_nothing_solved_is_a_clear_error(tmp_path, tiny_model_dir, model, tokenizer):
    task = Task(ROWS, ROWS[:2], lambda prompts, completions, **c: [0.0] * len(completions))
    with pytest.raises(ValueError, match="vstar_drop_unsolved=true leaves nothing"):
        vstar.prepare(config(tmp_path, tiny_model_dir, "algo.vstar_drop_unsolved=true"), model, tokenizer, task)


@pytest.mark.parametrize("change, expected", [
    (["algo.vstar_n=8"], r"n: cache 4, this run 8"),
    (["rollout.max_new_tokens=7"], r"max_new_tokens: cache 6, this run 7"),
    (["data.difficulty=3"], r"data.difficulty: cache 2, this run 3"),
])
def test_stale_cache_is_refused(change, expected, tmp_path, tiny_model_dir, model, tokenizer):
    path = f"algo.vstar_path={tmp_path / 'v.json'}"
    vstar.prepare(config(tmp_path, tiny_model_dir, path), model, tokenizer, TASK)
    with pytest.raises(ValueError, match=expected) as e:
        vstar.prepare(config(tmp_path, tiny_model_dir, path, *change), model, tokenizer, TASK)
    assert "stale" in str(e.value) and "frugalrl vstar" in str(e.value)


def test_cache_of_other_weights_or_prompts_is_refused(tmp_path, model_copy, model, tokenizer):
    cfg = config(tmp_path, model_copy, f"algo.vstar_path={tmp_path / 'v.json'}")
    vstar.prepare(cfg, model, tokenizer, TASK)
    with pytest.raises(ValueError, match="prompt_ids"):
        vstar.prepare(cfg, model, tokenizer, Task(ROWS[:5], ROWS[:2], sevens))
    perturb_saved_weights(model_copy)
    with pytest.raises(ValueError, match="weights: cache"):
        vstar.prepare(cfg, model, tokenizer, TASK)
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        vstar.prepare(cfg, model, tokenizer, TASK)


def test_weights_are_read_once_then_known_by_their_files_stats(tmp_path, model_copy, model, tokenizer,
                                                               hashed_bytes):
    cfg = config(tmp_path, model_copy)
    weights = model_copy / "model.safetensors"
    vstar.prepare(cfg, model, tokenizer, TASK)
    assert hashed_bytes[0] > weights.stat().st_size  # the model directory, once
    hashed_bytes[0] = 0
    vstar.prepare(cfg, model, tokenizer, TASK)
    assert hashed_bytes[0] < weights.stat().st_size / 10  # the settings only, no weight
    # a touched file is read again, and the same bytes find the same cache
    os.utime(weights)
    vstar.prepare(cfg, model, tokenizer, TASK)
    assert hashed_bytes[0] > weights.stat().st_size
    assert len(list((tmp_path / "cache").glob("vstar-*.json"))) == 1
    # changed weights of the same size get a cache of their own
    size = weights.stat().st_size
    perturb_saved_weights(model_copy)
    assert weights.stat().st_size == size
    vstar.prepare(cfg, model, tokenizer, TASK)
    assert len(list((tmp_path / "cache").glob("vstar-*.json"))) == 2


def test_an_adapter_directory_is_keyed_on_its_base_model_too(tmp_path, model_copy):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_copy)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter")
    before = vstar.weights_hash(adapter, tmp_path / "cache")
    perturb_saved_weights(model_copy)
    assert vstar.weights_hash(adapter, tmp_path / "cache") != before


REWARD = "def score(prompts, completions, **columns):\n    return [0.0] * len(completions)\n"


def test_cache_of_another_reward_is_refused(tmp_path, tiny_model_dir, model, tokenizer):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    spec, path = f"reward.funcs=[{reward}:score]", f"algo.vstar_path={tmp_path / 'v.json'}"
    vstar.prepare(config(tmp_path, tiny_model_dir, path, spec), model, tokenizer, TASK)
    for change, expected in [([], r"reward.funcs: cache \['.*reward.py:score'\], this run \[\]"),
                             (["reward.funcs=[math]"], r"reward.funcs: cache \['.*'\], this run \['math'\]"),
                             ([spec, "reward.weights=[2]"], r"reward.weights: cache \[1.0\], this run \[2.0\]")]:
        with pytest.raises(ValueError, match=expected):
            vstar.prepare(config(tmp_path, tiny_model_dir, path, *change), model, tokenizer, TASK)
    vstar.prepare(config(tmp_path, tiny_model_dir, path, spec, "reward.weights=[1]"), model, tokenizer, TASK)
    reward.write_text(REWARD.replace("0.0", "1.0"))  # the same function name, another reward
    with pytest.raises(ValueError, match=r"reward.sources.*reward.py:score: cache '\w+', this run '\w+'"):
        vstar.prepare(config(tmp_path, tiny_model_dir, path, spec), model, tokenizer, TASK)
    # under the default file name, the other reward builds a cache of its own instead
    vstar.prepare(config(tmp_path, tiny_model_dir, spec), model, tokenizer, TASK)
    reward.write_text(REWARD)
    vstar.prepare(config(tmp_path, tiny_model_dir, spec), model, tokenizer, TASK)
    assert len(list((tmp_path / "cache").glob("vstar-*.json"))) == 2


def test_cli_vstar_writes_the_cache_that_train_uses(tmp_path, tiny_model_dir, capsys):
    args = [f"model.name_or_path={tiny_model_dir}", f"model.cache_dir={tmp_path / 'cache'}", "algo.vstar_n=2",
            "rollout.max_new_tokens=4", "data.train_size=12", "data.eval_size=4", "rollout.batch_prompts=4",
            "rollout.group_size=1", "threads=1", "algo.estimator=astar", "rollout.temperature=1"]
    assert main(["vstar", *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 12 and summary["n"] == 2
    cache = json.loads(open(summary["path"]).read())
    assert len(cache["prompts"]) == 12
    before = open(summary["path"]).read()
    assert main(["train", *args, "max_steps=2", "eval_every=0",
                 f"output_dir={tmp_path / 'run'}"]) == 0
    assert open(summary["path"]).read() == before  # found, not rebuilt
    assert len(list((tmp_path / "cache").glob("vstar-*.json"))) == 1
