import random
import re

import pytest

from frugalrl.tasks.arithmetic import arithmetic_reward, final_answer, make_problem, make_splits


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_problem_solution_is_consistent(difficulty):
    rng = random.Random(1)
    for _ in range(200):
        row = make_problem(rng, difficulty)
        # The worked solution's steps are all true equations and end in the answer.
        steps, answer = row["solution"].split("#")
        assert answer == row["answer"]
        value = None
        for eq in steps.split(";"):
            a, op, b, rhs = re.fullmatch(r"(-?\d+)([+*-])(\d+)=(-?\d+)", eq).groups()
            assert value is None or int(a) == value  # each step starts from the previous result
            value = {"+": int(a) + int(b), "*": int(a) * int(b), "-": int(a) - int(b)}[op]
            assert value == int(rhs)
        assert value == int(row["answer"])
        assert len(steps.split(";")) == difficulty + 1


def test_worked_example_format():
    row = make_problem(random.Random(0), 2)
    assert row["prompt"].startswith("(") and row["prompt"].endswith("=")
    assert row["solution"].count(";") == 2


def test_splits_deterministic_and_disjoint():
    train, ev = make_splits(seed=3, difficulty=2, train_size=500, eval_size=100)
    train2, ev2 = make_splits(seed=3, difficulty=2, train_size=500, eval_size=100)
    assert train == train2 and ev == ev2
    assert len(train) == 500 and len(ev) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    assert len({r["prompt"] for r in ev}) == 100
    other, _ = make_splits(seed=4, difficulty=2, train_size=500, eval_size=100)
    assert other != train


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="lower data.train_size to at most 9744"):
        make_splits(seed=0, difficulty=1, train_size=20000, eval_size=256)


def test_bad_difficulty():
    with pytest.raises(ValueError, match="difficulty"):
        make_problem(random.Random(0), 4)


@pytest.mark.parametrize("completion,expected", [
    ("24+48=72;72*8=576;576-5=571#571", 1.0),
    ("#571", 1.0),
    ("garbage then #571", 1.0),
    ("24+48=72;72*8=576;576-5=571#57", 0.0),
    ("24+48=72;72*8=576;576-5=571#5711", 0.0),
    ("24+48=72;72*8=576;576-5=571", 0.0),          # no answer marker
    ("", 0.0),
    ("#", 0.0),
    ("#571#12", 0.0),                              # the last marker counts
    ("#12#571", 1.0),
    ("#571\n", 1.0),
    ("#571\nmore text", 0.0),                      # the answer must be on the last line
    ("# 571 ", 1.0),
    ("#+571", 0.0),
    ("\x00\x01#", 0.0),
])
def test_reward(completion, expected):
    assert arithmetic_reward(["p"], [completion], answer=["571"]) == [expected]


def test_reward_chat_messages_and_bad_types():
    msgs = [{"role": "assistant", "content": "x#7"}]
    assert arithmetic_reward(["p", "p", "p"], [msgs, None, []], answer=["7", "7", "7"]) == [1.0, 0.0, 0.0]


def test_final_answer():
    assert final_answer("a#b#c") == "c"
    assert final_answer("nothing") is None


@pytest.mark.parametrize("completion", [[None], ["x#7"], [{"role": "assistant"}], [{"content": None}]])
def test_reward_malformed_message_lists_score_zero(completion):
    assert arithmetic_reward(["p"], [completion], answer=["7"]) == [0.0]
