import json
import os
import shutil
import tempfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from frugalrl.embedded import build_tokenizer

torch.set_num_threads(1)

# The tests never write into the user's cache: model.cache_dir defaults to $XDG_CACHE_HOME/frugalrl,
# and XDG_CACHE_HOME is a directory of this session, set before any config is made (child
# processes inherit it) and removed at the end.
_CACHE_HOME = tempfile.mkdtemp(prefix="frugalrl-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised 2-layer Llama with the embedded tokenizer, saved in HF format."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def toy_run(tmp_path, tiny_model_dir):
    """Run-config options for a toy task on the tiny model: 64 prompts; reward = the share of
    '7's in the completion, so that a random model gets rewards that vary between samples."""
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}=", "answer": "7"}) + "\n" for i in range(64)))
    reward = tmp_path / "sevens.py"
    reward.write_text("def sevens(prompts, completions, **columns):\n"
                      "    return [c.count('7') / max(1, len(c)) for c in completions]\n")
    return [f"model.name_or_path={tiny_model_dir}", f"data.train_path={data}", f"reward.funcs=[{reward}:sevens]",
            "rollout.max_new_tokens=8"]
