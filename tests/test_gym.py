"""Tasks from reasoning-gym: rows, splits, the reward against each task's own scorer, config."""

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")

import reasoning_gym  # noqa: E402

from frugalrl.config import ConfigError, load_config  # noqa: E402
from frugalrl.data import load_task  # noqa: E402
from frugalrl.evaluation import evaluate  # noqa: E402
from frugalrl.rewards import RewardCombiner, format_reward, load_reward_fn  # noqa: E402
from frugalrl.tasks import gym  # noqa: E402

# Three kinds of task: a chain of sums, mixed arithmetic, and a word task.
TASKS = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "max_digits": 2},
    "basic_arithmetic": {"max_terms": 3, "max_digits": 2},
    "spell_backward": {},
}


def splits(task="chain_sum", seed=0, size=120, eval_size=40, **kw):
    config = kw.pop("task_config", TASKS.get(task, {}) if isinstance(task, str) else {})
    return gym.make_splits(task, seed=seed, size=size, eval_size=eval_size, task_config=config, **kw)


def columns(rows, repeat=1):
    """Reward keyword columns for ``rows`` (each repeated ``repeat`` times), as the trainer passes them."""
    rows = [r for r in rows for _ in range(repeat)]
    return {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_reproducible_and_disjoint(task):
    train, ev, items = splits(task)
    train2, ev2, _ = splits(task)
    assert train == train2 and ev == ev2  # a function of the seed
    assert len(train) == 120 and len(ev) == 40
    questions = lambda rows: {json.loads(r["entry"])["question"] for r in rows}  # noqa: E731
    assert not questions(train) & questions(ev)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    assert len(questions(train)) == 120 and len({r["id"] for r in train + ev}) == 160
    assert set(items) == {r["id"] for r in train + ev}
    other, other_ev, _ = splits(task, seed=1)
    assert other != train and other_ev != ev
    row = train[0]
    assert {"id", "prompt", "answer", "solution", "task", "entry"} <= set(row) and row["task"] == task
    entry = json.loads(row["entry"])  # JSON-serialisable, with what score_answer needs
    assert entry["answer"] == row["answer"] and entry["source"]["task"] == task
    assert row["solution"] == f"<answer>{row['answer']}</answer>"
    assert row["prompt"].startswith(entry["question"]) and "<answer>" in row["prompt"]


def test_rows_match_the_generator():
    """Each row is the reasoning-gym item at the recorded seed and index."""
    train, _, items = splits("chain_sum", size=10, eval_size=5)
    for row in train:
        src = json.loads(row["entry"])["source"]
        ds = reasoning_gym.create_dataset("chain_sum", seed=src["seed"], size=50, **TASKS["chain_sum"])
        assert ds[src["index"]] == items[row["id"]]
        assert ds[src["index"]]["answer"] == row["answer"]


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("mode", gym.EXTRACTORS)
def test_reward_agrees_with_task_scorer(task, mode):
    train, ev, items = splits(task, size=20, eval_size=10, answer_extract=mode)
    rows = ev[:6]
    reward = gym.GymReward(mode, items=items, options={task: TASKS[task]})
    scorer = reasoning_gym.create_dataset(task, **TASKS[task])
    # right: the solution column is the answer written for this extractor
    right = [r["solution"] for r in rows]
    assert right[0] == gym.format_solution(rows[0]["answer"], mode)
    assert reward(None, right, **columns(rows)) == [1.0] * len(rows)
    assert reward(None, [f"let me think.\n{s}" for s in right], **columns(rows)) == [1.0] * len(rows)
    # wrong answers: whatever the task's scorer says, below full marks gives 0
    wrong = [gym.format_solution(r["answer"] + "7", mode) for r in rows]
    expected = [scorer.score_answer(r["answer"] + "7", items[r["id"]]) for r in rows]
    assert all(e != 1.0 for e in expected)  # (spell_backward can give 1.0000000000000002 here)
    assert reward(None, wrong, **columns(rows)) == [0.0] * len(rows)
    partial = gym.GymReward(mode, partial_credit=True, items=items, options={task: TASKS[task]})
    assert partial(None, wrong, **columns(rows)) == pytest.approx(expected)
    assert partial(None, right, **columns(rows)) == [1.0] * len(rows)
    # malformed: empty, no answer in the extractor's format, chat-message lists, None content
    for bad in ["", "   \n", None, [{"role": "assistant", "content": None}]]:
        assert reward(None, [bad] * len(rows), **columns(rows)) == [0.0] * len(rows)
    chat = [[{"role": "assistant", "content": s}] for s in right]
    assert reward(None, chat, **columns(rows)) == [1.0] * len(rows)


def test_extractors():
    x = gym.extract_answer
    assert x("<answer> 41 </answer>", "answer_tags") == "41"
    assert x("<answer>1</answer> then <answer>2</answer>", "answer_tags") == "2"
    assert x("<answer>41", "answer_tags") is None
    assert x("so \\boxed{\\frac{1}{2}} and \\boxed{7", "boxed") == "\\frac{1}{2}"
    assert x("no box", "boxed") is None
    assert x("work\n 41 \n\n", "last_line") == "41"
    assert x("", "last_line") is None
    assert x("3+4=7#7", "marker") == "7" and x("7", "marker") is None
    with pytest.raises(ValueError, match="answer_tags"):
        x("a", "first_line")


def test_standalone_reward_reads_entry_and_combines():
    """Rows carry how they are scored, so the module-level reward needs no config: it is the
    task's reward as a TRL function, and it combines with other rewards."""
    train, ev, items = splits("spell_backward", size=10, eval_size=4, answer_extract="boxed")
    rows = ev
    fn = load_reward_fn("frugalrl.tasks.gym:reasoning_gym_reward")
    right = [r["solution"] for r in rows]
    assert fn([r["prompt"] for r in rows], right, **columns(rows)) == [1.0] * 4
    assert fn(None, ["<answer>x</answer>"] * 4, **columns(rows)) == [0.0] * 4  # not boxed
    # the JSON entry is enough: a reward built without the items scores the same
    bare = gym.GymReward()
    assert bare(None, right, **{k: v for k, v in columns(rows).items() if k != "id"}) == [1.0] * 4
    total, per_func, _ = RewardCombiner([fn, format_reward], weights=[1.0, 0.5])(
        [r["prompt"] for r in rows], right + [], **columns(rows))
    assert total == [1.5] * 4 and per_func["reasoning_gym_reward"] == [1.0] * 4


def test_mixed_tasks_weights_and_per_task_config():
    names = ["chain_sum", "basic_arithmetic", "spell_backward"]
    train, ev, _ = splits(names, size=300, eval_size=60, weights=[2, 1, 1],
                          task_config={"chain_sum": TASKS["chain_sum"]})
    counts = {n: sum(r["task"] == n for r in train) for n in names}
    assert all(counts.values()) and counts["chain_sum"] > counts["spell_backward"]
    assert {r["task"] for r in ev} == set(names)
    assert splits(names, size=300, eval_size=60, weights=[2, 1, 1],
                  task_config={"chain_sum": TASKS["chain_sum"]})[0] == train
    only, _, _ = splits(names, size=30, eval_size=10, weights=[0, 1, 0])
    assert {r["task"] for r in only} == {"basic_arithmetic"}
    for r in train[:40]:  # chain_sum items obey its options, the others their defaults
        if r["task"] == "chain_sum":
            assert json.loads(r["entry"])["metadata"]["num_terms"] <= 3


def test_task_option_errors():
    with pytest.raises(ValueError, match="chain_sum"):
        gym.parse_tasks("chain_sums")  # suggests the close name
    with pytest.raises(ValueError, match="data.task=NAME"):
        gym.parse_tasks("")
    with pytest.raises(ValueError, match="twice"):
        gym.parse_tasks(["chain_sum", "chain_sum"])
    with pytest.raises(ValueError, match="composite"):
        gym.parse_tasks("composite")
    assert gym.parse_tasks("[chain_sum, 'basic_arithmetic']") == ["chain_sum", "basic_arithmetic"]
    with pytest.raises(ValueError, match="one weight per task"):
        splits(["chain_sum", "basic_arithmetic"], weights=[1])
    with pytest.raises(ValueError, match="max_terms"):
        splits("chain_sum", task_config={"max_term": 3})  # names the real option
    with pytest.raises(ValueError, match="rejected by reasoning-gym"):
        splits("chain_sum", task_config={"min_terms": 5, "max_terms": 2})
    with pytest.raises(ValueError, match="seed"):
        splits("chain_sum", task_config={"seed": 3})
    with pytest.raises(ValueError, match="one mapping per task"):
        splits(["chain_sum", "basic_arithmetic"], task_config={"max_terms": 3})
    with pytest.raises(ValueError, match="expression"):
        splits("spell_backward", prompt_template="{expression} =")  # word items have no expression
    with pytest.raises(ValueError, match="distinct"):  # 1-digit pairs: only 200 distinct questions
        splits("chain_sum", size=500, eval_size=10,
               task_config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})


