"""Evaluation: greedy accuracy and pass@k on a list of rows with a reward function."""

from __future__ import annotations

import torch

from frugalrl.rewards.registry import RewardError, check_reward_values, reward_fn_name
from frugalrl.rollout import generate


def _columns(rows: list[dict]) -> dict[str, list]:
    """Dataset columns other than the prompt, as TRL passes them to reward functions."""
    keys = [k for k in rows[0] if k != "prompt"] if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


def score(reward_fn, rows: list[dict], texts: list[str], repeats: int = 1) -> torch.Tensor:
    """(len(rows)*repeats,) rewards of ``texts``, where each row's completions are consecutive.

    None ("does not apply") scores 0. A reward function that raises, or returns the wrong
    number of values, a non-number or NaN/inf, raises a RewardError (a ValueError) naming it.
    """
    expanded = [r for r in rows for _ in range(repeats)]
    name = reward_fn_name(reward_fn)
    try:
        values = reward_fn([r["prompt"] for r in expanded], texts, **_columns(expanded))
    except Exception as e:  # a bug in user code: report it as one line, with the function's name
        raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}", func_name=name, cause=e) from e
    return torch.tensor([0.0 if v is None else v for v in check_reward_values(name, values, len(texts))])


def evaluate(model, tokenizer, rows: list[dict], reward_fn, *, max_new_tokens: int,
             pass_k: int = 0, temperature: float = 1.0, batch_size: int = 256) -> dict[str, float]:
    """``{"accuracy": greedy mean reward>0.5, "pass@k": any of k samples right}`` over ``rows``.

    When every row has a "task" column (reasoning-gym rows), the same measures per task are
    added as ``accuracy/<task>`` and ``pass@k/<task>``.
    """
    correct, passed = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        greedy = generate(model, tokenizer, [r["prompt"] for r in chunk],
                          max_new_tokens=max_new_tokens, greedy=True)
        correct.append(score(reward_fn, chunk, greedy.texts) > 0.5)
        if pass_k > 0:
            sampled = generate(model, tokenizer, [r["prompt"] for r in chunk for _ in range(pass_k)],
                               max_new_tokens=max_new_tokens, temperature=temperature)
            hits = score(reward_fn, chunk, sampled.texts, pass_k) > 0.5
            passed.append(hits.view(-1, pass_k).any(dim=1))
    correct_all = torch.cat(correct).float()
    out = {"accuracy": correct_all.mean().item()}
    if pass_k > 0:
        passed_all = torch.cat(passed).float()
        out[f"pass@{pass_k}"] = passed_all.mean().item()
    tasks = [r.get("task") for r in rows]
    if rows and all(isinstance(t, str) and t for t in tasks):
        # Mixed tasks (reasoning-gym): the same measures per task, as "accuracy/<task>".
        for name in sorted(set(tasks)):
            mask = torch.tensor([t == name for t in tasks])
            out[f"accuracy/{name}"] = correct_all[mask].mean().item()
            if pass_k > 0:
                out[f"pass@{pass_k}/{name}"] = passed_all[mask].mean().item()
    return out


def examples(model, tokenizer, rows: list[dict], reward_fn, *, max_new_tokens: int) -> list[dict]:
    """``{"prompt", "completion", "answer", "reward"}`` of each of ``rows`` (a few held-out
    prompts, for the trackers' table): the greedy completion that ``evaluate`` scores, and its reward."""
    greedy = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens, greedy=True)
    rewards = score(reward_fn, rows, greedy.texts)
    return [{"prompt": r["prompt"], "completion": text, "answer": str(r.get("answer", "")), "reward": reward.item()}
            for r, text, reward in zip(rows, greedy.texts, rewards)]
