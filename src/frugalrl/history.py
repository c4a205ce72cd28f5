"""Every prompt's past rewards: one history per run, shared by KAE's baselines and the rollout allocator.

    history = PromptHistory(max_entries=512)
    history.record(prompt_ids, rewards, step)   # N ids, N rewards: every completion the step generated
    steps, rewards = history.get("id")          # oldest first
    history.visits("id")                        # [(step, [rewards of that step]), ...]

A *visit* is one step in which the prompt was rolled out: its entries share that step. KAE reads
the entries through a kernel over steps (``advantages.KAE``); the pass-rate estimate reads them
through a kernel over visits (``passrate.py``), because a prompt of a large pool comes back once an
epoch, hundreds of steps later, where a window of steps would have forgotten it.

Memory is bounded: at most ``max_entries`` per prompt (oldest dropped first), so a run holds at
most pool size x ``max_entries`` pairs. The state is plain JSON (``state_dict``) and is saved in
training checkpoints; under torchrun every rank records the same global batch, so every rank holds
the same history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PromptHistory"]


class PromptHistory:
    """prompt id -> (steps, rewards), oldest first, at most ``max_entries`` per prompt.

    ``population`` is the running mean pass rate of the prompts drawn: an exponential average, with
    a span of ``population_window`` records (steps), of each record's mean over *prompts*, each
    counted once: a recorded prompt by its mean reward, and a drawn prompt the allocator left out
    by its pass-rate estimate (``left_out``). It is the population prior of ``passrate.py``, the
    pass rate of a prompt about to be drawn, so it must not depend on which prompts the allocator
    chose: skip leaves out prompts predicted solved or failed, and budget gives more completions to
    some, so the mean over rolled-out completions is biased toward 0.5; the mean over every drawn
    prompt is not. None before the first record.
    """

    def __init__(self, max_entries: int = 512, population_window: int = 10):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries={max_entries!r} is not valid; it must be an int >= 1")
        self.max_entries = max_entries
        self.population_window = population_window
        self.entries: dict[str, tuple[list[int], list[float]]] = {}
        self.population: float | None = None

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self.entries

    def __len__(self) -> int:
        """Prompts with at least one entry."""
        return len(self.entries)

    def size(self) -> int:
        """(step, reward) entries stored, over every prompt."""
        return sum(len(steps) for steps, _ in self.entries.values())

    def get(self, prompt_id: str) -> tuple[list[int], list[float]]:
        """(steps, rewards) of ``prompt_id``, oldest first; two empty lists when it has none."""
        return self.entries.get(prompt_id, ([], []))

    def visits(self, prompt_id: str) -> list[tuple[int, list[float]]]:
        """[(step, rewards of that step), ...] of ``prompt_id``, oldest first."""
        out: list[tuple[int, list[float]]] = []
        for s, z in zip(*self.get(prompt_id)):
            if out and out[-1][0] == s:
                out[-1][1].append(z)
            else:
                out.append((s, [z]))
        return out

    def record(self, prompt_ids: Sequence[str], rewards: Sequence[float], step: int,
               left_out: Sequence[float] = ()) -> None:
        """Append one step's rewards (N ids, N floats), keeping the newest ``max_entries`` per prompt;
        ``left_out``: the pass-rate estimates of the step's drawn prompts that were not rolled out."""
        if len(prompt_ids) != len(rewards):
            raise ValueError(f"{len(prompt_ids)} prompt ids but {len(rewards)} rewards; pass one id per reward")
        new: dict[str, list[float]] = {}
        for key, z in zip(prompt_ids, rewards):
            new.setdefault(key, []).append(float(z))
        for key, zs in new.items():
            self.set(key, *self._appended(key, step, zs))
        rates = [sum(zs) / len(zs) for zs in new.values()] + [float(p) for p in left_out]
        if rates:
            mean = sum(rates) / len(rates)
            rate = 2 / (self.population_window + 1)  # the span-N exponential average
            self.population = mean if self.population is None else (1 - rate) * self.population + rate * mean

    def _appended(self, prompt_id: str, step: int, rewards: list[float]) -> tuple[list[int], list[float]]:
        steps, old = self.get(prompt_id)
        return steps + [step] * len(rewards), old + rewards

    def set(self, prompt_id: str, steps: list[int], rewards: list[float]) -> None:
        """Replace ``prompt_id``'s entries (its newest ``max_entries``); no entries forgets it."""
        if steps:
            self.entries[prompt_id] = (list(steps[-self.max_entries:]), list(rewards[-self.max_entries:]))
        else:
            self.entries.pop(prompt_id, None)

    def state_dict(self) -> dict[str, Any]:
        """{"history": {prompt_id: [[step, reward], ...]}, "population": float | None}; JSON-safe, exact."""
        return {"history": {k: [[s, z] for s, z in zip(steps, rewards)] for k, (steps, rewards) in self.entries.items()},
                "population": self.population}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"history", "population"}
        if unknown:
            raise ValueError(f"unexpected history state keys {sorted(unknown)}; expected 'history' and 'population'")
        self.entries = {}
        for k, pairs in state.get("history", {}).items():
            self.set(str(k), [int(s) for s, _ in pairs], [float(z) for _, z in pairs])
        self.population = state.get("population")
