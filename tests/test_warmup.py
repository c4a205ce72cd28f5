"""The embedded model's SFT warm-up: each way it stops (target, patience, time limit, step cap),
what it records and says, its micro-batches, and where it is cached."""

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from frugalrl import models
from frugalrl.cli import main
from frugalrl.config import default_cache_dir, load_config
from frugalrl.embedded import build_model
from frugalrl.sft import micro_batches, sft, sft_backward
from frugalrl.tasks.arithmetic import make_splits

SMALL = ["data.train_size=80", "data.eval_size=16", "model.sft_eval_size=8", "model.sft_batch=8",
         "rollout.max_new_tokens=8"]


@pytest.fixture()
def scripted_accuracy(monkeypatch):
    """Make the warm-up's accuracy readings follow a script (one value per evaluate call); returns
    the list of (rows, max_new_tokens) of each call."""
    calls = []

    def install(readings):
        it = iter(readings)

        def fake_evaluate(model, tokenizer, rows, reward_fn, *, max_new_tokens, **kw):
            calls.append((len(rows), max_new_tokens))
            return {"accuracy": next(it)}
        monkeypatch.setattr(models, "evaluate", fake_evaluate)
        return calls
    return install


def warm_up(tmp_path, options, width=300):
    """(info, console text) of a warm-up with SMALL settings and ``options``."""
    cfg = load_config(None, [*SMALL, f"model.cache_dir={tmp_path}", *options])
    console = Console(record=True, width=width)  # not a terminal: a plain line at each check, as in a log file
    info = models.build_embedded_sft(cfg, tmp_path / "m", console)
    return info, console.export_text()


def test_warmup_stops_at_the_first_check_that_reaches_the_target(tmp_path, scripted_accuracy):
    calls = scripted_accuracy([0.1, 0.25, 0.31, 0.9, 0.9, 0.9])  # checks at steps 2, 4, 6, ...; then the eval split
    info, out = warm_up(tmp_path, ["model.sft_steps=50", "model.sft_eval_every=2", "model.sft_target_accuracy=0.3"],
                        width=200)
    assert info["sft_steps"] == 6 and info["reached_target"] is True and info["stopped"] == "target"
    lines = [line for line in out.splitlines() if line.startswith("SFT warm-up step")]
    assert [line.split("  ")[0::2] for line in lines][:1] == [["SFT warm-up step 2/50", "check accuracy 0.100"]]
    assert len(lines) == 3 and "check accuracy 0.310" in lines[-1]
    assert "stopped by its target (model.sft_target_accuracy=0.3)" in " ".join(out.split())
    assert info["check_accuracy"] == 0.31 and info["curve"] == [[2, 0.1], [4, 0.25], [6, 0.31]]
    assert info["eval_accuracy"] == 0.9  # read once more, on the evaluation split
    assert [n for n, _ in calls] == [8, 8, 8, 16]  # held-out training problems at each check, then the 16 eval rows
    assert json.loads((tmp_path / "m" / "sft_info.json").read_text())["stopped"] == "target"


def test_warmup_stops_when_checks_bring_no_new_best(tmp_path, scripted_accuracy):
    # 8 check problems: a reading's standard error is sqrt(p (1 - p) / 8), 0.16 at p = 0.7
    calls = scripted_accuracy([0.5, 0.7, 0.6, 0.85, 0.75] + [0.95] * 10)
    info, out = warm_up(tmp_path, ["model.sft_steps=50", "model.sft_eval_every=2", "model.sft_target_accuracy=0.9",
                                   "model.sft_patience=3"])
    assert info["stopped"] == "patience" and info["reached_target"] is False
    # best 0.7 at step 4 (0.5 + 0.18 beaten); steps 6, 8, 10 bring nothing better by more than the noise
    assert info["sft_steps"] == 10 and len(calls) == 6  # five checks, then the evaluation split
    out = " ".join(out.split())
    assert "short of model.sft_target_accuracy=0.9" in out and "model.sft_patience=3" in out
    assert "with accuracy 0.750" in out and "best check 0.850" in out and "RL starts from there" in out


def test_patience_counts_only_once_halfway_to_the_target(tmp_path, scripted_accuracy):
    # the arithmetic task's curve: near 0 for many checks, then a climb; not a plateau
    scripted_accuracy([0.01, 0.0, 0.0, 0.004, 0.0, 0.0, 0.16, 0.2, 0.31, 0.9])
    info, _ = warm_up(tmp_path, ["model.sft_steps=50", "model.sft_eval_every=2", "model.sft_target_accuracy=0.3",
                                 "model.sft_patience=2"])
    assert info["stopped"] == "target" and info["sft_steps"] == 18


def test_warmup_stops_at_its_time_limit(tmp_path, scripted_accuracy):
    calls = scripted_accuracy([0.05, 0.05])
    info, out = warm_up(tmp_path, ["model.sft_steps=50", "model.sft_eval_every=10", "model.sft_target_accuracy=0.3",
                                   "model.sft_max_wall_s=1e-6"])
    assert info["stopped"] == "time" and info["sft_steps"] == 1 and info["curve"] == []
    assert len(calls) == 2  # a reading where it stopped, between checks; then the evaluation split
    assert "its time limit (model.sft_max_wall_s=1e-06)" in " ".join(out.split())