def test_compact_prompt_and_marker_solution():
    train, _, _ = splits("chain_sum", prompt_template="{expression} =", answer_extract="marker")
    row = train[0]
    assert row["prompt"] == json.loads(row["entry"])["metadata"]["expression"] + " ="
    assert row["solution"] == "#" + row["answer"]


def gym_cfg(*extra):
    return load_config(overrides=["data.source=reasoning_gym", "data.size=50", "data.eval_size=12", *extra])


def test_config_fields():
    cfg = gym_cfg("data.task=[chain_sum, basic_arithmetic]", "data.task_weights=[3, 1]",
                  "data.task_config={chain_sum: {max_terms: 3}}", "data.answer_extract=boxed",
                  "data.partial_credit=true")
    assert gym.parse_tasks(cfg.data.task) == ["chain_sum", "basic_arithmetic"]
    assert cfg.data.task_weights == [3.0, 1.0] and cfg.data.task_config == {"chain_sum": {"max_terms": 3}}
    task = load_task(cfg)
    assert len(task.train_rows) == 50 and len(task.eval_rows) == 12
    assert {r["task"] for r in task.train_rows} == {"chain_sum", "basic_arithmetic"}
    assert all(r["solution"].startswith("\\boxed{") for r in task.train_rows)
    assert load_task(cfg).train_rows == task.train_rows
    for bad, match in [("data.answer_extract=tags", "answer_tags"), ("data.size=-1", ">= 0"),
                       ("data.task_weights=[a]", "float"), ("data.task_config=3", "mapping"),
                       ("data.partial_credit=maybe", "bool")]:
        with pytest.raises(ConfigError, match=match):
            gym_cfg("data.task=chain_sum", bad)
    with pytest.raises(ValueError, match="data.task=NAME"):
        load_task(gym_cfg())  # source=reasoning_gym without a task


