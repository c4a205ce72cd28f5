"""report_to trackers, plain progress lines in a log, and `frugalrl compare`."""

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from frugalrl import cli, tracking
from frugalrl.compare import compare
from frugalrl.config import ConfigError, load_config
from frugalrl.recovery import read_metrics

INSTALLED = [name for name, (_, modules) in tracking.BACKENDS.items()
             if all(importlib.util.find_spec(m) for m in modules)]
RUN = ["max_steps=3", "eval_every=2", "rollout.batch_prompts=4", "data.eval_size=8", "eval.pass_k=2"]


def _expected(rows: list[dict], rename=lambda key: key) -> dict:
    """(key, step) -> value of every number metrics.jsonl holds; a key logged twice at one step
    (wall_s and samples: training and evaluation rows) must agree."""
    out = {}
    for row in rows:
        for key, value in tracking._scalars(row).items():
            assert out.setdefault((rename(key), row["step"]), value) == value
    return out


def _wandb_history(run_dir) -> list[tuple[int, dict]]:
    """(step, {key: value}) of each history record of the offline run's .wandb file.

    The file is a LevelDB-style log (32 KiB blocks of records, each a 7-byte header: CRC32,
    length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) of wandb's own protobuf Records; wandb ships no
    Python reader for it, so the framing is unpacked here and the records parsed with wandb's
    protobuf definitions."""
    from wandb.proto import wandb_internal_pb2

    [path] = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data, block, pos, chunks, history = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                history.append((record.history.step.num,
                                {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item}))
    return history


def _numbers(items: dict) -> dict:
    """A tracker's logged values without its own bookkeeping (_step, timestamp) and the example table."""
    return {k: v for k, v in items.items() if not k.startswith(("_", tracking.EXAMPLES_KEY)) and k != "timestamp"}


