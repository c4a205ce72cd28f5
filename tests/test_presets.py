"""Every preset in configs/ trains on the embedded task from the embedded SFT checkpoint.

The checkpoint is the one ``frugalrl train`` builds with no model named (default SFT settings,
about 3 minutes on 2 cores), built once for the session. Each preset then runs as written
except for sizes: 64 completions per step, 30 steps (A*-PO 60), on a fixed pool of 64 training problems so
that 30 steps are enough to see the mean reward rise above the sampling noise (new problems
every step would need hundreds of steps, as the bench train runs show)."""

import json
from pathlib import Path

import pytest

from frugalrl.config import load_config
from frugalrl.models import cpu_threads, resolve_model_path
from frugalrl.trainer import build_estimator, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "kae", "astar", "dash", "ppo")
STEPS, COMPLETIONS = 30, 64
# A*-PO samples at temperature 1 (the distribution V* is the value of), where the reward rises
# more slowly than at the other presets' 0.7: in CI one run gained only +0.06 in 30 steps; 60
# steps gained +0.26 to +0.37 over 4 seeds here (about 20 s). RLOO from the warm-up of issue #27's
# stop rules gained +0.10, +0.21, +0.18 in 30 steps for seeds 0-2 (seed 0, the test's, at the
# threshold) and +0.26 in 60.
LONGER = {"astar": 60, "rloo": 60}


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """The embedded default model after its default SFT warm-up, in a session cache; with no time
    limit, so that a busy machine slows the warm-up down but does not stop it short of its target."""
    with cpu_threads(2):  # both cores for the SFT build; the rest of the suite keeps conftest's one
        return resolve_model_path(load_config(overrides=[f"model.cache_dir={tmp_path_factory.mktemp('cache')}",
                                                         "model.sft_max_wall_s=0"]))


def test_every_algorithm_has_a_preset():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_from_the_sft_checkpoint(name, tmp_path, sft_checkpoint):
    G = load_config(CONFIGS / f"{name}.yaml").rollout.group_size
    steps = LONGER.get(name, STEPS)
    # sizes only: estimator, G, learning rate, schedule, updates, filtering stay the preset's
    cfg = load_config(CONFIGS / f"{name}.yaml", [
        f"model.name_or_path={sft_checkpoint}", f"model.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'run'}", f"max_steps={steps}", "eval_every=0", "save_every=0",
        f"rollout.batch_prompts={COMPLETIONS // G}", "data.train_size=64", "algo.vstar_prompts=0",
        "threads=2"])  # both cores for these minutes-long runs; train() gives the suite back its one
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert len(rewards) == steps
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert first > 0.15, (name, first)  # the warmed-up model, not a random one (which scores 0)
    assert last > first + 0.1, (name, first, last)


def test_config_options_reach_the_estimator():
    est = build_estimator(load_config(CONFIGS / "kae.yaml", ["algo.kae_scale=batch", "algo.kae_auto_c=2.5",
                                                             "algo.kae_bandwidth_mode=auto"]))
    assert (est.name, est.scale, est.auto_c, est.bandwidth_mode) == ("kae", "batch", 2.5, "auto")
    assert build_estimator(load_config(CONFIGS / "kae.yaml")).scale == "none"  # off by default
    assert build_estimator(load_config(CONFIGS / "astar.yaml"), {"p0": 0.5}).v_star == {"p0": 0.5}
    # PPO: the sequence-level signal is the reward itself; the critic's per-token baseline comes in update.py
    ppo = build_estimator(load_config(CONFIGS / "ppo.yaml"))
    assert (ppo.name, ppo.baseline) == ("reinforce", "none")
