"""Property-based tests: reward parsers and answer extractors, the JSONL and CSV loaders and the
estimators, on arbitrary input, never fail with anything but their documented error
(ValueError), and keep their invariants."""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugalrl.advantages import get_estimator, list_estimators
from frugalrl.datafiles import read_rows
from frugalrl.rewards import math_reward
from frugalrl.tasks.arithmetic import arithmetic_reward
from frugalrl.tasks.gym import EXTRACTORS, extract_answer

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=8)


# --- reward parsers ------------------------------------------------------------------------

@FAST
@given(completions=st.lists(texts | st.lists(st.dictionaries(st.just("content"), texts), max_size=2), max_size=4),
       answer=st.lists(texts | st.integers(), min_size=4, max_size=4))
def test_arithmetic_reward_is_zero_or_one(completions, answer):
    scores = arithmetic_reward(None, completions, answer[:len(completions)])
    assert len(scores) == len(completions) and set(scores) <= {0.0, 1.0}


@FAST
@given(text=texts, k=st.integers(-10**12, 10**12))
def test_arithmetic_reward_reads_the_answer_after_the_last_hash(text, k):
    assert arithmetic_reward(None, [f"{text}#{k}"], [str(k)]) == [1.0]


@settings(max_examples=8, deadline=None)  # math-verify is slow: a few examples only
@given(completion=texts, gold=texts | st.integers(-99, 99))
def test_math_reward_never_raises_on_text(completion, gold):
    (value,) = math_reward(["q"], [completion], answer=[gold])
    assert value in (0.0, 1.0)


@settings(max_examples=8, deadline=None)
@given(k=st.integers(-10**6, 10**6), prefix=st.text(st.characters(whitelist_categories=("L", "Zs")), max_size=20))
def test_math_reward_boxed_integer(k, prefix):
    assert math_reward(None, [f"{prefix} \\boxed{{{k}}}"], answer=[str(k)]) == [1.0]


@FAST
@given(completion=texts | st.none() | st.lists(
           st.none() | texts | st.dictionaries(st.just("content"), texts | st.none()), max_size=2),
       mode=st.sampled_from(EXTRACTORS))
def test_gym_extractors_give_text_or_none(completion, mode):
    answer = extract_answer(completion, mode)
    assert answer is None or isinstance(answer, str)


# --- dataset loader --------------------------------------------------------------------------

def _load_or_value_error(path):
    """read_rows' rows (of a JSONL file), or None after a ValueError that names the file and a line."""
    try:
        rows = read_rows(path)
    except ValueError as e:
        assert str(path) in str(e) and len(str(e).splitlines()) == 1
        return None
    for row in rows:
        assert isinstance(row["prompt"], str) and row["prompt"].strip()
        assert isinstance(row["answer"], str) and isinstance(row["id"], str)
    return rows


@FAST
@given(data=st.binary(max_size=300))
def test_read_jsonl_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    _load_or_value_error(path)


@FAST
@given(lines=st.lists(json_values | st.fixed_dictionaries(
    {"prompt": json_values | texts, "answer": json_values}, optional={"id": json_values}), max_size=5))
def test_read_jsonl_on_arbitrary_json_lines(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in lines), encoding="utf-8")
    _load_or_value_error(path)


@FAST
@given(data=st.binary(max_size=300) | st.lists(st.lists(texts, max_size=3), max_size=4).map(
    lambda cells: "prompt,answer\n" + "\n".join(",".join(row) for row in cells)).map(str.encode))
def test_read_csv_on_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "d.csv"
    path.write_bytes(data)
    _load_or_value_error(path)


def test_read_jsonl_names_the_line_of_deep_nesting(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n' + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_rows(path)


# --- estimators --------------------------------------------------------------------------------

def _estimator(name, ids):
    # astar needs V* of the prompts; give it some of them, so that a missing one is tried too
    options = {"astar": {"v_star": {p: 0.5 for p in ids[::2]}}}
    return get_estimator(name, **options.get(name, {}))


floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@FAST
@given(name=st.sampled_from(list_estimators()), rewards=st.lists(floats, max_size=8),
       ids=st.lists(st.sampled_from("abcd"), max_size=8), step=st.integers(-3, 10**9))
def test_estimators_accept_anything_or_raise_value_error(name, rewards, ids, step):
    try:
        out = _estimator(name, ids).estimate(torch.tensor(rewards, dtype=torch.float64), ids, step)
    except ValueError:
        return
    assert out.advantages.shape == out.baselines.shape == (len(rewards),)


@FAST
@given(name=st.sampled_from(list_estimators()),
       groups=st.lists(st.tuples(st.sampled_from("abcd"), st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=4)),
                       min_size=1, max_size=4),
       steps=st.lists(st.integers(1, 50), min_size=1, max_size=3))
def test_estimators_finite_on_bounded_rewards_and_state_survives_json(name, groups, steps):
    """Finite in, finite out; and (KAE) memory saved to JSON and loaded gives the same advantages."""
    ids = [p for p, rs in groups for _ in rs]
    rewards = torch.tensor([r for _, rs in groups for r in rs], dtype=torch.float64)
    a, b = _estimator(name, ids), _estimator(name, ids)
    for step in sorted(steps):
        try:
            out_a = a.estimate(rewards, ids, step)
        except ValueError:  # astar without V* of a prompt
            return
        b.load_state_dict(json.loads(json.dumps(b.state_dict())))
        out_b = b.estimate(rewards, ids, step)
        assert torch.isfinite(out_a.advantages).all() and torch.isfinite(out_a.baselines).all()
        assert torch.equal(out_a.advantages, out_b.advantages)
        assert all(math.isfinite(v) for v in out_a.metrics.values())
