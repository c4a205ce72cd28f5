"""Supervised warm-up: next-token loss on worked solutions, completion tokens only."""

from __future__ import annotations

import random
from typing import Callable

import torch


def sft_batch(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``<bos> prompt solution <eos>`` sequences with labels on the solution only.

    Returns input_ids, attention_mask, and loss_mask, each (B, L); loss_mask[:, t] marks the
    tokens *predicted* at position t (that is, input_ids[:, t+1] is a solution token).
    """
    seqs, starts = [], []
    for r in rows:
        prompt = tokenizer(r["prompt"])["input_ids"]
        target = tokenizer(r["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + target)
        starts.append(len(prompt))
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), L, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), L)
    for i, (s, p) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        loss_mask[i, p - 1:len(s) - 1] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def sft(model, tokenizer, rows: list[dict], *, steps: int, batch_size: int = 64, lr: float = 2e-3,
        warmup_steps: int = 50, seed: int = 0,
        on_step: Callable[[int, float], bool | None] | None = None) -> tuple[int, float]:
    """Train ``model`` in place on ``rows`` (which need a "solution"); returns (steps taken, last loss).

    AdamW with linear warm-up then a constant rate; ``on_step(step, loss)`` is called after
    every optimizer step (progress bars, periodic evaluation) and stops training there when
    it returns true.
    """
    if not rows or "solution" not in rows[0]:
        raise ValueError("SFT needs rows with a 'solution' column (the worked answer to imitate)")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    loss_value = float("nan")
    for step in range(1, steps + 1):
        model.train()  # on_step may have evaluated in eval mode
        batch = sft_batch(tokenizer, rng.sample(rows, min(batch_size, len(rows))))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["input_ids"].roll(-1, dims=1)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (nll * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if on_step is not None and on_step(step, loss_value):
            return step, loss_value
    return steps, loss_value
