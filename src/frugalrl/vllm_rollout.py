"""Rollouts with vLLM (``rollout.backend=vllm``): an engine beside the training model, on the GPU.

The engine is built once from the starting model's directory; before each rollout it receives
the policy's current weights, samples the completions, and (``rollout.vllm_sleep``) goes to
sleep so that the training step gets its GPU memory back. One rollout:

1. ``llm.wake_up()`` (sleep mode): the weights and KV cache return to the GPU;
2. the policy's weights are pushed under their Hugging Face names, which vLLM's
   ``model.load_weights`` maps onto its fused layers; a LoRA policy pushes its merged weights
   (``lora.merged_weights``). In-process engines (vLLM V0) are reached through
   ``llm.llm_engine.model_executor.driver_worker.model_runner.model``; otherwise (V1, whose
   workers run in their own processes) through ``llm.collective_rpc``. The prefix cache, which
   holds keys and values computed with the old weights, is reset;
3. ``llm.generate`` on the prompts' token ids with ``SamplingParams(temperature, top_p,
   max_tokens, stop_token_ids)`` (temperature 0 = greedy; the stop ids are ``rollout.stop_token_ids``:
   the tokenizer's EOS and the end-of-turn ids of the model's generation config);
4. ``llm.sleep(level=1)``: weights to CPU memory, KV cache freed. Level 1 rather than 2 (drop the
   weights, as the next push overwrites them) so that anything the push does not cover, such
   as buffers, survives.

The result is the same ``Rollout`` that ``rollout.generate`` builds: the prompts tokenised by
frugalrl's tokenizer (left-padded), the completions cut after their first stop id. Only the training
rollouts use the engine; evaluation and A*-PO's stage 1 sample in process.

vLLM is an optional extra (``pip install 'frugalrl[vllm]'``) and needs CUDA.
"""

from __future__ import annotations

import torch

from frugalrl import lora
from frugalrl.rollout import Rollout, encode_prompts, make_rollout, stop_token_ids

__all__ = ["VLLMRollout"]


def _load_weights(worker, weights) -> None:
    """Run in each vLLM worker (``collective_rpc``): copy ``weights`` into its model."""
    worker.model_runner.model.load_weights(weights)


class VLLMRollout:
    """Samples rollouts of the current policy with a vLLM engine ``llm`` (see the module).

    ``sampling_params``: vLLM's ``SamplingParams`` class. ``sleep``: the engine was built with
    ``enable_sleep_mode=True`` and sleeps between rollouts. ``create`` builds the real engine.
    """

    def __init__(self, llm, tokenizer, sampling_params, sleep: bool):
        self.llm, self.tokenizer, self.sampling_params, self.sleep = llm, tokenizer, sampling_params, sleep
        if sleep:
            llm.sleep(level=1)  # the training step may run before the first rollout

    @classmethod
    def create(cls, model_path: str, tokenizer, cfg) -> VLLMRollout:
        """An engine for ``model_path`` (``cfg.model.dtype``, ``cfg.seed``; GPU memory share, sleep
        mode and context from ``cfg.rollout``/``cfg.data``). A ValueError says what is missing."""
        try:
            import vllm
        except ImportError as e:
            raise ValueError(f"rollout.backend=vllm needs the vllm package, which is not installed ({e}); install "
                             "it with: pip install 'frugalrl[vllm]' (on a machine with CUDA)") from None
        if not torch.cuda.is_available():
            raise ValueError("rollout.backend=vllm needs a CUDA GPU, and torch sees none; use rollout.backend=hf")
        r, max_prompt = cfg.rollout, cfg.data.max_prompt_tokens
        llm = vllm.LLM(model=str(model_path), tokenizer=str(model_path), dtype=cfg.model.dtype, seed=cfg.seed,
                       gpu_memory_utilization=r.vllm_gpu_memory, enable_sleep_mode=r.vllm_sleep,
                       max_model_len=max_prompt + r.max_new_tokens if max_prompt else None,
                       # vLLM's sampling defaults, not generation_config.json's (top_k, penalties):
                       # frugalrl passes its own settings, and the stop ids (``stop_token_ids``)
                       generation_config="vllm")
        return cls(llm, tokenizer, vllm.SamplingParams, r.vllm_sleep)

    def push_weights(self, model) -> None:
        """Copy ``model``'s current weights into the engine."""
        weights = lora.merged_weights(model) if lora.is_lora(model) else model.state_dict().items()
        worker = getattr(getattr(self.llm.llm_engine, "model_executor", None), "driver_worker", None)
        if worker is not None:  # the engine runs in this process: load in place, one tensor at a time
            worker.model_runner.model.load_weights(weights)
        else:
            self.llm.collective_rpc(_load_weights, args=(list(weights),))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, model, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, greedy: bool = False) -> Rollout:
        """One completion per prompt from ``model``'s current weights, as ``rollout.generate``."""
        enc = encode_prompts(self.tokenizer, prompts)
        token_prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()}
                         for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        stop_ids = stop_token_ids(model, self.tokenizer)
        params = self.sampling_params(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                      max_tokens=max_new_tokens, stop_token_ids=stop_ids)
        if self.sleep:
            self.llm.wake_up()
        try:
            self.push_weights(model)
            outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        finally:
            if self.sleep:
                self.llm.sleep(level=1)
        tokens = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            if sample.finish_reason == "stop" and not (ids and ids[-1] in stop_ids):
                # vLLM versions differ on whether the stop token is listed; stop_reason names the
                # stop id it met, and is None when it met the tokenizer's EOS
                reason = getattr(sample, "stop_reason", None)
                ids.append(reason if reason in stop_ids else self.tokenizer.eos_token_id)
            tokens.append(ids)
        completion = torch.full((len(tokens), max(map(len, tokens), default=0)), self.tokenizer.pad_token_id,
                                dtype=torch.long)
        for i, ids in enumerate(tokens):
            completion[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return make_rollout(self.tokenizer, enc, completion, stop_ids)
