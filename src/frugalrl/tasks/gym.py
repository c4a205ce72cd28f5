"""Tasks from reasoning-gym: 100+ procedural generators, each with its own answer checker.

``data.source=reasoning_gym data.task=chain_sum`` (or a list ``[chain_sum, basic_arithmetic]``
mixed by ``data.task_weights``) turns reasoning-gym items into frugalrl rows::

    {"id", "prompt", "answer", "solution", "task", "entry"}

* ``prompt`` is ``data.prompt_template`` filled with the item's ``{question}`` and its metadata
  fields (``"{expression} ="`` gives chain_sum's bare expression, short enough for the embedded
  character model); the default template is the question plus one line that asks for the
  answer in the format that ``data.answer_extract`` reads.
* ``solution`` is the reference answer written in that format (``#41``, ``<answer>41</answer>``,
  ``\\boxed{41}`` or ``41``): what the embedded model imitates in its SFT warm-up. Tasks that
  check answers without a reference one (graph_color, rush_hour, ...) have ``answer`` "" and no
  ``solution``: train a model that already writes answers on them, not the embedded one.
* ``entry`` is the reasoning-gym item (question, answer, metadata, and the generator's name,
  seed, index and options) as a JSON string, plus how to score it (``answer_extract``,
  ``partial_credit``), so that any process can score the row, even without the config.

Security: some tasks' scorers hand the answer to sympy (whose parser evaluates Python) or run
other heavy code on it; that is reasoning-gym's checking, unchanged. Run untrusted models'
rewards under ``reward.timeout_s`` / ``RewardCombiner(timeout_s=...)`` for a wall-clock bound.

The reward is the task's own ``score_answer(answer, entry)`` on the answer extracted from the
completion. Many scorers give partial credit (``"141"`` against ``"41"`` earns 0.67 in chain_sum,
a word spelled half right earns 0.5); by default (``data.partial_credit=false``) a completion
earns 1 only when the scorer gives full marks, else 0, so that accuracy means "right".

Splits: the held-out and training items come from the same generator under two seeds derived
from ``seed``; duplicates, and training items whose question or prompt is held out, are dropped,
so the two splits never share an item and both are reproducible from the seed.

reasoning-gym is an optional extra: ``pip install 'frugalrl[gym]'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import random
import re
from typing import Any

from frugalrl.completions import completion_text
from frugalrl.data import data_seed
from frugalrl.tasks.arithmetic import final_answer as _marker_answer
from frugalrl.tasks.arithmetic import prompt_id

INSTALL_HINT = "pip install 'frugalrl[gym]'"

EXTRACTORS = ("answer_tags", "boxed", "last_line", "marker")

# One line appended to the question by the default prompt: how to write the answer.
_INSTRUCTIONS = {
    "answer_tags": "Give only the final answer between <answer> and </answer>.",
    "boxed": "Give the final answer as \\boxed{answer}.",
    "last_line": "Write the final answer alone on the last line.",
    "marker": "End with # followed by the final answer.",
}

# Completions longer than this are cut to their last part before the answer is looked for.
MAX_COMPLETION_CHARS = 20_000
# Give up drawing a split after this many draws per requested item (plus a constant).
_DRAWS_PER_ITEM = 20


def require_gym():
    """The ``reasoning_gym`` module, or a ValueError that says how to install it."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ValueError(f"data.source=reasoning_gym needs the reasoning-gym package, which is not "
                         f"installed ({e}); install it with: {INSTALL_HINT}") from None
    return reasoning_gym


def _registry() -> dict:
    require_gym()
    from reasoning_gym.factory import DATASETS

    return DATASETS


def list_tasks() -> list[str]:
    """Names of the registered reasoning-gym generators (``composite`` excluded: list tasks instead)."""
    return sorted(name for name in _registry() if name != "composite")


# --------------------------------------------------------------------------- options

