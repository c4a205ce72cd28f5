"""The vLLM rollout adapter, against a fake engine that records what it is asked (vLLM itself needs
CUDA); the real engine is compared with in-process sampling where vLLM and a GPU exist."""

import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from frugalrl import lora
from frugalrl.config import load_config
from frugalrl.data import Task
from frugalrl.rollout import generate
from frugalrl.trainer import train
from frugalrl.vllm_rollout import VLLMRollout


class FakeLLM:
    """What VLLMRollout uses of ``vllm.LLM``, recording the calls. ``outputs``: the (token_ids,
    finish_reason[, stop_reason]) of each prompt of the next ``generate``; None = random tokens up
    to max_tokens."""

    def __init__(self, in_process=True, outputs=None, vocab=50):
        self.calls, self.loaded, self.outputs, self.vocab = [], {}, outputs, vocab
        self.prompts, self.params = [], None
        model = SimpleNamespace(load_weights=lambda ws: self.loaded.update((n, t.clone()) for n, t in ws))
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        executor = SimpleNamespace(driver_worker=self.worker) if in_process else SimpleNamespace()
        self.llm_engine = SimpleNamespace(model_executor=executor)

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self):
        self.calls.append("wake_up")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def collective_rpc(self, method, args=()):
        self.calls.append("collective_rpc")
        method(self.worker, *args)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append("generate")
        self.prompts, self.params = prompts, params
        scripted = self.outputs or [(torch.randint(4, self.vocab, (params["max_tokens"],)).tolist(), "length")
                                     for _ in prompts]
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=reason,
                                                         stop_reason=stop[0] if stop else None)])
                for ids, reason, *stop in scripted]


def _sampling_params(**kwargs):
    return kwargs


def test_rollout_tensors_weights_and_sleep_order(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos, a, b = tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["a", "b"])
    # stopped with the EOS listed, stopped without it (vLLM versions differ), out of tokens
    llm = FakeLLM(outputs=[([a, eos], "stop"), ([b], "stop"), ([a, b, a], "length")])
    engine = VLLMRollout(llm, tokenizer, _sampling_params, sleep=True)
    rollout = engine.generate(model, ["1=", "22=", "3="], max_new_tokens=3, temperature=0.7, top_p=0.9)
    assert llm.calls == ["sleep1", "wake_up", "reset_prefix_cache", "generate", "sleep1"]
    assert [p["prompt_token_ids"] for p in llm.prompts] == [tokenizer(p)["input_ids"] for p in ("1=", "22=", "3=")]
    assert llm.params == {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 3, "stop_token_ids": [eos]}
    pad = tokenizer.pad_token_id
    assert rollout.completion_ids.tolist() == [[a, eos, pad], [b, eos, pad], [a, b, a]]
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert rollout.truncated.tolist() == [False, False, True] and rollout.texts == ["a", "b", "aba"]
    # the same left-padded prompt tensors as in-process sampling, so training sees the same positions
    reference = generate(model, tokenizer, ["1=", "22=", "3="], max_new_tokens=3)
    assert torch.equal(rollout.prompt_ids, reference.prompt_ids)
    assert llm.loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(llm.loaded[k], v) for k, v in model.state_dict().items())


