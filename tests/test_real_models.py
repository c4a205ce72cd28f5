"""Real models and data: HF model directories with chat templates, LoRA, data files, reward functions.

Nothing is downloaded: the model is a tiny random Qwen2 with the embedded character tokenizer
and a small chat template, saved to a temporary directory as a user's model would be.
"""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from frugalrl import checkpoint, fastgen, lora
from frugalrl.cli import main
from frugalrl.config import ConfigError, load_config
from frugalrl.data import Task, load_task
from frugalrl.datafiles import read_rows
from frugalrl.embedded import build_tokenizer
from frugalrl.models import load_policy
from frugalrl.prompts import chat_prompt, fill_template, format_task
from frugalrl.rewards import CombinedReward, build_reward
from frugalrl.trainer import train
from frugalrl.update import reference_policy

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# LoRA comes from peft, an optional extra (in `make test`'s environment)
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")

# What a chat model's template does, in a few characters: a BOS, "role: content" lines, and the
# assistant's turn opened when asked.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A randomly initialised 2-layer Qwen2 and a tokenizer with a chat template, in HF format."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("qwen")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _gsm8k(path, n=24):
    """GSM8K-style rows: a question, and an answer that is a worked solution ending in "#### k" or
    the bare number."""
    with open(path, "w") as f:
        for i in range(n):
            k = i % 7
            answer = f"{i} - {i - k} = {k}.\n#### {k}" if i % 2 else str(k)
            f.write(json.dumps({"question": f"Tom has {i} apples and eats {i - k}. How many are left?",
                                "answer": answer}) + "\n")
    return path


def _wrapped(qwen_dir, **options):
    model = AutoModelForCausalLM.from_pretrained(qwen_dir)
    cfg = load_config(overrides=["lora.r=4", *(f"lora.{k}={v}" for k, v in options.items())])
    return lora.wrap(model, cfg.lora)


