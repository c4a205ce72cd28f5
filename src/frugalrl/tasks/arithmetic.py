"""The embedded default task: multi-step integer arithmetic with worked solutions.

A problem such as ``(24+48)*8-5=`` has the worked solution ``24+48=72;72*8=576;576-5=571#571``:
one step per operation, then ``#`` and the final answer. The reward reads the answer after the
last ``#`` of the completion's last line, so a model earns it only by writing the answer in the
taught format; anything malformed scores 0.

``difficulty`` is the number of operations after the first sum (1: ``(a+b)*c``,
2: ``(a+b)*c-d``, 3: ``(a+b)*c-d+e``). Splits are deterministic functions of the seed and
never share a problem.
"""

from __future__ import annotations

import hashlib
import random

from frugalrl.completions import completion_text

# Operand ranges: the first sum's operands, the multiplier, and the later terms.
_SUM_RANGE = (0, 49)
_MUL_RANGE = (2, 9)
_TERM_RANGE = (0, 99)


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt (12 hex digits of its SHA-1): keys KAE history and V* caches."""
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


def make_problem(rng: random.Random, difficulty: int) -> dict:
    """One problem as a row: ``{"id", "prompt", "answer", "solution"}``."""
    if difficulty not in (1, 2, 3):
        raise ValueError(f"data.difficulty must be 1, 2 or 3, got {difficulty}")
    a, b = rng.randint(*_SUM_RANGE), rng.randint(*_SUM_RANGE)
    value = a + b
    expr, steps = f"({a}+{b})", [f"{a}+{b}={value}"]
    ops = [("*", rng.randint(*_MUL_RANGE))]
    if difficulty >= 2:
        ops.append(("-", rng.randint(*_TERM_RANGE)))
    if difficulty >= 3:
        ops.append(("+", rng.randint(*_TERM_RANGE)))
    for op, x in ops:
        new = value * x if op == "*" else value - x if op == "-" else value + x
        steps.append(f"{value}{op}{x}={new}")
        expr, value = f"{expr}{op}{x}", new
    prompt = f"{expr}="
    return {"id": prompt_id(prompt), "prompt": prompt, "answer": str(value),
            "solution": ";".join(steps) + f"#{value}"}


def num_problems(difficulty: int) -> int:
    """How many distinct problems the generator can produce at ``difficulty``."""
    width = lambda r: r[1] - r[0] + 1  # noqa: E731
    return width(_SUM_RANGE) ** 2 * width(_MUL_RANGE) * width(_TERM_RANGE) ** (difficulty - 1)


def make_splits(seed: int, difficulty: int, train_size: int, eval_size: int) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) lists of problems; no prompt appears in both."""
    available = num_problems(difficulty)
    # Drawing distinct problems slows down as the space fills up; half of it is plenty.
    if train_size + eval_size > available // 2:
        raise ValueError(f"data.train_size + data.eval_size = {train_size + eval_size} is more than half of the "
                         f"{available} distinct problems at difficulty {difficulty}; lower data.train_size "
                         f"to at most {available // 2 - eval_size}")
    rng = random.Random(f"frugalrl-arith-{seed}-{difficulty}")
    eval_rows: dict[str, dict] = {}
    while len(eval_rows) < eval_size:
        row = make_problem(rng, difficulty)
        eval_rows.setdefault(row["prompt"], row)
    train_rows: list[dict] = []
    seen = set(eval_rows)
    while len(train_rows) < train_size:
        row = make_problem(rng, difficulty)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            train_rows.append(row)
    return train_rows, list(eval_rows.values())


def final_answer(completion: str) -> str | None:
    """The answer after the last ``#`` of the completion's last non-empty line, or None."""
    lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
    if not lines or "#" not in lines[-1]:
        return None
    answer = lines[-1].rsplit("#", 1)[1].strip()
    return answer or None


def arithmetic_reward(prompts, completions, answer, **columns) -> list[float]:
    """1.0 where the final answer equals the reference integer exactly, else 0.0 (TRL signature)."""
    scores = []
    for completion, gold in zip(completions, answer):
        got = final_answer(completion_text(completion))
        scores.append(1.0 if got is not None and got == str(gold).strip() else 0.0)
    return scores
