"""Tests of frugalrl.rewards: math_reward, format_reward, load_reward_fn, RewardCombiner."""

from __future__ import annotations

import math
import sys
import textwrap
import threading
import time

import pytest

from frugalrl.rewards import (
    RewardCombiner,
    RewardError,
    format_reward,
    last_boxed,
    load_reward_fn,
    make_format_reward,
    math_reward,
)


def chat(text):
    return [
        {"role": "system", "content": "Reason step by step."},
        {"role": "user", "content": "What is 8 * 9?"},
        {"role": "assistant", "content": text},
    ]


# (id, completion, gold answer, expected reward)
MATH_CASES = [
    ("int", "The result is \\boxed{72}.", "72", 1.0),
    ("int_plain_last_number", "8 * 9 = 72", "72", 1.0),
    ("close_wrong_72_vs_27", "So the answer is \\boxed{27}.", "72", 0.0),
    ("close_wrong_plain", "so we get 27", "72", 0.0),
    ("negative", "Thus $x$ equals \\boxed{-3}", "-3", 1.0),
    ("negative_sign_matters", "\\boxed{3}", "-3", 0.0),
    ("decimal_vs_frac", "\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("frac_vs_decimal", "\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("dfrac", "\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("frac_wrong", "\\boxed{\\frac{3}{5}}", "\\frac{3}{4}", 0.0),
    ("thousands_sep_pred", "The total is 1,000", "1000", 1.0),
    ("thousands_sep_gold", "\\boxed{1000}", "1,000", 1.0),
    ("dollar_gold", "\\boxed{1000}", "$1,000", 1.0),
    ("several_boxed_last_wins", "First \\boxed{5}, no wait: \\boxed{7}", "7", 1.0),
    ("several_boxed_earlier_loses", "First \\boxed{5}, no wait: \\boxed{7}", "5", 0.0),
    ("boxed_beats_later_number", "\\boxed{12} (checked in 3 steps)", "12", 1.0),
    ("nested_braces", "\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("nested_braces_power", "\\boxed{2^{10}}", "1024", 1.0),
    ("equation_vs_value", "\\boxed{x = 5}", "5", 1.0),
    ("plain_equation_vs_value", "Solving, x = 5", "5", 1.0),
    ("value_vs_gold_equation", "\\boxed{5}", "x=5", 1.0),
    ("equation_wrong", "\\boxed{x = 6}", "x=5", 0.0),
    ("interval", "\\boxed{[1,2)}", "[1,2)", 1.0),
    ("interval_wrong_bracket", "\\boxed{(1,2)}", "[1,2)", 0.0),
    ("tuple", "The point is \\boxed{(1, 2)}", "(1,2)", 1.0),
    ("tuple_wrong", "\\boxed{(2, 1)}", "(1,2)", 0.0),
    ("dollar_sign_pred", "It costs $5.", "5", 1.0),
    ("dollar_escaped_boxed", "\\boxed{\\$5}", "5", 1.0),
    ("dollars_word", "It costs 5 dollars", "5", 1.0),
    ("units_cm", "The side is 5 cm long", "5", 1.0),
    ("units_text_in_box", "\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("percent_vs_number", "\\boxed{50\\%}", "50", 1.0),
    ("percent_plain", "The rate is 25%", "25", 1.0),
    ("sqrt", "\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("set_order", "\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", 1.0),
    ("pi", "\\boxed{2\\pi}", "2\\pi", 1.0),
    ("empty", "", "5", 0.0),
    ("whitespace", "   \n ", "5", 0.0),
    ("missing_answer", "I am not sure how to solve this.", "5", 0.0),
    ("empty_box", "\\boxed{}", "5", 0.0),
    ("unclosed_box", "so \\boxed{5", "5", 0.0),
    ("last_number_wins", "We have 72 apples, and after eating some there are 30 left", "72", 0.0),
    ("last_number_wins_correct", "We have 72 apples, and after eating some there are 30 left", "30", 1.0),
    ("answer_word_then_correction", "The answer is 72. Wait, that is wrong; it is 27", "27", 1.0),
    ("chat_list", chat("8 * 9 = \\boxed{72}"), "72", 1.0),
    ("chat_list_wrong", chat("\\boxed{71}"), "72", 0.0),
    ("chat_none_content", [{"role": "assistant", "content": None}], "72", 0.0),
    ("chat_parts_content", [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{72}"}]}], "72", 1.0),
    ("python_code", "__import__('os').system('echo hi')", "0", 0.0),
    ("python_code_boxed", "\\boxed{__import__('os').system('echo hi')}", "0", 0.0),
    ("power_tower_refused", "\\boxed{9^{9^{9^{9}}}}", "72", 0.0),
    ("huge_factorial_refused", "\\boxed{(10^{10})!}", "72", 0.0),
    ("plain_power_tower_refused", "so 9^9^9^9", "72", 0.0),
    ("gsm8k_gold", "\\boxed{72}", "8 times 9 is 72.\n#### 72", 1.0),
    ("math_solution_gold", "\\boxed{\\frac{1}{2}}", "So the probability is $\\boxed{\\frac12}$.", 1.0),
    ("int_gold", "\\boxed{72}", 72, 1.0),
]


@pytest.mark.parametrize(
    "completion,gold,expected", [c[1:] for c in MATH_CASES], ids=[c[0] for c in MATH_CASES]
)
def test_math_reward_cases(completion, gold, expected):
    assert math_reward(["q"], [completion], answer=[gold]) == [expected]


def test_math_reward_case_ids_distinct_and_many():
    ids = [c[0] for c in MATH_CASES]
    assert len(set(ids)) == len(ids) >= 25


def test_math_reward_batch_and_gold_cache():
    completions = ["\\boxed{72}", "\\boxed{27}", chat("\\boxed{72}"), "72", None, 123, {"oops": 1}]
    out = math_reward(None, completions, answer=["72"] * len(completions))
    assert out == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert all(isinstance(x, float) for x in out)


def test_math_reward_garbage_never_raises():
    junk = [
        "$" * 5000,
        "\\boxed{" * 2000,
        "}" * 1000 + "{" * 1000,
        "\\frac{" * 300,
        "(" * 400 + "1" + ")" * 400,
        "x" * 300_000 + " 5",
        "\x00\uffff\ud800 ???",
        b"\\boxed{5}",
        3.5,
        [{"role": "assistant"}],
        [None, 5],
        "\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}",
        "\\boxed{\\prod_{k=1}^{10^{9}} k}",
        "\\boxed{10^{1000000}}",
    ]
    t0 = time.perf_counter()
    out = math_reward(None, junk, answer=["5"] * len(junk))
    assert len(out) == len(junk) and all(x in (0.0, 1.0) for x in out)
    assert out[5] == 1.0  # the huge string still ends with the right number
    assert time.perf_counter() - t0 < 10


def test_math_reward_does_not_execute_code(tmp_path, capfd):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
        f"\\boxed{{__import__('pathlib').Path({str(marker)!r}).touch()}}",
        "__import__('os').system('echo hi')",
        "$__import__('os').system('echo hi')$",
        "eval(\"print('hi')\")",
    ]
    assert math_reward(None, payloads, answer=["0"] * len(payloads)) == [0.0] * len(payloads)
    assert not marker.exists()
    assert "hi" not in capfd.readouterr().out


def test_math_reward_in_worker_thread():
    completions = ["\\boxed{72}", "8 * 9 = 72", "\\boxed{\\frac{1}{2}}", "\\boxed{27}"]
    answers = ["72", "72", "0.5", "72"]
    result, errors = [], []

    def work():
        try:
            result.append(math_reward(None, completions, answer=answers))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    th = threading.Thread(target=work)
    th.start()
    th.join(30)
    assert not errors, errors
    assert result == [[1.0, 1.0, 1.0, 0.0]]


def test_math_reward_argument_errors():
    with pytest.raises(ValueError, match="answer"):
        math_reward(None, ["\\boxed{1}"])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_reward(None, ["1", "2"], answer=["1"])
    # the 'solution' column is accepted when there is no 'answer'
    assert math_reward(None, ["\\boxed{3}"], solution=["3"]) == [1.0]


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{3} then \\boxed{4") == "3"
    assert last_boxed("\\fbox{9}") == "9"
    assert last_boxed("no box") is None


# --------------------------------------------------------------------------- format


def test_format_reward_default_and_pattern():
    comps = ["so \\boxed{4}", "so 4", chat("\\boxed{x+1}"), "\\boxed{}", None]
    assert format_reward(None, comps) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert format_reward(None, ["<answer>4</answer>", "4"], pattern=r"<answer>.*?</answer>") == [1.0, 0.0]
    think = make_format_reward(r"<think>.*?</think>\s*<answer>.*?</answer>", fullmatch=True)
    assert think(None, ["<think>a\nb</think>\n<answer>4</answer>", "x <think></think><answer>4</answer>"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="invalid regex"):
        make_format_reward("(")


# --------------------------------------------------------------------------- loading


def test_load_reward_fn_builtins_and_module():
    assert load_reward_fn("math") is math_reward
    assert load_reward_fn("format") is format_reward
    assert load_reward_fn("frugalrl.rewards.math:math_reward") is math_reward
    assert load_reward_fn("frugalrl.rewards:make_format_reward") is make_format_reward
    f = lambda p, c, **k: [0.0] * len(c)  # noqa: E731
    assert load_reward_fn(f) is f


def test_load_reward_fn_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(
        textwrap.dedent(
            """
            LIMIT = 3
            def short(prompts, completions, **kw):
                return [1.0 if len(c) <= LIMIT else 0.0 for c in completions]
            class Holder:
                @staticmethod
                def nested(prompts, completions, **kw):
                    return [0.5] * len(completions)
            """
        )
    )
    fn = load_reward_fn(f"{path}:short")
    assert fn(None, ["ab", "abcdef"]) == [1.0, 0.0]
    assert load_reward_fn(f"{path}:Holder.nested")(None, ["a"]) == [0.5]


def test_load_reward_fn_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom at import')\n")
    ok = tmp_path / "ok.py"
    ok.write_text("VALUE = 3\n")
    cases = [
        (f"{tmp_path}/missing.py:f", "does not exist"),
        (f"{bad}:f", "boom at import"),
        (f"{ok}:nope", "no attribute 'nope'"),
        (f"{ok}:VALUE", "not a callable"),
        ("frugalrl_no_such_module_xyz:f", "cannot import module"),
        ("frugalrl.rewards:no_such_fn", "no attribute"),
        ("mathh", "not a built-in name"),
        ("", "non-empty"),
    ]
    for spec, msg in cases:
        with pytest.raises(ValueError, match=msg) as info:
            load_reward_fn(spec)
        if spec:
            assert repr(spec) in str(info.value)


# --------------------------------------------------------------------------- combiner


def const(value):
    def fn(prompts, completions, **kw):
        return [value] * len(completions)

    fn.__name__ = f"const_{value}"
    return fn


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def test_combiner_weights_and_per_func():
    comb = RewardCombiner([const(1.0), length_reward], weights=[0.5, 2.0])
    total, per_func, stats = comb(["p", "q"], ["a", "bcd"])
    assert total == [0.5 + 2.0, 0.5 + 6.0]
    assert per_func == {"const_1.0": [1.0, 1.0], "length_reward": [1.0, 3.0]}
    assert stats["reward_errors"] == 0 and stats["reward_timeouts"] == 0
    assert stats["reward/length_reward/mean"] == 2.0
    assert stats["reward/total/mean"] == pytest.approx(4.5)
    with pytest.raises(ValueError, match="2 weights for 1 functions"):
        RewardCombiner([length_reward], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="on_error"):
        RewardCombiner([length_reward], on_error="ignore")


def test_combiner_specs_names_and_columns():
    comb = RewardCombiner(["math", "format", length_reward, length_reward], weights=[1, 1, 0, 0])
    assert comb.names == ["math_reward", "format_reward", "length_reward", "length_reward_2"]
    total, per_func, _ = comb(["q"] * 3, ["\\boxed{4}", "4", "\\boxed{5}"], answer=["4", "4", "4"])
    assert per_func["math_reward"] == [1.0, 1.0, 0.0]
    assert per_func["format_reward"] == [1.0, 0.0, 1.0]
    assert total == [2.0, 1.0, 1.0]


def test_combiner_none_counts_as_zero():
    def sometimes(prompts, completions, **kw):
        return [None if c == "skip" else 1.0 for c in completions]

    total, per_func, stats = RewardCombiner([sometimes, const(0.25)], weights=[2.0, 1.0])(
        None, ["skip", "x", "y", "skip"]
    )
    assert total == [0.25, 2.25, 2.25, 0.25]
    assert per_func["sometimes"] == [0.0, 1.0, 1.0, 0.0]
    assert stats["reward/sometimes/none_frac"] == 0.5
    assert stats["reward/sometimes/mean"] == 1.0  # over the samples it applies to

    total, _, stats = RewardCombiner([const(None)])(None, ["a", "b"])
    assert total == [0.0, 0.0] and math.isnan(stats["reward/const_None/mean"])


def fails_on_bad(prompts, completions, **kw):
    for c in completions:
        if "bad" in c:
            raise RuntimeError("cannot score this")
    return [1.0] * len(completions)


def test_combiner_error_raise_names_culprit():
    comb = RewardCombiner([fails_on_bad], on_error="raise")
    with pytest.raises(RewardError) as info:
        comb(["p0", "p1", "p2"], ["ok", "a bad one", "ok"], answer=["1", "2", "3"])
    err = info.value
    assert isinstance(err, ValueError)
    assert err.func_name == "fails_on_bad" and err.index == 1
    assert err.prompt == "p1" and err.completion == "a bad one"
    assert "cannot score this" in str(err) and "a bad one" in str(err)
    assert isinstance(err.cause, RuntimeError)


def test_combiner_error_zero_scores_failing_samples():
    seen_columns = []

    def picky(prompts, completions, answer, **kw):
        seen_columns.append(list(answer))
        return fails_on_bad(prompts, completions)

    comb = RewardCombiner([picky, const(0.5)], on_error="zero")
    total, per_func, stats = comb(["p"] * 3, ["ok", "bad", "ok"], answer=["1", "2", "3"])
    assert per_func["picky"] == [1.0, 0.0, 1.0]
    assert total == [1.5, 0.5, 1.5]
    assert stats["reward_errors"] == 1
    assert seen_columns[1:] == [["1"], ["2"], ["3"]]  # per-sample re-run slices columns


def test_combiner_batch_only_failure():
    def batch_of_one_only(prompts, completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch too large")
        return [1.0]

    with pytest.raises(RewardError, match="on none of them alone"):
        RewardCombiner([batch_of_one_only])(None, ["a", "b"])
    total, _, stats = RewardCombiner([batch_of_one_only], on_error="zero")(None, ["a", "b"])
    assert total == [1.0, 1.0] and stats["reward_errors"] == 1


def hangs_on_slow(prompts, completions, **kw):
    if any("slow" in c for c in completions):
        time.sleep(2.0)
    return [1.0] * len(completions)


def test_combiner_timeout_zero():
    comb = RewardCombiner([hangs_on_slow, const(0.5)], on_error="zero", timeout_s=0.2)
    t0 = time.perf_counter()
    total, per_func, stats = comb(None, ["fast", "slow"])
    assert time.perf_counter() - t0 < 1.5
    assert per_func["hangs_on_slow"] == [0.0, 0.0]
    assert total == [0.5, 0.5]
    assert stats["reward_errors"] == 1 and stats["reward_timeouts"] == 1


def test_combiner_timeout_raise_names_culprit():
    comb = RewardCombiner([hangs_on_slow], on_error="raise", timeout_s=0.2)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match="timeout_s") as info:
        comb(["p0", "p1"], ["fast", "slow"])
    assert time.perf_counter() - t0 < 1.5
    assert info.value.index == 1 and info.value.completion == "slow" and info.value.prompt == "p1"


def test_combiner_timeout_runs_math_reward_in_worker():
    comb = RewardCombiner(["math"], timeout_s=30)
    total, _, stats = comb(None, ["\\boxed{\\frac{1}{2}}", "0.5", "1"], answer=["0.5"] * 3)
    assert total == [1.0, 1.0, 0.0] and stats["reward_errors"] == 0


RUNAWAY = '''
def runaway(prompts, completions, **columns):
    """Never returns on a completion that says "loop"; else the completions' lengths."""
    if any("loop" in c for c in completions):
        while True:
            pass
    return [float(len(c)) for c in completions]


def beating(prompts, completions, **columns):
    """Never returns, adding a byte to the file BEAT on every turn."""
    while True:
        with open(BEAT, "a") as beat:
            beat.write(".")
'''


def _runaway_file(tmp_path):
    path = tmp_path / "runaway.py"
    path.write_text(RUNAWAY.replace("BEAT", repr(str(tmp_path / "beat"))))
    return path


@pytest.mark.parametrize("on_error", ["zero", "raise"])
def test_timeout_bounds_a_reward_that_never_returns(tmp_path, on_error):
    """A reward loaded from a file loops forever on one sample: the call ends within the deadline
    plus a small margin (twice the deadline under "raise", which first retries per sample), the
    sample scores as reward.on_error says, and the next calls work."""
    from frugalrl.config import RewardConfig
    from frugalrl.rewards import build_reward

    deadline = 0.5
    reward = build_reward(RewardConfig(funcs=[f"{_runaway_file(tmp_path)}:runaway"], on_error=on_error,
                                       timeout_s=deadline), default=None)
    t0 = time.perf_counter()
    if on_error == "zero":
        assert reward(["p0", "p1"], ["ok", "loop"]) == [0.0, 0.0]
        assert reward.last_stats["reward_timeouts"] == 1 and reward.last_stats["reward_errors"] == 1
    else:
        with pytest.raises(RewardError, match="timeout_s") as info:
            reward(["p0", "p1"], ["ok", "loop"])
        assert info.value.index == 1 and info.value.completion == "loop"
    assert time.perf_counter() - t0 < (1 if on_error == "zero" else 2) * deadline + 1.0
    for _ in range(2):
        assert reward(["p0", "p1"], ["ok", "fine"]) == [2.0, 4.0]


def test_a_reward_past_its_deadline_stops_running(tmp_path):
    """A thread could only be abandoned, still spinning; the worker process is killed."""
    comb = RewardCombiner([f"{_runaway_file(tmp_path)}:beating"], on_error="zero", timeout_s=0.3)
    assert comb(None, ["a"])[0] == [0.0]
    beat = tmp_path / "beat"
    size = beat.stat().st_size
    time.sleep(0.5)
    assert size > 0 and beat.stat().st_size == size


def test_timeout_worker_loads_reward_files_by_path_where_it_cannot_fork(tmp_path, monkeypatch):
    """Without fork (macOS, Windows) the worker starts a fresh interpreter, which imports a reward
    given as a spec itself: functions loaded from a file need not be picklable."""
    from frugalrl.rewards import registry

    monkeypatch.setattr(registry, "_START_METHOD", "spawn")
    comb = RewardCombiner([f"{_runaway_file(tmp_path)}:runaway", "format"], on_error="zero", timeout_s=0.5)
    total, per_func, stats = comb(None, ["loop \\boxed{1}", "x"])
    assert per_func["runaway"] == [0.0, 0.0] and per_func["format_reward"] == [1.0, 0.0]
    assert stats["reward_timeouts"] == 1
    assert comb(None, ["ab"])[0] == [2.0]


@pytest.mark.parametrize(
    "output,match,index",
    [
        ([1.0], "returned 1 values for 2 completions", None),
        ([1.0, 2.0, 3.0], "returned 3 values for 2 completions", None),
        ([1.0, float("nan")], "index 1", 1),
        ([float("inf"), 1.0], "index 0", 0),
        ([1.0, "1.0"], "index 1", 1),
        (1.0, "returned a float", None),
    ],
)
@pytest.mark.parametrize("on_error", ["raise", "zero"])
def test_combiner_bad_output(output, match, index, on_error):
    def broken(prompts, completions, **kw):
        return output

    with pytest.raises(RewardError, match=match) as info:
        RewardCombiner([broken], on_error=on_error)(None, ["a", "b"])
    assert "broken" in str(info.value)
    assert info.value.func_name == "broken" and info.value.index == index


def test_combiner_accepts_tuples_bools_and_arrays():
    torch = pytest.importorskip("torch")

    def as_tensor(prompts, completions, **kw):
        return torch.tensor([0.5] * len(completions))

    def as_tuple(prompts, completions, **kw):
        return tuple(True for _ in completions)

    total, _, _ = RewardCombiner([as_tensor, as_tuple])(None, ["a", "b"])
    assert total == [1.5, 1.5]


def test_combiner_prompt_length_mismatch():
    with pytest.raises(ValueError, match="3 prompts for 2 completions"):
        RewardCombiner([length_reward])(["a", "b", "c"], ["x", "y"])


def test_reward_error_is_value_error():
    assert issubclass(RewardError, ValueError)
    assert "frugalrl.rewards" in sys.modules