def parse_tasks(task) -> list[str]:
    """``data.task`` as a list of names: ``"chain_sum"``, ``[a, b]``, or the text ``"[a, b]"`` / ``"a,b"``
    (a ``key=value`` override keeps the value as text)."""
    if isinstance(task, str):
        text = task.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        names = [p.strip().strip("'\"").strip() for p in text.split(",")]
    elif isinstance(task, (list, tuple)):
        names = [str(t).strip() for t in task]
    else:
        raise ValueError(f"data.task must be a task name or a list of names, got {task!r}")
    names = [n for n in names if n]
    if not names:
        raise ValueError("data.source=reasoning_gym needs data.task=NAME (e.g. data.task=chain_sum, or "
                         "data.task=[chain_sum,basic_arithmetic]); see reasoning_gym's registry for names")
    if len(set(names)) != len(names):
        raise ValueError(f"data.task lists a task twice: {names}; give each task once and weigh them "
                         "with data.task_weights")
    registry = _registry()
    for name in names:
        if name == "composite":
            raise ValueError("data.task=composite: list the tasks to mix instead, e.g. "
                             "data.task=[chain_sum,basic_arithmetic] data.task_weights=[1,1]")
        if name not in registry:
            close = difflib.get_close_matches(name, list_tasks(), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else \
                f"; {len(list_tasks())} tasks are registered, e.g. {', '.join(list_tasks()[:6])}, ..."
            raise ValueError(f"data.task: reasoning-gym has no task {name!r}{hint}")
    return names


def task_weights(names: list[str], weights) -> list[float]:
    """One weight per task (equal when ``weights`` is empty), checked."""
    if not weights:
        return [1.0] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"data.task_weights has {len(weights)} weights for {len(names)} tasks "
                         f"({', '.join(names)}); give one weight per task or none")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.task_weights must be >= 0 with a positive sum, got {weights}")
    return weights


def task_configs(names: list[str], task_config: dict | None) -> dict[str, dict]:
    """Generator options per task. With one task, ``data.task_config`` holds its options
    (``{min_terms: 2}``) or ``{task_name: {...}}``; with several, one mapping per task name
    (tasks not named get their defaults)."""
    task_config = dict(task_config or {})
    per_task = bool(task_config) and all(k in names and isinstance(v, dict) for k, v in task_config.items())
    if per_task:
        out = {n: dict(task_config.get(n) or {}) for n in names}
    elif len(names) == 1:
        out = {names[0]: task_config}
    elif task_config:
        stray = [k for k in task_config if k not in names]
        raise ValueError(f"data.task_config: with several tasks ({', '.join(names)}), give one mapping per "
                         f"task name, e.g. {{{names[0]}: {{...}}}}; {stray[0]!r} is not one of them")
    else:
        out = {n: {} for n in names}
    for name, options in out.items():
        for key in ("seed", "size"):
            if key in options:
                raise ValueError(f"data.task_config for {name}: {key!r} is set by frugalrl "
                                 f"(use {'seed' if key == 'seed' else 'data.size / data.eval_size'} instead)")
    return out


def make_dataset(name: str, options: dict, seed: int, size: int):
    """``reasoning_gym.create_dataset(name, seed=, size=, **options)`` with readable errors."""
    rg = require_gym()
    dataset_cls, config_cls = _registry()[name]
    known = [f.name for f in dataclasses.fields(config_cls) if f.name not in ("seed", "size")]
    unknown = [k for k in options if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise ValueError(f"data.task_config for {name}: unknown option {unknown[0]!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; {name} takes: {', '.join(known)}")
    try:
        return rg.create_dataset(name, seed=seed, size=size, **options)
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"data.task_config for {name} is rejected by reasoning-gym: "
                         f"{type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- rows

def format_solution(answer: str, answer_extract: str) -> str:
    """The reference answer written so that ``answer_extract`` reads it back."""
    return {"answer_tags": f"<answer>{answer}</answer>", "boxed": f"\\boxed{{{answer}}}",
            "last_line": answer, "marker": f"#{answer}"}[answer_extract]


def render_prompt(template: str, item: dict, answer_extract: str) -> str:
    """The prompt of ``item``: ``template`` filled with ``{question}`` and the metadata fields."""
    if not template:
        return f"{item['question']}\n{_INSTRUCTIONS[answer_extract]}"
    fields = {k: v for k, v in (item.get("metadata") or {}).items() if isinstance(k, str)}
    fields["question"] = item["question"]
    try:
        return template.format_map(fields)
    except KeyError as e:
        names = ", ".join(sorted(k for k in fields if k.isidentifier()))
        raise ValueError(f"data.prompt_template {template!r} names the field {{{e.args[0]}}}, which "
                         f"{item.get('metadata', {}).get('source_dataset', 'this task')} items lack; "
                         f"available: {names}") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"data.prompt_template {template!r} is not a valid format string ({e}); write "
                         "literal braces as {{ and }}") from None