def test_a_warmup_the_clock_cut_short_is_not_reused(tmp_path, scripted_accuracy):
    """Stopped by time short of the target (a busy machine?), the cached warm-up is warmed up once more
    by the next process, then kept; one that ran its course (here: its step cap) is reused."""
    calls = scripted_accuracy([0.05] * 20)
    options = [*SMALL, f"model.cache_dir={tmp_path}", "model.sft_steps=4", "model.sft_eval_every=2",
               "model.sft_target_accuracy=0.3"]
    clocked = load_config(None, [*options, "model.sft_max_wall_s=1e-6"])
    path = models.resolve_model_path(clocked, Console(record=True))
    assert models.sft_info(path)["stopped"] == "time" and len(calls) == 2
    assert models.resolve_model_path(clocked, Console(record=True)) == path and len(calls) == 2  # its own run's
    models._WARMED_HERE.clear()  # as a later process finds it
    console = Console(record=True, width=300)
    assert models.resolve_model_path(clocked, console) == path and len(calls) == 4  # warmed up again
    assert "stopped on its time limit (model.sft_max_wall_s=1e-06) after 1 steps" in console.export_text()
    models._WARMED_HERE.clear()
    console = Console(record=True, width=300)
    assert models.resolve_model_path(clocked, console) == path and len(calls) == 4  # twice short: kept
    assert "short of its target 0.3, twice: used as it is" in console.export_text()
    capped = load_config(None, options)
    path = models.resolve_model_path(capped, Console(record=True))
    assert models.sft_info(path)["stopped"] == "steps" and len(calls) == 7  # two checks and the eval split
    models.resolve_model_path(capped, Console(record=True))
    assert len(calls) == 7  # reused


def test_warmup_that_hits_its_cap_says_so(tmp_path, scripted_accuracy):
    scripted_accuracy([0.05] * 10)
    info, out = warm_up(tmp_path, ["model.sft_steps=4", "model.sft_eval_every=2", "model.sft_target_accuracy=0.3"])
    assert info["sft_steps"] == 4 and info["reached_target"] is False and info["stopped"] == "steps"
    out = " ".join(out.split())
    assert "its step cap (model.sft_steps=4)" in out and "raise model.sft_steps" in out


def test_target_zero_trains_every_step_without_checks(tmp_path, scripted_accuracy):
    calls = scripted_accuracy([0.0, 0.0])
    info, _ = warm_up(tmp_path, ["model.sft_steps=3", "model.sft_target_accuracy=0"])
    assert info["sft_steps"] == 3 and info["curve"] == [] and info["stopped"] == "steps"
    assert [n for n, _ in calls] == [8, 16]  # one reading at the end of each set, none along the way


def test_checks_generate_no_further_than_the_longest_solution(tmp_path, scripted_accuracy):
    calls = scripted_accuracy([0.5, 0.5])
    cfg = load_config(None, [*SMALL, "rollout.max_new_tokens=48", "model.sft_steps=2", "model.sft_eval_every=2"])
    _, check_rows = models.sft_split(models.load_task(cfg).train_rows, 8)
    info, _ = warm_up(tmp_path, ["rollout.max_new_tokens=48", "model.sft_steps=2", "model.sft_eval_every=2"])
    longest = max(len(r["solution"]) for r in check_rows)  # one token per character, plus EOS
    assert calls == [(8, longest + 1), (16, 48)] and longest + 1 < 48 and info["check_new_tokens"] == longest + 1


