"""Supervised warm-up: next-token loss on worked solutions, completion tokens only, and when it stops."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch


# Most tokens, padding included, in one micro-batch of a warm-up step: rows of similar length
# together (``micro_batches``) pad to their own longest, not the batch's, and ~4k tokens keep
# the CPU's matmuls as efficient as the whole batch's (measured on 1 thread, seconds a step:
# letter_counting's 150-250-character rows 2.6 -> 1.8, leg_counting's 4.5 -> 3.5; the arithmetic
# task's equal rows, one micro-batch, unchanged).
MICRO_BATCH_TOKENS = 4096


def _encode(tokenizer, row: dict) -> tuple[list[int], int]:
    """``<bos> prompt solution <eos>`` as token ids, and the number of prompt tokens (with ``<bos>``)."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    target = tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + target, len(prompt)


def _pad(tokenizer, encoded: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """``_encode``'s sequences right-padded to the longest, with labels on the solution only.

    Returns input_ids, attention_mask, and loss_mask, each (B, L); loss_mask[:, t] marks the
    tokens *predicted* at position t (that is, input_ids[:, t+1] is a solution token).
    """
    L = max(len(seq) for seq, _ in encoded)
    ids = torch.full((len(encoded), L), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros(len(encoded), L, dtype=torch.long)
    loss_mask = torch.zeros(len(encoded), L)
    for i, (s, p) in enumerate(encoded):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        loss_mask[i, p - 1:len(s) - 1] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def micro_batches(tokenizer, rows: list[dict], max_tokens: int = MICRO_BATCH_TOKENS) -> list[dict[str, torch.Tensor]]:
    """``rows`` as right-padded micro-batches (``_pad``: (B_i, L_i) tensors), shortest rows first,
    each cut before it would exceed ``max_tokens`` tokens padded, B_i x L_i (a longer row goes
    alone): every row once."""
    encoded = sorted((_encode(tokenizer, r) for r in rows), key=lambda e: len(e[0]))
    parts: list[list] = [[]]
    for e in encoded:
        if parts[-1] and (len(parts[-1]) + 1) * len(e[0]) > max_tokens:  # sorted: e is the part's longest
            parts.append([])
        parts[-1].append(e)
    return [_pad(tokenizer, part) for part in parts]


def sft(model, tokenizer, rows: list[dict], *, steps: int, batch_size: int = 64, lr: float = 2e-3,
        warmup_steps: int = 50, seed: int = 0, micro_batch_tokens: int = MICRO_BATCH_TOKENS,
        on_step: Callable[[int, float], bool | None] | None = None) -> tuple[int, float]:
    """Train ``model`` in place on ``rows`` (which need a "solution"); returns (steps taken, last loss).

    Each step's loss is the mean next-token loss over the solution tokens of ``batch_size`` rows,
    its gradient accumulated over ``micro_batches`` (the same gradient as one padded batch's).
    AdamW with linear warm-up then a constant rate; ``on_step(step, loss)`` is called after
    every optimizer step (progress bars, periodic evaluation, a time limit) and stops training
    there when it returns true.
    """
    if not rows or "solution" not in rows[0]:
        raise ValueError("SFT needs rows with a 'solution' column (the worked answer to imitate)")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    opt.zero_grad(set_to_none=True)
    loss_value = float("nan")
    for step in range(1, steps + 1):
        model.train()  # on_step may have evaluated in eval mode
        batches = micro_batches(tokenizer, rng.sample(rows, min(batch_size, len(rows))), micro_batch_tokens)
        loss_value = sft_backward(model, batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if on_step is not None and on_step(step, loss_value):
            return step, loss_value
    return steps, loss_value


def sft_backward(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Accumulate into the gradients the mean next-token loss over the solution tokens of all
    ``batches`` (``micro_batches``), one backward pass each; returns that loss."""
    tokens = sum(b["loss_mask"].sum() for b in batches)
    total = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["input_ids"].roll(-1, dims=1).flatten(),
                                                reduction="none")
        loss = (nll * b["loss_mask"].flatten()).sum() / tokens
        loss.backward()
        total += loss.item()
    return total


@dataclass
class StopRule:
    """When a warm-up checked every few steps stops; ``after_check`` and ``out_of_time`` give the
    reason, and a warm-up that none of them stops ends at its step cap ("steps").

    * "target": a check's accuracy reaches ``target`` (0: the warm-up is never checked).
    * "patience": ``patience`` checks in a row bring no new best accuracy (0: never), counted once
      the best is halfway to ``target``: before that a curve can sit near 0 for hundreds of steps
      and then climb, which is no plateau (the arithmetic task: 0-2 % until step 400-800, then
      0.3 within 200-500 steps, at most 3 checks in a row without a new best in 10 warm-ups). A
      new best beats the old one by more than a reading's standard error there,
      sqrt(p (1 - p) / ``problems``): read with noise, a plateau would set a chance record every
      few checks and never run out of patience.
    * "time": ``max_wall_s`` seconds have passed (0: no limit).
    """

    target: float
    patience: int
    max_wall_s: float
    problems: int  # check problems per reading
    best: float = float("-inf")
    since_best: int = 0  # checks since the best one

    def after_check(self, accuracy: float) -> str | None:
        """Record a check's accuracy; "target" or "patience" when the warm-up should stop there."""
        p = max(self.best, 0.0)
        if accuracy > self.best + math.sqrt(p * (1 - p) / max(1, self.problems)):
            self.best, self.since_best = accuracy, 0
        else:
            self.since_best += 1
        if accuracy >= self.target:
            return "target"
        if self.patience and self.best >= self.target / 2 and self.since_best >= self.patience:
            return "patience"
        return None

    def out_of_time(self, seconds: float) -> bool:
        return bool(self.max_wall_s) and seconds >= self.max_wall_s
