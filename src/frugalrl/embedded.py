"""The embedded default model: a character-level tokenizer and a ~1 M-parameter Llama.

Both are built locally (nothing is downloaded) and saved with ``save_pretrained``, so any
Hugging Face tool opens them. The vocabulary is printable ASCII plus newline, so the same
model can be warmed up on other text tasks too.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = tuple(string.printable[:95]) + ("\n",)

# 128 hidden, 4 layers, 4 heads, MLP 512, tied embeddings: 0.8 M parameters + embeddings.
# A context of 1,024 characters costs no parameter (RoPE) and fits the prompts of reasoning-gym
# tasks in their own words (leg_counting's run to 331 characters) with a completion after them.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, ``<bos>`` prepended, left padding."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=MODEL_SHAPE["max_position_embeddings"])


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama sized for ``tokenizer``'s vocabulary."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **MODEL_SHAPE)
    return LlamaForCausalLM(config)