@pytest.mark.skipif(not INSTALLED, reason="no tracker installed (pip install 'frugalrl[tensorboard]' ...)")
def test_trackers_get_what_metrics_jsonl_gets(toy_run, tmp_path):
    """A 3-step run redirected to a file: every tracker reads back metrics.jsonl's numbers at the
    same steps, an example table at each evaluation, and the log has plain step lines."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    env.update(TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1")  # W&B: offline by default
    log = tmp_path / "train.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "frugalrl.cli", "train", *toy_run, *RUN, f"output_dir={run_dir}",
                        f"report_to=[{','.join(INSTALLED)}]", "project=test", "run_name=tiny"],
                       stdout=out, stderr=subprocess.PIPE, env=env, cwd=tmp_path, check=True, timeout=600)
    rows = read_metrics(run_dir / "metrics.jsonl")
    expected = _expected(rows)
    eval_steps = [r["step"] for r in rows if "eval_accuracy" in r]
    assert eval_steps == [0, 2, 3] and len(expected) > 40

    lines = [line for line in log.read_text().splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "held-out accuracy" in lines[-1] and "s/step" in lines[-1] and lines[-1].endswith("0:00 left")

    if "tensorboard" in INSTALLED:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
        assert got == pytest.approx(expected, rel=1e-6)  # float32 in event files
        assert sorted(e.step for e in events.Tensors(f"{tracking.EXAMPLES_KEY}/text_summary")) == eval_steps

    if "wandb" in INSTALLED:
        got, tables = {}, []
        for step, items in _wandb_history(run_dir):
            got.update({(k, step): v for k, v in _numbers(items).items()})
            if f"{tracking.EXAMPLES_KEY}/_type" in items:
                tables.append((step, items[f"{tracking.EXAMPLES_KEY}/nrows"]))
        assert got == expected
        assert tables == [(step, 4) for step in eval_steps]

    if "trackio" in INSTALLED:
        os.environ["TRACKIO_DIR"] = env["TRACKIO_DIR"]  # read where the run wrote: trackio reads it on import
        assert "trackio" not in sys.modules, "trackio was imported before TRACKIO_DIR was set"
        from trackio.sqlite_storage import SQLiteStorage

        logs = SQLiteStorage.get_logs("test", "tiny")
        got = {(k, log["step"]): v for log in logs for k, v in _numbers(log).items() if k != "step"}
        assert got == expected
        tables = [(log["step"], log[tracking.EXAMPLES_KEY]["_value"]) for log in logs if tracking.EXAMPLES_KEY in log]
        assert [step for step, _ in tables] == eval_steps
        assert sorted(tables[0][1][0]) == sorted(tracking.EXAMPLE_COLUMNS) and len(tables[0][1]) == 4

    if "mlflow" in INSTALLED:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        [run] = client.search_runs([client.get_experiment_by_name("test").experiment_id])
        assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
        got = {(m.key, m.step): m.value for key in run.data.metrics
               for m in client.get_metric_history(run.info.run_id, key)}
        assert got == _expected(rows, rename=lambda key: key.replace("@", "_at_"))
        assert [a.path for a in client.list_artifacts(run.info.run_id, tracking.EXAMPLES_KEY)] == \
            [f"{tracking.EXAMPLES_KEY}/step_{step:07d}.json" for step in eval_steps]


def test_plain_lines_every_log_every_steps(toy_run, tmp_path, capsys):
    """stdout not a terminal (here captured): a line at the first step, every log_every steps and the last."""
    assert cli.main(["train", *toy_run, "max_steps=5", "log_every=2", "eval_every=4", "rollout.batch_prompts=2",
                     "data.eval_size=4", "eval.pass_k=0", f"output_dir={tmp_path / 'run'}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/5", "2/5", "4/5", "5/5"]
    assert "held-out accuracy 0" in lines[0] and "(step 0)" in lines[0] and "(step 4)" in lines[2]
    assert all("s/step" in line and line.endswith(" left") for line in lines)


@pytest.mark.parametrize("value, names", [("none", []), ("[]", []), ("tensorboard", ["tensorboard"]),
                                          ("[tensorboard, tensorboard]", ["tensorboard"])])
def test_report_to_forms(value, names):
    pytest.importorskip("tensorboard")
    assert tracking.backends(load_config(None, [f"report_to={value}"]).report_to) == names


def test_report_to_unknown_or_missing_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'wandbb'.*did you mean 'wandb'"):
        load_config(None, ["report_to=wandbb"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"report_to=wandb needs wandb.*pip install 'frugalrl\[wandb\]'"):
        load_config(None, ["report_to=[wandb]"])


def _write_run(path, rows: list[dict], config: dict | None, torn: str = "") -> None:
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    if config is not None:
        (path / "config.yaml").write_text(json.dumps(config))  # JSON is YAML


def test_compare_numbers_of_a_finished_and_an_old_unfinished_run(tmp_path):
    """Final/best accuracy, the cost of reaching --target and the filter's savings; a run still
    being written (torn last line) and one from before eval rows had samples/wall_s, without config."""
    a = [{"step": 0, "wall_s": 0, "samples": 0, "eval_accuracy": 0.1},
         {"step": 1, "reward_mean": 0.2, "wall_s": 10.0, "samples": 100, "filtered_frac": 0.5},
         {"step": 2, "reward_mean": 0.4, "wall_s": 20.0, "samples": 200, "filtered_frac": 0.25},
         {"step": 2, "wall_s": 20.0, "samples": 200, "eval_accuracy": 0.5},
         {"step": 3, "reward_mean": 0.5, "wall_s": 30.0, "samples": 300, "filtered_frac": 0.0},
         {"step": 3, "wall_s": 30.0, "samples": 300, "eval_accuracy": 0.4}]
    b = [{"step": 0, "eval_accuracy": 0.0},
         {"step": 1, "reward_mean": 0.1, "wall_s": 5.0, "samples": 64},
         {"step": 1, "eval_accuracy": 0.3}]
    _write_run(tmp_path / "a", a, {"algo": {"estimator": "kae"}, "data": {"sticky_steps": 4}, "output_dir": "a"})
    _write_run(tmp_path / "b", b, None, torn='{"step": 2, "rew')
    out = tmp_path / "cmp.png"
    text = compare([tmp_path / "a", tmp_path / "b"], x="samples", out=out, target=0.3)
    assert out.stat().st_size > 10_000
    row_a, row_b = [line for line in text.splitlines() if line.startswith("| kae") or line.startswith("| b")]
    cells_a = [c.strip() for c in row_a.split("|")[2:-1]]
    assert cells_a == ["3", "300", "30", "0.400 (3)", "0.500 (2)", "200", "20", "75 (25%)"]
    cells_b = [c.strip() for c in row_b.split("|")[2:-1]]
    assert cells_b == ["1", "64", "5", "0.300 (1)", "0.300 (1)", "64", "5", "-"]
    # no --target: the best accuracy every run reached (b's 0.3)
    assert "completions to accuracy 0.300" in compare([tmp_path / "a", tmp_path / "b"], out=out)


def test_compare_cli_on_two_tiny_runs(toy_run, tmp_path, capsys):
    """Two real runs that differ in estimator and group size: a PNG, a legend naming what differs,
    and the table's numbers as metrics.jsonl has them."""
    runs = []
    for estimator, group in (("rloo", 2), ("grpo", 4)):
        runs.append(tmp_path / estimator)
        assert cli.main(["train", *toy_run, *RUN, f"algo.estimator={estimator}", f"rollout.group_size={group}",
                         f"output_dir={runs[-1]}"]) == 0
    capsys.readouterr()
    out = tmp_path / "compare.png"
    assert cli.main(["compare", *map(str, runs), "--out", str(out), "--x", "wall_s", "--target", "0"]) == 0
    table = capsys.readouterr().out
    assert out.stat().st_size > 10_000
    for run, label in zip(runs, ("rloo, rollout.group_size=2", "grpo, rollout.group_size=4")):
        rows = read_metrics(run / "metrics.jsonl")
        last = [r for r in rows if "reward_mean" in r][-1]
        evals = [r for r in rows if "eval_accuracy" in r]
        best = max(evals, key=lambda r: r["eval_accuracy"])
        skipped = sum(r["filtered_frac"] * (r["samples"] - p["samples"]) for p, r in
                      zip([{"samples": 0}] + rows, rows) if "filtered_frac" in r)
        [line] = [line for line in table.splitlines() if line.startswith(f"| {label} (")]
        assert [c.strip() for c in line.split("|")[2:-1]] == [
            "3", str(last["samples"]), f"{last['wall_s']:.0f}", f"{evals[-1]['eval_accuracy']:.3f} (3)",
            f"{best['eval_accuracy']:.3f} ({best['step']})", "0", "0",
            f"{round(skipped)} ({round(skipped) / last['samples']:.0%})"]


def test_compare_rejects_a_directory_without_metrics(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