def test_a_prompt_too_long_for_the_model_fails_before_the_warm_up(tmp_path, monkeypatch):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "1+1=" * (100 if i else 300), "answer": "2", "solution": "#2"})
                            + "\n" for i in range(40)))
    monkeypatch.setattr(models, "sft", lambda *a, **k: pytest.fail("the warm-up ran"))
    cfg = load_config(None, [f"data.train_path={data}", f"model.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="exceeds the model's context of 1024 tokens"):
        models.build_embedded_sft(cfg, tmp_path / "m", Console(quiet=True))


def test_micro_batches_hold_every_row_once_and_give_the_batch_gradient(tokenizer):
    rows, _ = make_splits(0, 2, 12, 4)
    rows = [dict(r, prompt=r["prompt"] * (1 + i % 4)) for i, r in enumerate(rows)]  # lengths 14 to 56 characters
    parts = micro_batches(tokenizer, rows, max_tokens=200)
    lengths = [int(n) for b in parts for n in b["attention_mask"].sum(1)]
    assert len(parts) > 2 and sorted(lengths) == lengths  # shortest first
    assert sorted(lengths) == sorted(len(r["prompt"]) + len(r["solution"]) + 2 for r in rows)  # <bos>, <eos>
    assert all(b["input_ids"].numel() <= 200 or len(b["input_ids"]) == 1 for b in parts)
    assert sum(b["loss_mask"].sum() for b in parts) == sum(len(r["solution"]) + 1 for r in rows)

    def gradient(batches):
        model = build_model(tokenizer, seed=0)
        loss = sft_backward(model, batches)
        return loss, torch.cat([p.grad.flatten() for p in model.parameters()])

    whole_loss, whole = gradient(micro_batches(tokenizer, rows, max_tokens=10**6))
    split_loss, split = gradient(parts)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)


def test_cache_dir_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_config(None, []).model.cache_dir == default_cache_dir() == str(tmp_path / "xdg" / "frugalrl")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(None, []).model.cache_dir == str(tmp_path / "home" / ".cache" / "frugalrl")
    assert load_config(None, ["model.cache_dir=~/models"]).model.cache_dir == str(tmp_path / "home" / "models")
    assert load_config(None, ["model.cache_dir=here"]).model.cache_dir == "here"  # as given: relative to the run
    assert models.embedded_sft_path(load_config(None, [])).parent == tmp_path / "home" / ".cache" / "frugalrl"


def test_the_tests_cache_is_not_the_users():
    assert not Path(default_cache_dir()).resolve().is_relative_to(Path.home().resolve() / ".cache")


def test_sft_stops_when_on_step_says_so(tokenizer):
    rows, _ = make_splits(0, 2, 16, 4)
    seen = []
    steps, loss = sft(build_model(tokenizer), tokenizer, rows, steps=10, batch_size=4,
                      on_step=lambda step, loss: seen.append(step) or step == 3)
    assert (steps, seen) == (3, [1, 2, 3]) and loss == loss  # finite, not the NaN of no step


def test_warmup_options_key_the_cache():
    base = load_config(None, [])
    assert models.embedded_sft_path(base) != models.embedded_sft_path(
        load_config(None, ["model.sft_target_accuracy=0.4"]))
    for option in ("model.sft_eval_size=128", "model.sft_patience=2", "model.sft_max_wall_s=60"):
        assert models.embedded_sft_path(base) != models.embedded_sft_path(load_config(None, [option]))


def test_bench_warmup(tmp_path, capsys):
    rc = main(["bench", "warmup", "bench.seeds=[0,1]", "bench.pools=[80,60]", f"bench.results_dir={tmp_path}",
               f"model.cache_dir={tmp_path / 'cache'}",
               *SMALL, "model.sft_steps=4", "model.sft_eval_every=2", "model.sft_target_accuracy=0.5"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    page = (tmp_path / "warmup.md").read_text()
    assert "frugalrl bench warmup" in page and (tmp_path / "warmup.png").is_file()
    assert page.count("steps: short of it") == 4  # a random model reaches no 0.5 in 4 steps
    assert summary["warmup_reached_target_frac"] == 0.0
    assert 0.0 <= summary["warmup_eval_accuracy_min"] <= summary["warmup_eval_accuracy_mean"] <= 1.0


def test_first_metrics_row_says_what_stopped_the_warm_up(tmp_path):
    from frugalrl.trainer import train

    cfg = load_config(None, [*SMALL, "model.sft_steps=2", "model.sft_target_accuracy=0", "max_steps=1",
                             "eval_every=0", "rollout.batch_prompts=4", f"model.cache_dir={tmp_path / 'cache'}",
                             f"output_dir={tmp_path / 'run'}"])
    train(cfg, Console(quiet=True))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["sft_steps"], first["sft_stopped"]) == (2, "steps")


TINY_RUN = [*SMALL, "model.sft_steps=2", "model.sft_eval_every=1", "max_steps=2", "rollout.batch_prompts=4",
            "rollout.group_size=2", "eval.pass_k=0"]


def test_bench_demo(tmp_path):
    rc = main(["bench", "demo", "bench.seeds=[3]", f"bench.results_dir={tmp_path / 'results'}",
               f"bench.work_dir={tmp_path / 'work'}", *TINY_RUN, "eval_every=1", "bench.min_gain=0.5"])
    assert rc == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    page = (tmp_path / "results" / "demo.md").read_text()
    assert "frugalrl bench demo" in page and "| 3 | 2, " in page  # seed 3 warmed up 2 steps
    assert summary["demo_gain_clear_frac"] == 0.0  # 2 RL steps of a random model gain no 0.5
    assert summary["demo_gain_min"] <= summary["demo_gain_mean"] and summary["demo_wall_s_max"] > 0
    assert (tmp_path / "work" / "seed3" / "metrics.jsonl").is_file()
    assert list((tmp_path / "work" / "seed3-cache").glob("embedded-*/sft_info.json"))  # its own, fresh cache


def test_bench_tasks(tmp_path):
    rc = main(["bench", "tasks", "bench.tasks=[basic_arithmetic]", f"bench.results_dir={tmp_path / 'results'}",
               f"bench.work_dir={tmp_path / 'work'}", "bench.budget_s=1", *TINY_RUN, "data.size=80"])
    assert rc == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    page = (tmp_path / "results" / "tasks.md").read_text()
    assert "reasoning_gym" in page and "max_steps=2 eval_every=0" in page and "`basic_arithmetic`" in page
    assert summary["tasks_within_budget_frac"] == 0.0 and summary["tasks_wall_s_max"] > 1  # no process starts in 1 s
