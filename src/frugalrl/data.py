"""Training data: the task's rows and reward, and the prompt schedule that feeds the trainer.

A row is a dict ``{"id", "prompt", "answer", ...}``; every column but ``prompt`` reaches the
reward function as a keyword list (TRL's convention). ``id`` keys per-prompt state (KAE
history, A*-PO's V*), so it must be stable across runs: by default a hash of the prompt text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from frugalrl.config import config_to_dict
from frugalrl.datafiles import read_rows
from frugalrl.prompts import fill_template
from frugalrl.tasks import arithmetic

# Options of ``cfg.data`` that shape the prompt schedule, not the rows: caches of things computed
# from the rows (the embedded SFT model, A*-PO's V*) leave them out of their keys.
SCHEDULE_OPTIONS = ("sticky_steps",)
# Options added after the first caches were written: left out of cache keys while at their
# default, so that adding them did not invalidate cached models and V* files.
_LATER_OPTIONS = ("prompt_field", "answer_field", "max_prompt_tokens", "chat_template", "system_prompt", "seed")


def data_seed(cfg) -> int:
    """The seed of the train/eval split: ``data.seed``, or the run's ``seed`` when it is -1."""
    return cfg.data.seed if cfg.data.seed >= 0 else cfg.seed


def row_options(data_cfg) -> dict:
    """The options of ``cfg.data`` that shape the rows (not the schedule), for cache keys."""
    defaults = type(data_cfg)()
    return {k: v for k, v in config_to_dict(data_cfg).items()
            if k not in SCHEDULE_OPTIONS and not (k in _LATER_OPTIONS and v == getattr(defaults, k))}


@dataclass
class Task:
    """What the trainer needs from a task: rows to train and evaluate on, and their reward."""

    train_rows: list[dict]
    eval_rows: list[dict]
    reward_fn: Callable[..., list]


def _read_file(data_cfg, path: str, splits: tuple[str, ...]) -> list[dict]:
    """Rows of a data file (``datafiles``), with ``data.prompt_template`` applied."""
    rows = read_rows(path, data_cfg.prompt_field, data_cfg.answer_field, splits)
    if data_cfg.prompt_template:
        rows = [fill_template(data_cfg.prompt_template, r, path) for r in rows]
    return rows


def load_task(cfg) -> Task:
    """The task named by ``cfg.data``: the built-in arithmetic task, data files, or reasoning-gym."""
    d = cfg.data
    if d.train_path or d.source == "jsonl":
        if not d.train_path:
            raise ValueError("data.source=jsonl needs data.train_path=FILE (.jsonl, .csv, .parquet or a dataset "
                             "directory)")
        train = _read_file(d, d.train_path, ("train",))
        if d.eval_path:
            evaluation = _read_file(d, d.eval_path, ("test", "validation"))
        else:
            # Hold out the last rows of a shuffled copy, so that evaluation never sees training prompts.
            train = train[:]
            random.Random(data_seed(cfg)).shuffle(train)
            n_eval = min(d.eval_size, len(train) // 10)
            train, evaluation = train[n_eval:], train[:n_eval]
        return Task(train, evaluation, arithmetic.arithmetic_reward)
    if d.source == "arithmetic":
        train, evaluation = arithmetic.make_splits(data_seed(cfg), d.difficulty, d.train_size, d.eval_size)
        return Task(train, evaluation, arithmetic.arithmetic_reward)
    if d.source == "reasoning_gym":
        from frugalrl.tasks import gym

        return Task(*gym.load(cfg))
    raise ValueError(f"data.source={d.source} is not available yet")


class PromptSampler:
    """Draws prompt mini-batches: shuffled epochs, each batch reused for ``sticky_steps`` steps.

    Reuse is what KAE needs: a prompt's history only helps if the prompt comes back soon.
    The state (epoch order, position) is plain data so that a checkpoint can restore it.
    """

    def __init__(self, rows: list[dict], batch_prompts: int, sticky_steps: int = 1, seed: int = 0):
        if batch_prompts > len(rows):
            raise ValueError(f"rollout.batch_prompts={batch_prompts} exceeds the {len(rows)} training prompts")
        self.rows, self.batch_prompts, self.sticky_steps = rows, batch_prompts, sticky_steps
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.pos = 0
        self.current: list[int] = []
        self.uses = 0

    def next(self) -> list[dict]:
        """The prompt rows for the next step."""
        if not self.current or self.uses >= self.sticky_steps:
            self.current = self._draw(self.batch_prompts)
            self.uses = 0
        self.uses += 1
        return [self.rows[i] for i in self.current]

    def more(self, n: int) -> list[dict]:
        """``n`` further prompts of the epoch order, for a step that needs more than its batch
        (``rollout.allocation``, ``rollout.dynamic_sampling``); not sticky."""
        return [self.rows[i] for i in self._draw(min(n, len(self.rows)))]

    def _draw(self, n: int) -> list[int]:
        """The next ``n`` indices of the epoch order; a new shuffled epoch when fewer are left."""
        if self.pos + n > len(self.order):
            self.order = list(range(len(self.rows)))
            self.rng.shuffle(self.order)
            self.pos = 0
        self.pos += n
        return self.order[self.pos - n:self.pos]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": self.order, "pos": self.pos,
                "current": self.current, "uses": self.uses}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.pos = list(state["order"]), state["pos"]
        self.current, self.uses = list(state["current"]), state["uses"]
