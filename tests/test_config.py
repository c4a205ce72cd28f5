"""Configuration machinery: defaults, YAML, overrides, coercion, errors, round trip, help."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugalrl.config import (
    AlgoConfig,
    Config,
    ConfigError,
    FieldSpec,
    Section,
    apply_overrides,
    config_to_dict,
    field_specs,
    format_help,
    load_config,
    opt,
    save_config,
    validate_config,
)

ALL_KEYS = [s.key for s in field_specs()]


def leaf_count(cls) -> int:
    n = 0
    for f in cls.model_fields.values():
        n += leaf_count(f.annotation) if isinstance(f.annotation, type) and issubclass(f.annotation, Section) else 1
    return n


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kw)
    return str(info.value)


# A tree exercising the types the real schema does not use (yet): list and dict of other
# types, Optional, tuple, a nested sub-section, exclusive bounds.
class Deep(Section):
    depth: int = opt(1, "depth", ge=0, le=5)


class Inner(Section):
    flag: bool = opt(False, "a flag")
    tags: list[str] = opt(["a", "b"], "tags")
    weights: dict[str, float] = opt({"x": 1.0}, "weights")
    name: str | None = opt(None, "optional name")
    limit: int | None = opt(None, "optional limit", ge=1)
    mode: Literal["x", "y"] = opt("x", "mode")
    deep: Deep = Deep()


class Toy(Section):
    n: int = opt(1, "n", ge=1)
    ratio: float = opt(0.5, "ratio", gt=0, lt=1)
    pair: tuple[int, int] = opt((1, 2), "pair")
    kind: Literal["a", "b"] = opt("a", "kind")
    inner: Inner = Inner()


def toy(*overrides, path=None) -> Toy:
    return load_config(path, list(overrides), base=Toy())


# --- defaults and specs ----------------------------------------------------------------------

def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.max_steps == 600 and cfg.algo.estimator == "rloo" and cfg.train.lr == 2e-4
    validate_config(Config())  # the schema's own defaults pass their checks


def test_field_specs_flatten_every_option():
    specs = field_specs()
    assert all(isinstance(s, FieldSpec) for s in specs)
    assert len(specs) == leaf_count(Config) == len(set(ALL_KEYS))
    by_key = {s.key: s for s in specs}
    assert "max_steps" in by_key and "algo.estimator" in by_key and "eval.temperature" in by_key
    est = by_key["algo.estimator"]
    assert est.type is str and est.default == "rloo" and "kae" in est.choices and est.help
    assert by_key["max_steps"].type is int and by_key["max_steps"].ge == 1
    assert by_key["rollout.top_p"].gt == 0 and by_key["rollout.top_p"].le == 1
    assert by_key["train.lr"].type is float and by_key["train.lr"].section == "train"
    assert [s.key for s in field_specs(Toy)] == [
        "n", "ratio", "pair", "kind", "inner.flag", "inner.tags", "inner.weights", "inner.name",
        "inner.limit", "inner.mode", "inner.deep.depth"]


def test_opt_range_metadata():
    f = Config.model_fields["max_steps"]
    assert [m.ge for m in f.metadata if hasattr(m, "ge")] == [1] and not any(hasattr(m, "le") for m in f.metadata)
    assert opt(1, "h").description == "h" and opt(1, "h").default == 1 and not opt(1, "h").metadata


# --- YAML files -------------------------------------------------------------------------------

def test_yaml_nested_and_dotted(tmp_path):
    path = write(tmp_path, "max_steps: 7\nalgo:\n  estimator: kae\n  kae_bandwidth: 3\n"
                           "rollout.group_size: 8\ntrain.lr: 3.0e-5\n")
    cfg = load_config(path)
    assert cfg.max_steps == 7 and cfg.algo.estimator == "kae" and cfg.algo.kae_bandwidth == 3.0
    assert cfg.rollout.group_size == 8 and cfg.train.lr == 3e-5
    assert cfg.algo.loss_agg == Config().algo.loss_agg  # untouched keys keep defaults


def test_yaml_empty_file_and_empty_section(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# nothing\nalgo:\n", "b.yaml")) == Config()


def test_yaml_key_set_twice(tmp_path):
    msg = error(path=write(tmp_path, "algo:\n  estimator: kae\nalgo.estimator: grpo\n"))
    assert "algo.estimator" in msg and "twice" in msg and "cfg.yaml" in msg
    msg = error(path=write(tmp_path, "max_steps: 1\nseed: 2\nmax_steps: 3\n", "dup.yaml"))
    assert "duplicate key 'max_steps'" in msg and "line 3" in msg and "dup.yaml" in msg


# --- overrides --------------------------------------------------------------------------------

def test_overrides_win_over_yaml_and_apply_in_order(tmp_path):
    path = write(tmp_path, "max_steps: 7\nalgo: {estimator: kae}\n")
    cfg = load_config(path, ["max_steps=9", "algo.estimator=grpo", "max_steps=11"])
    assert cfg.max_steps == 11 and cfg.algo.estimator == "grpo"


def test_override_section_mapping_and_dashes():
    cfg = load_config(overrides=["algo={estimator: kae, clip_high: 0.3}", "rollout.group-size=4"])
    assert cfg.algo.estimator == "kae" and cfg.algo.clip_high == 0.3 and cfg.rollout.group_size == 4


def test_base_is_copied_not_modified():
    base = Config(max_steps=5)
    cfg = load_config(overrides=["max_steps=6", "algo.estimator=kae"], base=base)
    assert cfg.max_steps == 6 and cfg.algo.estimator == "kae"
    assert base.max_steps == 5 and base.algo.estimator == "rloo"
    assert apply_overrides(base, ["seed=3"]).seed == 3 and base.seed == 0


def test_str_overrides_keep_text():
    cfg = load_config(overrides=["output_dir=2024", "model.name_or_path=", "model.cache_dir=0.10",
                                 "data.train_path='a b.jsonl'"])
    assert cfg.output_dir == "2024" and cfg.model.name_or_path == "" and cfg.model.cache_dir == "0.10"
    assert cfg.data.train_path == "a b.jsonl"


# --- coercion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("3", 3), ("'3'", 3), ("1e3", 1000), ("4.0", 4), ("0x10", 16)])
def test_int_coercion(text, value):
    cfg = load_config(overrides=[f"max_steps={text}"])
    assert cfg.max_steps == value and type(cfg.max_steps) is int


def test_int_from_quoted_yaml_string(tmp_path):
    assert load_config(write(tmp_path, 'max_steps: "12"\n')).max_steps == 12


@pytest.mark.parametrize("text", ["2.5", "abc", "true", "[1]", "{a: 1}", ""])
def test_int_rejects(text):
    msg = error(overrides=[f"max_steps={text}"])
    assert "'max_steps'" in msg and "expected int" in msg


@pytest.mark.parametrize("text, value", [("1", 1.0), ("1e-4", 1e-4), ("3.0e-5", 3e-5), ("'0.5'", 0.5)])
def test_float_coercion(text, value):
    cfg = load_config(overrides=[f"train.lr={text}"])
    assert cfg.train.lr == value and type(cfg.train.lr) is float


@pytest.mark.parametrize("text", ["abc", "true", "nan", ".inf", "1e999"])
def test_float_rejects(text):
    msg = error(overrides=[f"train.lr={text}"])
    assert "'train.lr'" in msg and "expected float" in msg


@pytest.mark.parametrize("text, value", [
    ("true", True), ("false", False), ("yes", True), ("no", False), ("1", True), ("0", False),
    ("True", True), ("OFF", False), ("'yes'", True)])
def test_bool_coercion(text, value):
    assert toy(f"inner.flag={text}").inner.flag is value


@pytest.mark.parametrize("text", ["2", "maybe", "0.5", "[true]"])
def test_bool_rejects(text):
    msg = str(pytest.raises(ConfigError, toy, f"inner.flag={text}").value)
    assert "'inner.flag'" in msg and "expected bool" in msg


def test_list_dict_optional_tuple_literal():
    cfg = toy("inner.tags=[x, 2, 'y z']", "inner.weights={a: 1, b: 2.5}", "inner.name=bob",
              "inner.limit=5", "pair=[3, 4]", "kind=b", "inner.deep.depth=5")
    assert cfg.inner.tags == ["x", "2", "y z"] and cfg.inner.weights == {"a": 1.0, "b": 2.5}
    assert cfg.inner.name == "bob" and cfg.inner.limit == 5 and cfg.pair == (3, 4) and cfg.kind == "b"
    assert cfg.inner.deep.depth == 5
    assert toy("inner.tags=[]").inner.tags == []
    assert toy("inner.name=null").inner.name is None and toy("inner.limit=~").inner.limit is None
    assert toy("inner.limit=None").inner.limit is None and toy("inner.name=").inner.name is None
    assert toy("inner.name='null'").inner.name == "null"


@pytest.mark.parametrize("override, words", [
    ("inner.tags=a", ["'inner.tags'", "expected list[str]"]),
    ("inner.weights=[1]", ["'inner.weights'", "expected dict[str, float]"]),
    ("inner.weights={a: x}", ["'inner.weights.a'", "expected dict[str, float]", "valid number", "got 'x'"]),
    ("inner.limit=abc", ["'inner.limit'", "int | None"]),
    ("inner.limit=0", [">= 1", "got 0"]),
    ("pair=[1, 2, 3]", ["tuple[int, int]", "2 items"]),
    ("pair=[1, x]", ["'pair.1'", "valid integer", "got 'x'"]),
    ("kind=c", ["'a' or 'b'", "got 'c'"]),
    ("inner.mode=z", ["'x' or 'y'", "got 'z'"]),
    ("ratio=1", ["< 1", "got 1"]),
    ("ratio=0", ["> 0"]),
    ("inner.deep.depth=6", ["'inner.deep.depth'", "<= 5", "got 6"]),
    ("inner.deep=3", ["'inner.deep' is a section", "inner.deep.depth"]),
])
def test_toy_errors(override, words):
    msg = str(pytest.raises(ConfigError, toy, override).value)
    for word in words:
        assert word in msg, (word, msg)


# --- errors -----------------------------------------------------------------------------------

def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("override, suggestion", [
    ("estimator=kae", "algo.estimator"),
    ("algo.estimatr=kae", "algo.estimator"),
    ("max_step=3", "max_steps"),
    ("lr=1e-4", "train.lr"),
    ("modle.dtype=float32", "model.dtype"),
])
def test_unknown_key_suggests_closest(override, suggestion):
    msg = error(overrides=[override])
    assert "unknown key" in msg and suggestion in msg and override.split("=")[0] in msg


def test_unknown_key_suggests_both_same_named_options():
    msg = error(overrides=["temperature=0.5"])
    assert "rollout.temperature" in msg and "eval.temperature" in msg


def test_unknown_key_in_section_lists_section_keys():
    msg = error(overrides=["algo.zzzz=1"])  # close to no key, so the section's keys are listed
    assert "section 'algo'" in msg and "algo.estimator" in msg and "algo.reinforce_baseline" in msg


def test_unknown_key_without_match_points_to_help():
    assert "--help" in error(overrides=["zzzzzz=1"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    msg = error(path=write(tmp_path, "algo:\n  estimatr: kae\n"))
    assert "cfg.yaml" in msg and "algo.estimatr" in msg and "algo.estimator" in msg


def test_bad_choice_lists_allowed_values():
    msg = error(overrides=["algo.estimator=grpoo"])
    assert "'algo.estimator'" in msg and "'grpoo'" in msg and "str" in msg
    assert "'grpo', 'dr_grpo', 'rloo', 'reinforce', 'reinforce_pp', 'kae' or 'astar'" in msg
    assert "did you mean 'grpo'" in msg


def test_estimator_gae_names_its_replacement(tmp_path):
    """PPO moved from algo.estimator=gae to algo.loss=ppo: the old setting says what to write instead."""
    msg = error(overrides=["algo.estimator=gae"])
    assert msg.startswith("override 'algo.estimator=gae': ") and "algo.loss=ppo" in msg and "configs/ppo.yaml" in msg
    msg = error(path=write(tmp_path, "algo:\n  estimator: gae\n"))
    assert "cfg.yaml" in msg and "algo.loss=ppo" in msg
    with pytest.raises(ConfigError, match="algo.loss=ppo"):  # a config built in code, not validated
        validate_config(Config.model_construct(algo=AlgoConfig.model_construct(estimator="gae")))


def test_kl_estimator_k1_names_its_replacements(tmp_path):
    """k1 as a loss has expected gradient 0: the old setting says where k1 works and what else to use."""
    msg = error(overrides=["algo.kl_estimator=k1"])
    assert msg.startswith("override 'algo.kl_estimator=k1': ") and "algo.kl_estimator=k1_reward" in msg
    assert "k2" in msg
    msg = error(path=write(tmp_path, "algo:\n  kl_coef: 0.1\n  kl_estimator: k1\n"))
    assert "cfg.yaml" in msg and "algo.kl_estimator=k1_reward" in msg


PPO = ["algo.loss=ppo", "algo.estimator=reinforce", "algo.reinforce_baseline=none"]  # as configs/ppo.yaml
ASTAR = ["algo.estimator=astar", "rollout.temperature=1"]


@pytest.mark.parametrize("overrides, names", [
    # PPO's critic learns from every sample and its GAE replaces the estimator's advantages
    ([*PPO, "train.filter_threshold=0.1"], ["train.filter_threshold", "algo.loss=ppo"]),
    (["algo.loss=ppo"], ["algo.loss=ppo", "algo.estimator=rloo", "algo.estimator=reinforce",
                         "algo.reinforce_baseline=none"]),
    (["algo.loss=ppo", "algo.estimator=reinforce"], ["algo.estimator=reinforce (reinforce_baseline=loo)"]),
    # the A*-PO regression sums log-probs, reads r - V* and has a KL of its own
    ([*ASTAR, "algo.loss_agg=token-mean"], ["algo.loss_agg=token-mean", "algo.loss=astar"]),
    (["algo.loss=astar"], ["algo.loss=astar", "algo.estimator=rloo", "algo.estimator=astar"]),
    (["algo.loss=astar", "algo.estimator=astar"], ["algo.estimator=astar", "rollout.temperature=0.7"]),
    ([*ASTAR, "algo.kl_coef=0.1", "algo.kl_estimator=k1_reward"], ["algo.kl_estimator=k1_reward", "algo.loss=astar"]),
    # the budget always considers the batch's own prompts
    (["rollout.candidates=32"], ["rollout.candidates=32", "rollout.batch_prompts=64"]),
    # dynamic sampling would drop groups that still carry advantages
    *[([*extra, "rollout.dynamic_sampling=true"], ["rollout.dynamic_sampling", f"algo.estimator={est}"])
      for est, extra in [("kae", ["algo.estimator=kae"]), ("reinforce", ["algo.estimator=reinforce"]),
                         ("reinforce_pp", ["algo.estimator=reinforce_pp"]), ("astar", ASTAR), ("reinforce", PPO)]],
])
def test_options_that_would_be_ignored_are_errors_that_name_them(overrides, names):
    msg = error(overrides=overrides)
    for name in names:
        assert name in msg, (name, msg)


@pytest.mark.parametrize("overrides", [
    PPO,
    [*PPO, "algo.kl_coef=0.1", "algo.kl_estimator=k1_reward"],  # PPO-RLHF: the KL in GAE's rewards
    [*ASTAR, "algo.loss_agg=token-mean", "algo.entropy_coef=0.001"],  # it aggregates the entropy bonus
    [*ASTAR, "algo.loss_agg=token-mean", "algo.kl_coef=0.1", "algo.kl_estimator=k3"],
    [*ASTAR, "algo.loss=pg", "algo.kl_coef=0.1", "algo.kl_estimator=k1_reward"],
    ["rollout.candidates=64"],
    *[["rollout.dynamic_sampling=true", f"algo.estimator={est}"] for est in ("grpo", "dr_grpo", "rloo")],
])
def test_the_same_options_where_they_act(overrides):
    load_config(overrides=overrides)


def test_bad_value_in_yaml_names_file_key_value_type(tmp_path):
    msg = error(path=write(tmp_path, "rollout:\n  group_size: two\n"))
    assert "cfg.yaml" in msg and "'rollout.group_size'" in msg and "'two'" in msg and "int" in msg


def test_str_option_rejects_yaml_bool_with_hint(tmp_path):
    msg = error(path=write(tmp_path, "output_dir: yes\n"))
    assert "'output_dir'" in msg and "expected str" in msg and "quotes" in msg


def test_missing_file():
    msg = error(path="/nonexistent/dir/run.yaml")
    assert "/nonexistent/dir/run.yaml" in msg and "No such file" in msg


def test_directory_instead_of_file(tmp_path):
    msg = error(path=str(tmp_path))
    assert str(tmp_path) in msg and "directory" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "max_steps: 3\nseed: 1\nalgo:\n  estimator: [kae\n  clip_low: 0.1\n", "broken.yaml")
    msg = error(path=path)
    assert "broken.yaml" in msg and "not valid YAML" in msg and "line " in msg
    msg = error(path=write(tmp_path, "max_steps: 3\nseed: 1\n  bad: indent\n", "indent.yaml"))
    assert "indent.yaml" in msg and "line 3" in msg


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_yaml_not_a_mapping(tmp_path, text, kind):
    msg = error(path=write(tmp_path, text, "flat.yaml"))
    assert "flat.yaml" in msg and "mapping" in msg and kind in msg


@pytest.mark.parametrize("override", ["max_steps", "algo.estimator", "=3", "  "])
def test_override_without_equals(override):
    msg = error(overrides=[override])
    assert "key=value" in msg


def test_override_without_equals_on_known_key_shows_fix():
    assert "max_steps=VALUE" in error(overrides=["max_steps"])
    assert "seed=VALUE, without dashes" in error(overrides=["--seed"])


@pytest.mark.parametrize("override", ["algo=3", "algo=kae", "algo=[1]", "algo="])
def test_section_given_scalar(override):
    msg = error(overrides=[override])
    assert "'algo' is a section" in msg
    for key in ALL_KEYS:
        if key.startswith("algo."):
            assert key in msg


def test_section_given_scalar_in_yaml(tmp_path):
    msg = error(path=write(tmp_path, "train: 3\n"))
    assert "cfg.yaml" in msg and "'train' is a section" in msg and "train.lr" in msg


def test_option_used_as_section():
    msg = error(overrides=["max_steps.x=1"])
    assert "'max_steps' is an option" in msg and "max_steps=VALUE" in msg


def test_unparseable_override_value():
    msg = error(overrides=["max_steps=[1"])
    assert "max_steps=[1" in msg and "YAML" in msg


# --- range checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, bound", [
    ("max_steps=0", ">= 1"), ("save_every=-1", ">= 0"), ("eval_every=-5", ">= 0"),
    ("rollout.group_size=0", ">= 1"), ("rollout.batch_prompts=0", ">= 1"),
    ("rollout.temperature=0", "> 0"), ("rollout.top_p=0", "> 0"), ("rollout.top_p=1.01", "<= 1"),
    ("rollout.max_new_tokens=0", ">= 1"), ("train.lr=0", "> 0"), ("train.lr=-1e-4", "> 0"),
    ("train.micro_batch=0", ">= 1"), ("data.difficulty=0", ">= 1"), ("data.difficulty=4", "<= 3"),
    ("data.train_size=0", ">= 1"), ("data.eval_size=0", ">= 1"), ("data.sticky_steps=0", ">= 1"),
    ("eval.pass_k=-1", ">= 0"), ("threads=-1", ">= 0"), ("max_wall_s=-0.5", ">= 0"),
    ("algo.kae_bandwidth=0", "> 0"), ("algo.clip_low=-0.1", ">= 0"), ("algo.clip_high=-0.1", ">= 0"),
    ("eval.temperature=0", "> 0"), ("train.max_grad_norm=-1", ">= 0"),
])
def test_range_violations(override, bound):
    key, _, value = override.partition("=")
    msg = error(overrides=[override])
    assert f"'{key}'" in msg and bound in msg and "got" in msg


def option(cfg, key: str):
    """The value of the dotted option ``key`` in ``cfg``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("override, value", [
    ("max_steps=1", 1), ("seed=-7", -7), ("save_every=0", 0), ("rollout.top_p=1", 1.0), ("rollout.top_p=0.01", 0.01),
    ("data.difficulty=1", 1), ("data.difficulty=3", 3), ("rollout.group_size=1", 1), ("eval.pass_k=0", 0),
    ("max_wall_s=0", 0.0), ("algo.clip_low=0", 0.0)])
