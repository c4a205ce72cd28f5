"""The embedded model's SFT warm-up stops at its target accuracy, or says that it hit its cap."""

import json

import pytest
from rich.console import Console

from frugalrl import models
from frugalrl.cli import main
from frugalrl.config import load_config
from frugalrl.sft import sft

SMALL = ["data.train_size=80", "data.eval_size=16", "model.sft_eval_size=8", "model.sft_batch=8",
         "rollout.max_new_tokens=8"]


@pytest.fixture()
def scripted_accuracy(monkeypatch):
    """Make the warm-up's accuracy readings follow a script (one value per evaluate call); returns
    the list of row counts each call evaluated."""
    calls = []

    def install(readings):
        it = iter(readings)

        def fake_evaluate(model, tokenizer, rows, reward_fn, **kw):
            calls.append(len(rows))
            return {"accuracy": next(it)}
        monkeypatch.setattr(models, "evaluate", fake_evaluate)
        return calls
    return install


def test_warmup_stops_at_the_first_check_that_reaches_the_target(tmp_path, scripted_accuracy):
    calls = scripted_accuracy([0.1, 0.25, 0.31, 0.9, 0.9, 0.9])  # checks at steps 2, 4, 6, ...; then the eval split
    cfg = load_config(None, [*SMALL, "model.sft_steps=50", "model.sft_eval_every=2", "model.sft_target_accuracy=0.3",
                             f"model.cache_dir={tmp_path}"])
    console = Console(record=True, width=200)  # not a terminal: a plain line at each check, as in a log file
    info = models.build_embedded_sft(cfg, tmp_path / "m", console)
    assert info["sft_steps"] == 6 and info["reached_target"] is True
    lines = [line for line in console.export_text().splitlines() if line.startswith("SFT warm-up step")]
    assert [line.split("  ")[0::2] for line in lines][:1] == [["SFT warm-up step 2/50", "check accuracy 0.100"]]
    assert len(lines) == 3 and "check accuracy 0.310" in lines[-1]
    assert info["check_accuracy"] == 0.31 and info["curve"] == [[2, 0.1], [4, 0.25], [6, 0.31]]
    assert info["eval_accuracy"] == 0.9  # read once more, on the evaluation split
    assert calls == [8, 8, 8, 16]  # held-out training problems at each check, then the 16 evaluation rows
    assert json.loads((tmp_path / "m" / "sft_info.json").read_text())["sft_steps"] == 6


def test_warmup_that_hits_its_cap_says_so(tmp_path, scripted_accuracy):
    scripted_accuracy([0.05] * 10)
    cfg = load_config(None, [*SMALL, "model.sft_steps=4", "model.sft_eval_every=2", "model.sft_target_accuracy=0.3",
                             f"model.cache_dir={tmp_path}"])
    console = Console(record=True, width=300)
    info = models.build_embedded_sft(cfg, tmp_path / "m", console)
    out = console.export_text()
    assert info["sft_steps"] == 4 and info["reached_target"] is False
    assert "hit its cap, model.sft_steps=4" in out and "model.sft_target_accuracy=0.3" in out


def test_target_zero_trains_every_step_without_checks(tmp_path, scripted_accuracy):
    calls = scripted_accuracy([0.0, 0.0])
    cfg = load_config(None, [*SMALL, "model.sft_steps=3", "model.sft_target_accuracy=0", f"model.cache_dir={tmp_path}"])
    info = models.build_embedded_sft(cfg, tmp_path / "m", Console(quiet=True))
    assert info["sft_steps"] == 3 and info["curve"] == []
    assert calls == [8, 16]  # one reading at the end of each set, none along the way


def test_sft_stops_when_on_step_says_so(tokenizer):
    from frugalrl.embedded import build_model
    from frugalrl.tasks.arithmetic import make_splits

    rows, _ = make_splits(0, 2, 16, 4)
    seen = []
    steps, loss = sft(build_model(tokenizer), tokenizer, rows, steps=10, batch_size=4,
                      on_step=lambda step, loss: seen.append(step) or step == 3)
    assert (steps, seen) == (3, [1, 2, 3]) and loss == loss  # finite, not the NaN of no step


def test_warmup_options_key_the_cache():
    base = load_config(None, [])
    assert models.embedded_sft_path(base) != models.embedded_sft_path(
        load_config(None, ["model.sft_target_accuracy=0.4"]))
    assert models.embedded_sft_path(base) != models.embedded_sft_path(load_config(None, ["model.sft_eval_size=128"]))


def test_bench_warmup(tmp_path, capsys):
    rc = main(["bench", "warmup", "bench.seeds=[0,1]", "bench.pools=[80,60]", f"bench.results_dir={tmp_path}",
               f"model.cache_dir={tmp_path / 'cache'}",
               *SMALL, "model.sft_steps=4", "model.sft_eval_every=2", "model.sft_target_accuracy=0.5"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    page = (tmp_path / "warmup.md").read_text()
    assert "frugalrl bench warmup" in page and (tmp_path / "warmup.png").is_file()
    assert page.count("hit the cap") == 4  # a random model reaches no 0.5 in 4 steps
    assert summary["warmup_reached_target_frac"] == 0.0
    assert 0.0 <= summary["warmup_eval_accuracy_min"] <= summary["warmup_eval_accuracy_mean"] <= 1.0