def _perturb_adapter(model, seed=1):
    """Random adapter weights (peft starts B at 0, where the adapter changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- end to end ----------------------------------------------------------------------------------

@needs_peft
def test_train_gsm8k_jsonl_with_lora_and_math_reward(tmp_path, qwen_dir):
    data = _gsm8k(tmp_path / "gsm8k.jsonl")
    run_dir = tmp_path / "run"
    assert main(["train", f"model.name_or_path={qwen_dir}", f"data.train_path={data}", "data.prompt_field=question",
                 "data.prompt_template={prompt} Put the final answer in \\boxed{{}}.",
                 "data.system_prompt=Answer briefly.", "data.max_prompt_tokens=120", "reward.funcs=[math]",
                 "lora.r=4", "algo.kl_coef=0.05", "model.gradient_checkpointing=true", f"output_dir={run_dir}",
                 "max_steps=2", "save_every=2", "eval_every=2", "eval.pass_k=0", "data.eval_size=2",
                 "rollout.batch_prompts=4", "rollout.group_size=2", "rollout.max_new_tokens=6", "threads=1"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    assert len(steps) == 2 and all("reward/math_reward/mean" in r and "kl_ref" in r for r in steps)
    # 2 of 24 prompts held out; the prompt (system turn, template, question) is 110-114 characters
    assert (steps[0]["train_prompts"], steps[0]["eval_prompts"], steps[0]["prompts_dropped"]) == (22, 2, 0)
    # The final model is a plain merged Qwen2; the checkpoint holds the adapter, for resuming.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert type(model) is Qwen2ForCausalLM and fastgen.supports(model)
    assert not any("lora" in name for name in model.state_dict())
    assert (run_dir / "checkpoint-0000002" / "adapter_model.safetensors").is_file()
    # resuming loads the adapter back into a freshly wrapped model
    assert main(["train", "--resume", str(run_dir), "max_steps=3"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2, 3]


@needs_peft
@pytest.mark.parametrize("preset, fields", [("qwen2.5-0.5b-gsm8k", {}),
                                             ("qwen2.5-1.5b-math-lora", {"question": "problem"})])
def test_real_model_presets_run_as_written(tmp_path, qwen_dir, preset, fields):
    """The two presets for real models, on the tiny model and a GSM8K-style file: only paths and
    sizes change, so their data fields, templates, rewards and LoRA options are the ones tested."""
    data = tmp_path / "d.jsonl"
    rows = [json.loads(line) for line in _gsm8k(tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps({fields.get(k, k): v for k, v in r.items()}) + "\n" for r in rows))
    cfg = load_config(CONFIGS / f"{preset}.yaml", [
        f"model.name_or_path={qwen_dir}", f"data.train_path={data}", f"output_dir={tmp_path / 'run'}",
        "model.dtype=float32", "max_steps=1", "save_every=0", "eval_every=0", "data.eval_size=2",
        "rollout.batch_prompts=2", "rollout.max_new_tokens=6", "train.micro_batch=4", "threads=1",
        *([f"data.eval_path={data}"] if load_config(CONFIGS / f"{preset}.yaml").data.eval_path else [])])
    assert cfg.reward.funcs[0] == "math" and cfg.max_wall_s == 0
    train(cfg, Console(quiet=True))
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")) is Qwen2ForCausalLM


# --- data files ----------------------------------------------------------------------------------

def test_data_files_jsonl_csv_and_chat_messages(tmp_path):
    _gsm8k(tmp_path / "d.jsonl", n=3)
    rows = read_rows(tmp_path / "d.jsonl", prompt_field="question")
    assert rows[1]["prompt"].startswith("Tom has 1 ") and rows[1]["answer"].endswith("#### 1")
    assert "question" not in rows[0] and len(rows[0]["id"]) == 12

    (tmp_path / "d.csv").write_text('id,problem,solution,level\n7,"What is 2+3,\nexactly?",5,easy\n8,1+1=,2,\n')
    rows = read_rows(tmp_path / "d.csv", prompt_field="problem", answer_field="solution")
    assert [(r["id"], r["prompt"], r["answer"], r["level"]) for r in rows] == [
        ("7", "What is 2+3,\nexactly?", "5", "easy"), ("8", "1+1=", "2", None)]

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat, "answer": 6}) + "\n")
    (row,) = read_rows(tmp_path / "c.jsonl")
    assert row["prompt"] == "and 3+3?" and row["messages"] == chat[:4]  # the conversation up to the prompt


@pytest.mark.parametrize("name, text, where, what", [
    ("d.jsonl", '{"question": "a", "answer": 1}\n{"question": "b"}\n', "d.jsonl, line 2", 'no "answer"'),
    ("d.jsonl", '{"q": "a", "answer": 1}\n', "d.jsonl, line 1", "data.prompt_field"),
    ("d.jsonl", '{"question": [{"role": "system", "content": "x"}], "answer": 1}\n', "line 1", "no user message"),
    ("d.csv", "question,answer\nfine,1\n,2\n", "d.csv, line 3", "is empty"),
    ("d.csv", "question,answer\nfine,1,extra\n", "d.csv, line 2", "more cells"),
    ("d.txt", "question,answer\n", "d.txt", "unknown format"),
])
def test_a_bad_row_names_file_and_line(tmp_path, name, text, where, what):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as e:
        read_rows(tmp_path / name, prompt_field="question")
    assert where in str(e.value) and what in str(e.value) and len(str(e.value).splitlines()) == 1


def test_parquet_without_a_reader_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    for module in ("pyarrow", "pyarrow.parquet", "pandas", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ValueError, match=r"d\.parquet.*pip install pyarrow"):
        read_rows(tmp_path / "d.parquet")


def test_parquet_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"question": ["1+1=", "2+2="], "answer": [2, None]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet, row 1.*no \"answer\""):
        read_rows(tmp_path / "d.parquet", prompt_field="question")


def test_dataset_directory_takes_the_named_split(tmp_path, monkeypatch):
    """A ``datasets`` directory (faked: the real library is optional) with train and test splits."""
    splits = {"train": [{"prompt": "1+1=", "answer": 2}], "test": [{"prompt": "3+3=", "answer": 6}, {"answer": 1}]}
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: splits
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert [r["prompt"] for r in read_rows(tmp_path)] == ["1+1="]
    with pytest.raises(ValueError, match=r"\(split test\), row 1: no \"prompt\""):
        read_rows(tmp_path, splits=("test", "validation"))
    with pytest.raises(ValueError, match="none of them validation"):
        read_rows(tmp_path, splits=("validation",))


def test_prompt_template_fills_columns_and_names_missing_ones():
    row = {"id": "a", "prompt": "2+2?", "answer": "4", "level": "easy"}
    assert fill_template("[{level}] {prompt} \\boxed{{}}", row)["prompt"] == "[easy] 2+2? \\boxed{}"
    with pytest.raises(ValueError, match=r"\{topic\}.*answer, id, level, prompt"):
        fill_template("{topic}: {prompt}", row)
    cfg = load_config(overrides=["data.train_path=x.jsonl", "data.prompt_template={nope}"])
    assert cfg.data.prompt_template == "{nope}"


# --- prompts and chat templates -------------------------------------------------------------------

def test_chat_prompt_with_system_history_and_one_bos(qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    history = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user"}]
    text = chat_prompt(tokenizer, "and 3+3?", history, system_prompt="Be brief.")
    assert text == "system: Be brief.\nuser: 2+2?\nassistant: 4\nuser: and 3+3?\nassistant:"
    assert tokenizer(text)["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's BOS was removed


def test_format_task_chat_modes_and_prompt_length_limit(qwen_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    rows = [{"id": str(n), "prompt": "x" * n, "answer": "1"} for n in (5, 30)]
    task = Task(rows, rows[:1], None)
    data = load_config(overrides=["data.max_prompt_tokens=25"]).data
    formatted, dropped = format_task(task, tokenizer, data)  # auto: the tokenizer has a template
    assert [r["prompt"] for r in formatted.train_rows] == ["user: xxxxx\nassistant:"] and dropped == {"train": 1,
                                                                                                   "eval": 0}
    off = load_config(overrides=["data.chat_template=off"]).data
    assert format_task(task, tokenizer, off)[0].train_rows == rows
    tokenizer.chat_template = None
    for overrides, message in ((["data.chat_template=on"], "no chat template"),
                               (["data.system_prompt=Hi"], "data.system_prompt needs a chat template"),
                               (["data.max_prompt_tokens=3"], "every training prompt is longer")):
        with pytest.raises(ValueError, match=message):
            format_task(task, tokenizer, load_config(overrides=overrides).data)


def test_load_task_reads_a_data_file_with_fields_and_template(tmp_path):
    _gsm8k(tmp_path / "train.jsonl", n=4)
    (tmp_path / "eval.csv").write_text("q,a\n5+5=,10\n")
    cfg = load_config(overrides=[f"data.train_path={tmp_path / 'train.jsonl'}", "data.prompt_field=question",
                                 f"data.eval_path={tmp_path / 'eval.csv'}", "data.prompt_template=Q: {prompt}"])
    with pytest.raises(ValueError, match=r"eval\.csv, line 2: no \"question\""):
        load_task(cfg)
    (tmp_path / "eval.csv").write_text("question,answer\n5+5=,10\n")
    task = load_task(cfg)
    assert task.eval_rows[0]["prompt"] == "Q: 5+5=" and all(r["prompt"].startswith("Q: Tom") for r in task.train_rows)


# --- rewards ---------------------------------------------------------------------------------------

def test_reward_funcs_are_combined_with_weights_and_per_function_means():
    cfg = load_config(overrides=["reward.funcs=[math, arithmetic]", "reward.weights=[1, 0.5]"])
    reward = build_reward(cfg.reward, default=None)
    assert isinstance(reward, CombinedReward)
    totals = reward(["q", "q"], ["so \\boxed{42}", "6*7=42#42"], answer=["#### 42", "42"])
    assert totals == [1.0, 1.5]  # math reads both answers; arithmetic only the one after '#'
    assert reward.last_stats["reward/math_reward/mean"] == 1.0
    assert reward.last_stats["reward/arithmetic_reward/mean"] == 0.5
    assert build_reward(load_config().reward, default=len) is len  # no funcs: the task's own reward


def test_reward_config_is_checked():
    with pytest.raises(ConfigError, match="one weight per function"):
        load_config(overrides=["reward.funcs=[math]", "reward.weights=[1, 2]"])
    with pytest.raises(ValueError, match="no_such_module"):
        build_reward(load_config(overrides=["reward.funcs=[no_such_module:f]"]).reward, default=None)


def test_user_reward_file_and_error_policy(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def length(prompts, completions, **kw):\n"
                                            "    return [len(c) / 10 for c in completions]\n"
                                            "def broken(prompts, completions, **kw):\n"
                                            "    raise RuntimeError('oops')\n")
    funcs = f"reward.funcs=[{tmp_path / 'my_rewards.py'}:length, {tmp_path / 'my_rewards.py'}:broken]"
    reward = build_reward(load_config(overrides=[funcs, "reward.on_error=zero"]).reward, default=None)
    assert reward(["p"], ["12345"], answer=["1"]) == [0.5] and reward.last_stats["reward_errors"] == 1
    strict = build_reward(load_config(overrides=[funcs]).reward, default=None)
    with pytest.raises(ValueError, match="'broken' raised RuntimeError: oops"):
        strict(["p"], ["12345"], answer=["1"])


# --- LoRA ------------------------------------------------------------------------------------------

@needs_peft
def test_lora_reference_is_the_base_model_with_the_adapter_off(qwen_dir):
    base = AutoModelForCausalLM.from_pretrained(qwen_dir)
    model = _wrapped(qwen_dir, target_modules="[q_proj, v_proj]")
    ids = torch.tensor([[5, 6, 7, 8]])
    _perturb_adapter(model)
    model.train()
    reference = reference_policy(model)
    assert isinstance(reference, lora.AdapterDisabled)  # no second copy of the weights
    torch.testing.assert_close(_logits(reference, ids), _logits(base, ids))
    assert not torch.allclose(_logits(model, ids), _logits(base, ids))
    assert model.training  # the reference's call left the policy in training mode
    assert fastgen.supports(model)  # rollouts of a LoRA policy take the fast path, its adapter merged out of place
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@needs_peft
def test_lora_save_merged_or_adapter_and_resume_weights(tmp_path, qwen_dir):
    model = _wrapped(qwen_dir)
    _perturb_adapter(model)
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = _logits(model, ids)
    checkpoint.save_model(tmp_path / "merged", model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged) is Qwen2ForCausalLM
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-4)
    assert lora.is_lora(model)  # merging worked on a copy

    checkpoint.save_model(tmp_path / "adapter", model, tokenizer, lora_save="adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(qwen_dir.resolve())
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "adapter"), ids), expected)
    # a checkpoint holds the adapter alone; loading it into a fresh wrapped model restores it
    fresh = _wrapped(qwen_dir)
    checkpoint.load_model_weights(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh, ids), expected)


def test_cuda_without_a_gpu_is_a_clear_error(qwen_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="model.device=cuda, but torch sees no CUDA GPU"):
        load_policy(load_config(overrides=[f"model.name_or_path={qwen_dir}", "model.device=cuda"]))


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["lora.r=4", "algo.kl_coef=0.1"],
                                   ["algo.loss=ppo", "algo.estimator=reinforce", "algo.reinforce_baseline=none",
                                    "rollout.group_size=1", "train.mini_batches=2"],
                                   ["algo.estimator=astar", "rollout.group_size=1", "rollout.temperature=1",
                                    "algo.vstar_n=2"]])
def test_training_on_the_gpu(tmp_path, qwen_dir, extra):
    """Every tensor the update combines ends up on the policy's device (rewards and advantages come
    from the CPU), with fastgen, HF generate (LoRA), the critic and the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data = _gsm8k(tmp_path / "gsm8k.jsonl")
    cfg = load_config(overrides=[
        f"model.name_or_path={qwen_dir}", f"data.train_path={data}", "data.prompt_field=question",
        "reward.funcs=[math]", f"output_dir={tmp_path / 'run'}", f"model.cache_dir={tmp_path / 'cache'}",
        "model.device=cuda", "max_steps=2", "eval_every=2", "eval.pass_k=2", "data.eval_size=2",
        "rollout.batch_prompts=4", "rollout.max_new_tokens=6", *extra])
    assert train(cfg, Console(quiet=True)).steps == 2


@needs_peft
def test_lora_bad_target_modules_is_a_clear_error(qwen_dir):
    with pytest.raises(ValueError, match=r"lora.target_modules=\['nope'\].*all-linear"):
        _wrapped(qwen_dir, target_modules="[nope]")