def test_size_defaults_to_train_size():
    cfg = gym_cfg("data.task=chain_sum", "data.size=0", "data.train_size=30")
    assert len(load_task(cfg).train_rows) == 30


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym now fails
    with pytest.raises(ValueError, match=r"pip install 'frugalrl\[gym\]'"):
        load_task(gym_cfg("data.task=chain_sum"))


def test_evaluate_reports_per_task_accuracy(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"id": str(i), "prompt": f"{i}=", "answer": "1", "task": "a" if i % 4 else "b"} for i in range(8)]
    reward = lambda prompts, completions, task, **kw: [1.0 if t == "a" else 0.0 for t in task]  # noqa: E731
    out = evaluate(model, tokenizer, rows, reward, max_new_tokens=2, pass_k=2)
    assert out["accuracy"] == pytest.approx(0.75) and out["pass@2"] == pytest.approx(0.75)
    assert out["accuracy/a"] == 1.0 and out["accuracy/b"] == 0.0
    assert out["pass@2/a"] == 1.0 and out["pass@2/b"] == 0.0
    plain = evaluate(model, tokenizer, [{k: v for k, v in r.items() if k != "task"} for r in rows],
                     lambda p, c, **kw: [1.0] * len(c), max_new_tokens=2)
    assert set(plain) == {"accuracy"}  # rows without a task column: keys unchanged


def test_cli_eval_on_gym_task(tiny_model_dir, capsys):
    from frugalrl.cli import main

    code = main(["eval", f"model.name_or_path={tiny_model_dir}", "data.source=reasoning_gym",
                 "data.task=[chain_sum,spell_backward]", "data.size=20", "data.eval_size=8",
                 "data.prompt_template={question}", "data.task_config={chain_sum: {max_terms: 3, max_digits: 2}}",
                 "rollout.max_new_tokens=4", "eval.pass_k=2", "threads=1"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == 8 and out["prompts/chain_sum"] + out["prompts/spell_backward"] == 8
    assert {"accuracy", "pass@2", "accuracy/chain_sum", "accuracy/spell_backward", "pass@2/chain_sum"} <= set(out)


def test_sft_cache_key_ignores_gym_options_for_other_sources():
    from frugalrl.models import embedded_sft_path

    base = load_config(overrides=["data.source=arithmetic"])
    assert embedded_sft_path(base) == embedded_sft_path(load_config(overrides=[
        "data.source=arithmetic", "data.task=chain_sum", "data.answer_extract=boxed"]))
    a = embedded_sft_path(load_config(overrides=["data.source=reasoning_gym", "data.task=chain_sum"]))
    b = embedded_sft_path(load_config(overrides=["data.source=reasoning_gym", "data.task=spell_backward"]))
    assert a != b


def test_task_without_reference_answer():
    """graph_color checks a colouring; it has no single reference answer and so no solution."""
    train, ev, items = splits("graph_color", size=5, eval_size=3)
    assert all(r["answer"] == "" and "solution" not in r for r in train + ev)
    reward = gym.GymReward(items=items)
    assert reward(None, ["<answer>nonsense</answer>", "", None], **columns(ev)) == [0.0, 0.0, 0.0]


def test_chain_sum_preset_builds_its_task_as_documented():
    """configs/gym-chain-sum.yaml as written: enough distinct questions for its sizes, the bare
    expression as the prompt, the answer after '#', scored by chain_sum's own checker."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "gym-chain-sum.yaml")
    task = load_task(cfg)
    assert (len(task.train_rows), len(task.eval_rows)) == (20000, 256) and not cfg.model.name_or_path
    for row in task.train_rows[:50]:
        assert re.fullmatch(r"\d( [+-] \d){1,3} =", row["prompt"]) and row["solution"] == "#" + row["answer"]
    rows = task.eval_rows[:8]
    cols = columns(rows)
    assert task.reward_fn(None, [r["solution"] for r in rows], **cols) == [1.0] * 8
    assert task.reward_fn(None, [f"#{int(r['answer']) + 1}" for r in rows], **cols) == [0.0] * 8
    assert task.reward_fn(None, [r["answer"] for r in rows], **cols) == [0.0] * 8  # no '#': not in the format