def test_stops_at_the_generation_configs_end_of_turn_ids(tiny_model_dir):
    """A chat model's generation config lists an end-of-turn id beside the tokenizer's EOS: the
    engine is asked to stop at both, and a completion ends at whichever comes first."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos, eot, a, b = tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<unk>", "a", "b"])
    model.generation_config.eos_token_id = [eot, eos]
    # the end-of-turn id listed, then not listed (stop_reason names it), then EOS not listed
    llm = FakeLLM(outputs=[([a, eot], "stop", eot), ([b], "stop", eot), ([a, b], "stop")])
    rollout = VLLMRollout(llm, tokenizer, _sampling_params, sleep=False).generate(model, ["1=", "2=", "3="],
                                                                                  max_new_tokens=4)
    assert llm.params["stop_token_ids"] == sorted([eos, eot])
    pad = tokenizer.pad_token_id
    assert rollout.completion_ids.tolist() == [[a, eot, pad], [b, eot, pad], [a, b, eos]]
    assert rollout.completion_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert not rollout.truncated.any() and rollout.texts == ["a", "b", "ab"]


def test_lora_policy_pushes_merged_weights_through_collective_rpc(tiny_model_dir):
    pytest.importorskip("peft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_config(overrides=["lora.r=2"]).lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    llm = FakeLLM(in_process=False)
    engine = VLLMRollout(llm, tokenizer, _sampling_params, sleep=False)
    rollout = engine.generate(model, ["1=", "2="], max_new_tokens=4, greedy=True)
    assert llm.calls == ["collective_rpc", "reset_prefix_cache", "generate"]  # no sleep mode: no sleep/wake
    assert llm.params["temperature"] == 0.0 and rollout.completion_ids.shape == (2, 4)
    merged = model.merge_and_unload().state_dict()
    assert llm.loaded.keys() == merged.keys()
    for name, value in merged.items():
        torch.testing.assert_close(llm.loaded[name], value)


def test_trainer_samples_with_the_engine(tmp_path, tiny_model_dir, monkeypatch):
    engines = []

    def fake_create(model_path, tokenizer, cfg):
        engines.append(VLLMRollout(FakeLLM(vocab=len(tokenizer)), tokenizer, _sampling_params, cfg.rollout.vllm_sleep))
        return engines[-1]

    monkeypatch.setattr(VLLMRollout, "create", staticmethod(fake_create))
    rows = [{"id": f"p{i}", "prompt": f"{i}=", "answer": "7"} for i in range(8)]
    task = Task(rows, rows[:2], lambda prompts, completions, **kw: [float("7" in c) for c in completions])
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                                 "rollout.backend=vllm", "max_steps=2", "eval_every=0", "rollout.batch_prompts=4",
                                 "rollout.group_size=2", "rollout.max_new_tokens=5"])
    assert train(cfg, task=task).steps == 2
    (engine,) = engines
    assert engine.llm.calls.count("generate") == 2 and engine.llm.calls[-1] == "sleep1"
    assert len(engine.llm.prompts) == 8 and engine.llm.params["max_tokens"] == 5


def test_create_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ValueError, match=r"pip install 'frugalrl\[vllm\]'"):
        VLLMRollout.create("model", None, load_config(overrides=["rollout.backend=vllm"]))


@pytest.mark.gpu
def test_real_engine_greedy_matches_in_process_sampling(tiny_model_dir):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs CUDA")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = load_config(overrides=["rollout.backend=vllm", "rollout.vllm_gpu_memory=0.2"])
    engine = VLLMRollout.create(tiny_model_dir, tokenizer, cfg)
    with torch.no_grad():  # a changed policy: the engine must sample from the pushed weights
        model.model.embed_tokens.weight.mul_(1.5)
    prompts = ["12=", "3+4="]
    ours = generate(model, tokenizer, prompts, max_new_tokens=8, greedy=True)
    theirs = engine.generate(model, prompts, max_new_tokens=8, greedy=True)
    assert theirs.texts == ours.texts


def test_trainer_pushes_each_steps_updated_weights(tmp_path, tiny_model_dir, monkeypatch):
    """Step 1 samples from the starting weights, step 2 from those after step 1's update."""
    pushes = []

    def fake_create(model_path, tokenizer, cfg):
        llm = FakeLLM(vocab=len(tokenizer))
        llm.worker.model_runner.model.load_weights = lambda ws: pushes.append({n: t.clone() for n, t in ws})
        return VLLMRollout(llm, tokenizer, _sampling_params, sleep=False)

    monkeypatch.setattr(VLLMRollout, "create", staticmethod(fake_create))
    rows = [{"id": f"p{i}", "prompt": f"{i}=", "answer": "7"} for i in range(8)]
    # every group of 2 scores (0, 1): the first update always moves the weights
    task = Task(rows, rows[:2], lambda prompts, completions, **kw: [float(i % 2) for i in range(len(completions))])
    run_dir = tmp_path / "run"
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"output_dir={run_dir}", "max_steps=2",
                                 "save_every=1", "eval_every=0", "rollout.backend=vllm", "rollout.batch_prompts=4",
                                 "rollout.group_size=2", "rollout.max_new_tokens=5", "train.lr=1e-2"])
    train(cfg, task=task)
    initial = load_file(tiny_model_dir / "model.safetensors")
    after_one = load_file(run_dir / "checkpoint-0000001" / "model.safetensors")
    assert len(pushes) == 2 and any(not torch.equal(initial[k], after_one[k]) for k in initial)
    for pushed, expected in zip(pushes, (initial, after_one)):
        assert all(torch.equal(pushed[k], v) for k, v in expected.items())
