"""Data loading, prompt schedule, atomic checkpoints and the command line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from frugalrl import checkpoint
from frugalrl.cli import COMMANDS, main
from frugalrl.config import ConfigError
from frugalrl.data import PromptSampler
from frugalrl.datafiles import read_rows


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": 2}\n{"prompt": oops\n')
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2"):
        read_rows(path)


def test_read_jsonl_missing_field_and_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": 2}\n\n{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"line 3.*prompt"):
        read_rows(path)
    path.write_text('{"prompt": "1+1=", "answer": 2}\n')
    (row,) = read_rows(path)
    assert row["answer"] == "2" and len(row["id"]) == 12


def test_sampler_sticky_and_epochs():
    rows = [{"id": str(i)} for i in range(10)]
    s = PromptSampler(rows, batch_prompts=3, sticky_steps=2, seed=0)
    batches = [tuple(r["id"] for r in s.next()) for _ in range(8)]
    assert batches[0] == batches[1] and batches[2] == batches[3] and batches[0] != batches[2]
    # an epoch of 3 batches of 3 covers 9 distinct prompts
    assert len(set(batches[0] + batches[2] + batches[4])) == 9


def test_sampler_state_round_trip():
    rows = [{"id": str(i)} for i in range(10)]
    a = PromptSampler(rows, 3, 2, seed=1)
    for _ in range(5):
        a.next()
    b = PromptSampler(rows, 3, 2, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.next() for _ in range(7)] == [b.next() for _ in range(7)]


def test_sampler_rejects_batch_larger_than_data():
    with pytest.raises(ValueError, match="batch_prompts"):
        PromptSampler([{"id": "a"}], batch_prompts=2)


def test_atomic_dir_keeps_previous_on_crash(tmp_path):
    target = tmp_path / "ckpt"
    with checkpoint.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("good")
    assert checkpoint.is_complete(target)
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-save")
    assert (target / "a.txt").read_text() == "good" and checkpoint.is_complete(target)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_corrupt_checkpoint_is_skipped(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, model, tokenizer, opt, sched, {"step": step})
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-0000002"
    with open(tmp_path / "checkpoint-0000002" / "trainer_state.json", "a") as f:
        f.write(" ")  # no longer matches its manifest
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-0000001"
    state, tensors = checkpoint.load_training_state(tmp_path / "checkpoint-0000001")
    assert state == {"step": 1} and "optimizer" in tensors
    checkpoint.save_checkpoint(tmp_path, 3, model, tokenizer, opt, sched, {"step": 3}, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-0000003"]


def test_cli_help_lists_every_option(capsys):
    from frugalrl.config import field_specs

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for spec in field_specs():
        assert spec.describe() in out  # key, type, default, help line and allowed values


def test_cli_bad_key_is_one_line_error(capsys):
    assert main(["train", "estimator=kae"]) == 2
    err = capsys.readouterr().err.strip()
    assert "algo.estimator" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_malformed_jsonl_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{not json}\n')
    assert main(["train", f"data.train_path={path}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err


def test_console_script_help_lists_every_command():
    """`frugalrl --help` through the installed console script (next to this interpreter)."""
    script = Path(sys.executable).with_name("frugalrl")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for name, help_text in COMMANDS.items():
        assert re.search(rf"^ +{name} +{re.escape(help_text.split()[0])}", out, re.M), name


def test_cli_debug_shows_the_error_itself():
    with pytest.raises(ConfigError, match="algo.estimator"):
        main(["train", "--debug", "estimator=kae"])


def test_key_value_pairs_on_either_side_of_config():
    from frugalrl.cli import _parse

    args = _parse(["bench", "rollout", "a=0", "--config", "c.yaml", "b=1", "c=2"])
    assert (args.bench, args.config, args.overrides) == ("rollout", "c.yaml", ["a=0", "b=1", "c=2"])
    assert _parse(["train", "--config", "c.yaml", "max_steps=3"]).overrides == ["max_steps=3"]
    for wrong in (["bench", "rollout", "--config", "c.yaml", "--bogus"], ["bench", "rollout", "--config", "c.yaml",
                                                                          "word"]):
        with pytest.raises(SystemExit):
            _parse(wrong)