def _jsonable(value):
    """A JSON-safe copy (tuples become lists; anything else unknown becomes its str)."""
    return json.loads(json.dumps(value, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def _split_seed(seed: int, task: str, split: str) -> int:
    digest = hashlib.sha1(f"frugalrl-gym|{seed}|{task}|{split}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31)


class _Stream:
    """Items of one task in index order, from a dataset built for one split."""

    def __init__(self, name: str, options: dict, seed: int, size: int):
        self.name, self.options, self.seed = name, options, seed
        self.dataset = make_dataset(name, options, seed, max(size, 1))
        self.index = 0

    def next(self) -> tuple[int, dict]:
        i = self.index
        self.index += 1
        return i, self.dataset[i]


def _draw(streams: dict[str, _Stream], weights: list[float], n: int, rng: random.Random, seen: set,
          template: str, answer_extract: str, partial_credit: bool, split: str) -> tuple[list[dict], dict[str, dict]]:
    """``n`` rows whose question and prompt are not in ``seen`` (which grows), and id -> item."""
    names = list(streams)
    rows, items = [], {}
    budget = n * _DRAWS_PER_ITEM + 1000
    draws = 0
    while len(rows) < n:
        if draws >= budget:
            raise ValueError(f"reasoning-gym: found only {len(rows)} distinct {split} items of "
                             f"{', '.join(names)} in {draws} draws (asked for {n}); the generator's "
                             f"options allow too few distinct questions: lower "
                             f"{'data.eval_size' if split == 'eval' else 'data.size'} or widen data.task_config")
        draws += 1
        name = names[0] if len(names) == 1 else rng.choices(names, weights=weights, k=1)[0]
        stream = streams[name]
        index, item = stream.next()
        prompt = render_prompt(template, item, answer_extract)
        question = f"{name}\0{item['question']}"
        if question in seen or prompt in seen:
            continue
        seen.update((question, prompt))
        answer = item.get("answer")
        entry = _jsonable({"question": item["question"], "answer": answer, "metadata": item.get("metadata", {}),
                           "source": {"task": name, "seed": stream.seed, "index": index,
                                      "config": stream.options},
                           "scoring": {"answer_extract": answer_extract, "partial_credit": partial_credit}})
        row = {"id": prompt_id(prompt), "prompt": prompt, "answer": "" if answer is None else str(answer),
               "task": name, "entry": json.dumps(entry, sort_keys=True)}
        if answer is not None:  # tasks that check answers without a reference one have nothing to imitate
            row["solution"] = format_solution(str(answer), answer_extract)
        rows.append(row)
        items[row["id"]] = item
    return rows, items


def make_splits(task, *, seed: int = 0, size: int = 1000, eval_size: int = 256, task_config: dict | None = None,
                weights=None, prompt_template: str = "", answer_extract: str = "answer_tags",
                partial_credit: bool = False):
    """Deterministic ``(train_rows, eval_rows, items)`` for reasoning-gym ``task`` (a name or a list).

    ``items`` maps each row id to the original reasoning-gym item (what ``score_answer`` expects;
    the rows' ``entry`` column holds a JSON copy, with the generator's name, seed, index and
    options, and how to score: ``answer_extract`` and ``partial_credit``). No question or prompt
    is in both splits.
    """
    if answer_extract not in EXTRACTORS:
        raise ValueError(f"data.answer_extract={answer_extract!r}: expected one of {', '.join(EXTRACTORS)}")
    names = parse_tasks(task)
    w = task_weights(names, weights)
    options = task_configs(names, task_config)
    seen: set = set()
    out = {}
    # The held-out split is drawn first; training items that repeat one of its questions are dropped.
    for split, n in (("eval", eval_size), ("train", size)):
        streams = {name: _Stream(name, options[name], _split_seed(seed, name, split), n) for name in names}
        rng = random.Random(f"frugalrl-gym-mix|{seed}|{split}")
        out[split] = _draw(streams, w, n, rng, seen, prompt_template, answer_extract, partial_credit, split)
    items = {**out["eval"][1], **out["train"][1]}
    return out["train"][0], out["eval"][0], items


# --------------------------------------------------------------------------- answers and reward

def extract_answer(completion, mode: str) -> str | None:
    """The answer in ``completion`` as ``mode`` reads it, or None when there is none.

    * ``answer_tags``: the text between the last ``<answer>`` and ``</answer>`` (stripped);
    * ``boxed``: the content of the last complete ``\\boxed{...}``;
    * ``last_line``: the last non-empty line (stripped);
    * ``marker``: the text after the last ``#`` of the last non-empty line (the built-in task's form).
    """
    text = completion_text(completion)[-MAX_COMPLETION_CHARS:]
    if mode == "answer_tags":
        matches = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
        return matches[-1].strip() if matches else None
    if mode == "boxed":
        from frugalrl.rewards.math import last_boxed

        boxed = last_boxed(text)
        return boxed.strip() if boxed is not None else None
    if mode == "last_line":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else None
    if mode == "marker":
        return _marker_answer(text)
    raise ValueError(f"answer extraction {mode!r}: expected one of {', '.join(EXTRACTORS)}")


class GymReward:
    """TRL-style reward ``f(prompts, completions, task, entry, id=None, **columns) -> list[float]``:
    the task's own ``score_answer`` on the answer extracted from each completion.

    ``answer_extract`` / ``partial_credit``: None = as recorded in each row's entry (what the
    config that made the rows said). Entries are looked up by row id among the items this
    object was built with (the exact reasoning-gym items); other rows are scored from their
    JSON ``entry`` column, with a scorer built from the generator options recorded there.
    A scorer that raises gives 0; without partial credit, scores below 1 give 0.
    """

    def __init__(self, answer_extract: str | None = None, partial_credit: bool | None = None,
                 items: dict[str, dict] | None = None, options: dict[str, dict] | None = None):
        if answer_extract is not None and answer_extract not in EXTRACTORS:
            raise ValueError(f"answer_extract={answer_extract!r}: expected one of {', '.join(EXTRACTORS)}")
        self.answer_extract, self.partial_credit = answer_extract, partial_credit
        self.items = items or {}
        self.options = options or {}
        self._scorers: dict[str, Any] = {}
        self.__name__ = "reasoning_gym"

    def _scorer(self, task: str, options: dict):
        """A dataset of ``task`` with ``options``: its ``score_answer`` may read the config."""
        key = f"{task}|{json.dumps(options, sort_keys=True, default=str)}"
        if key not in self._scorers:
            self._scorers[key] = make_dataset(task, options, seed=0, size=1)
        return self._scorers[key]

    def score_one(self, completion, task: str, entry, row_id: str | None = None) -> float:
        """The reward of one completion of the row (``task``, ``entry``, ``id``)."""
        record = json.loads(entry) if isinstance(entry, str) else dict(entry)
        item = self.items.get(row_id) if row_id is not None else None
        if item is None:
            item = record
            options = (record.get("source") or {}).get("config") or {}
        else:
            options = self.options.get(task, {})
        scoring = record.get("scoring") or {}
        mode = self.answer_extract or scoring.get("answer_extract") or "answer_tags"
        partial = self.partial_credit if self.partial_credit is not None else bool(scoring.get("partial_credit"))
        scorer = self._scorer(task, options)
        answer = extract_answer(completion, mode)
        try:
            value = float(scorer.score_answer(answer, item))
        except Exception:  # a scorer that chokes on a malformed answer: no credit
            return 0.0
        if value != value:  # NaN
            return 0.0
        if not partial:
            # Exactly 1, not "close to 1": a right answer gets a literal 1.0, while a float sum of
            # partial credits can land on 1.0000000000000002 for a wrong one (spell_backward).
            return 1.0 if value == 1.0 else 0.0
        return value

    def __call__(self, prompts, completions, task=None, entry=None, id=None, **columns) -> list[float]:
        if task is None or entry is None:
            raise ValueError("the reasoning-gym reward needs the rows' 'task' and 'entry' columns "
                             "(rows made by frugalrl.tasks.gym.make_splits)")
        ids = id if id is not None else [None] * len(completions)
        return [self.score_one(c, t, e, i) for c, t, e, i in zip(completions, task, entry, ids)]


def reasoning_gym_reward(prompts, completions, task, entry, **columns) -> list[float]:
    """Stand-alone reward for rows made by ``make_splits`` (their entry says how to read and
    score the answer), for ``reward.funcs`` / ``load_reward_fn``:
    ``"frugalrl.tasks.gym:reasoning_gym_reward"``."""
    return _DEFAULT_REWARD(prompts, completions, task=task, entry=entry, **columns)


_DEFAULT_REWARD = GymReward()


def load(cfg):
    """``(train_rows, eval_rows, reward_fn)`` for ``cfg.data`` (``source=reasoning_gym``)."""
    d = cfg.data
    train, evaluation, items = make_splits(
        d.task, seed=data_seed(cfg), size=d.size or d.train_size, eval_size=d.eval_size, task_config=d.task_config,
        weights=d.task_weights, prompt_template=d.prompt_template, answer_extract=d.answer_extract,
        partial_credit=d.partial_credit)
    options = task_configs(parse_tasks(d.task), d.task_config)
    reward = GymReward(d.answer_extract, d.partial_credit, items=items, options=options)
    return train, evaluation, reward


__all__ = ["EXTRACTORS", "INSTALL_HINT", "GymReward", "extract_answer", "format_solution", "list_tasks",
           "load", "make_dataset", "make_splits", "parse_tasks", "reasoning_gym_reward", "render_prompt",
           "require_gym", "task_configs", "task_weights"]