def test_range_boundaries_accepted(override, value):
    cfg = load_config(overrides=[override, "algo.estimator=kae"])  # kae: group_size=1 is fine for it
    key = override.partition("=")[0]
    assert option(cfg, key) == value and type(option(cfg, key)) is type(option(Config(), key))


PRESETS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def yaml_options(tree: dict, prefix: str = "") -> dict:
    """A preset's YAML as {dotted option: value}: sections and dotted keys both flattened."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ALL_KEYS:
            flat.update(yaml_options(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_load_as_written(path):
    """Every value a preset in configs/ sets, read back from the loaded config: none dropped,
    none overwritten by a default."""
    written = yaml_options(yaml.safe_load(path.read_text()))
    assert written, f"{path.name} sets nothing"
    cfg = load_config(path)
    for key, value in written.items():
        loaded = option(cfg, key)
        if isinstance(loaded, float):  # YAML reads 1e-4 (no dot) as a string; the config coerces it
            value = float(value)
        elif isinstance(loaded, tuple):
            loaded = list(loaded)
        assert loaded == value, f"{path.name}: {key} is {loaded!r}, the file says {value!r}"


def test_bad_base_is_rejected():
    # configs built in code without validation (Config(max_steps=0) itself raises pydantic's ValidationError)
    msg = str(pytest.raises(ConfigError, validate_config, Config.model_construct(max_steps=0)).value)
    assert msg.startswith("base config: ") and "'max_steps'" in msg and ">= 1" in msg and "got 0" in msg
    with pytest.raises(ConfigError, match="'algo.estimator'.*got 'nope'"):
        load_config(base=Config().model_copy(update={"algo": Config().algo.model_copy(update={"estimator": "nope"})}))
    # an override that fixes the bad base value is fine
    assert load_config(overrides=["max_steps=3"], base=Config.model_construct(max_steps=0)).max_steps == 3


# --- round trip ---------------------------------------------------------------------------------

def test_config_to_dict_is_nested_plain_data():
    d = config_to_dict(Config())
    assert d["max_steps"] == 600 and d["algo"]["estimator"] == "rloo" and isinstance(d["train"], dict)
    assert config_to_dict(Toy())["pair"] == [1, 2]


def test_round_trip(tmp_path):
    cfg = load_config(overrides=["max_steps=17", "output_dir=2024", "algo.estimator=kae", "train.lr=3e-6",
                                 "model.name_or_path=yes", "data.train_path=", "rollout.top_p=0.9"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    back = load_config(str(path))
    assert back == cfg and back.output_dir == "2024" and back.model.name_or_path == "yes"


def test_round_trip_toy_tree(tmp_path):
    cfg = toy("inner.tags=[a, '1', 'x: y']", "inner.weights={k: 0.25}", "inner.name=null", "pair=[5, 6]",
              "inner.flag=true", "kind=b")
    save_config(cfg, tmp_path / "toy.yaml")
    assert load_config(tmp_path / "toy.yaml", base=Toy()) == cfg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
       steps=st.integers(1, 10**12), lr=st.floats(1e-12, 1e6))
def test_round_trip_arbitrary_values(tmp_path, text, steps, lr):
    cfg = Config(max_steps=steps, output_dir=text, train={"lr": lr})
    save_config(cfg, tmp_path / "rt.yaml")
    assert load_config(tmp_path / "rt.yaml") == cfg


# --- help ------------------------------------------------------------------------------------------

def test_format_help_lists_every_key():
    text = format_help()
    lines = text.splitlines()
    for spec in field_specs():
        assert any(line.strip().startswith(spec.key + " (") for line in lines), spec.key
    assert "algo options:" in text and "general options:" in text
    assert "algo.estimator (str, default rloo)" in text
    assert "[choices: grpo|dr_grpo|rloo|reinforce|reinforce_pp|kae|astar]" in text
    assert "max_steps (int, default 600) training steps, one rollout batch each" in text
    assert 'model.name_or_path (str, default "")' in text


def test_format_help_generic():
    text = format_help(Toy)
    for spec in field_specs(Toy):
        assert spec.key + " (" in text
    assert "inner.deep options:" in text and 'inner.tags (list[str], default ["a", "b"])' in text
    assert "inner.name (str | None, default null)" in text


# --- robustness ---------------------------------------------------------------------------------------

_values = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "1", "-1", "0", "2.5", "1e-4", "1e999", ".nan", "true", "null", "~", "[", "]", "{",
                     "[1, 2]", "{a: 1}", "{estimator: kae}", "'q'", '"', "!!python/object:os.system", "&a *a",
                     "9" * 5000, "[" * 200, "kae", "grpo", "a: b: c", "- x", "%", "@x", "`", "\x00", "\t"]),
)
_keys = st.one_of(st.sampled_from(ALL_KEYS + ["algo", "train", "model", "max_steps.x", "", ".", "a..b"]),
                  st.text(max_size=15))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", _keys, _values), st.text(max_size=30)),
                max_size=4))
def test_arbitrary_overrides_give_config_or_config_error(overrides):
    try:
        cfg = load_config(overrides=overrides)
    except ConfigError as e:
        assert str(e).strip()
    else:
        assert isinstance(cfg, Config)
        validate_config(cfg)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.builds(lambda k, v: f"{k}={v}",
                          st.sampled_from([s.key for s in field_specs(Toy)] + ["inner", "inner.deep"]), _values),
                max_size=4))
def test_arbitrary_overrides_on_toy_tree(overrides):
    try:
        assert isinstance(toy(*overrides), Toy)
    except ConfigError:
        pass


def test_changed_options_rebuild_the_config_on_top_of_another_base():
    from frugalrl.config import changed_options

    cfg = load_config(overrides=["train.lr=1e-3", "output_dir=runs/x y", "data.task_config={a: {n: 1}}",
                                 "algo.estimator=kae", "eval.pass_k=0", "rollout.top_p=0.9"])
    options = changed_options(cfg)
    assert "train.lr=0.001" in options and 'algo.estimator="kae"' in options and len(options) == 6
    assert load_config(overrides=options) == cfg
    base = load_config(overrides=["train.lr=1e-3", "max_steps=7"])
    assert "train.lr=0.001" not in changed_options(cfg, base) and "max_steps=600" in changed_options(cfg, base)
    assert load_config(overrides=changed_options(cfg, base), base=base) == cfg
