"""A*-PO stage 1: V*(x) of every training prompt from reference-policy samples, cached on disk.

Stage 1 of A*-PO (Brantley et al., arXiv 2505.20686) samples ``algo.vstar_n`` completions of
each training prompt from the reference policy (the starting model) at temperature 1, scores
them, and keeps ::

    V*(x) = beta1 * log( (1/n) * sum_j exp(r_j / beta1) )        (optimal_value; beta1 = 0: the mean)

Stage 2 (``algo.estimator=astar``) then samples one completion per prompt and step. Stage 1 is
the method's up-front cost, ``n`` samples per training prompt, paid once: ``frugalrl vstar``
runs it on its own, and ``frugalrl train`` runs it when no cache exists.

The cache is one JSON file::

    {"version": 2, "model": "<path, for people>",
     "meta": {everything V* depends on: a hash of the model directory's files and the dtype it
              is loaded in, the data options, the reward (reward.funcs, their weights, a hash of
              each user reward file), a hash of the prompt ids, n, beta1, temperature,
              max_new_tokens},
     "prompts": {"<row id>": {"v_star": 0.72, "rewards": [n floats]}, ...}}

Rows are keyed by their id, a hash of the prompt text. A cache whose "meta" differs from the
run's is refused, with the entries that differ and how to rebuild it. By default the file name
carries a hash of "meta" (``model.cache_dir/vstar-<hash>.json``), so a changed model or setting
finds no file and rebuilds instead of tripping over a stale one; ``algo.vstar_path`` names a
fixed file, which is then checked. The model directory's hash is read from its files once and
then kept in ``model.cache_dir/model-digests.json`` against their sizes and times
(``weights_hash``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from frugalrl.advantages import optimal_value
from frugalrl.config import VSTAR_SAMPLING
from frugalrl.data import Task, row_options
from frugalrl.evaluation import score
from frugalrl.models import resolve_model_path
from frugalrl.rewards.registry import reward_source_file
from frugalrl.rollout import generate

# 2: "weights" hashes the model directory's files, not the tensors in memory; the reward is keyed
VERSION = 2
# Stage 1 samples the reference policy itself (the paper's setting): V* is the soft-max value of
# pi_ref, not of a tempered copy of it; the config refuses A*-PO runs that sample otherwise.
TEMPERATURE = VSTAR_SAMPLING["temperature"]


# In model.cache_dir: {model directory: {"files": [[name, size, mtime_ns, ctime_ns], ...], "digest": ...}}
DIGESTS = "model-digests.json"


def _hash_file(h, path: Path) -> None:
    """Feed the bytes of the file at ``path`` to the hash ``h``, 16 MiB at a time."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)


def _file_hash(path: str | Path) -> str:
    """SHA-1 (16 hex digits) of a file's bytes."""
    h = hashlib.sha1()
    _hash_file(h, Path(path))
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; {} when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data) -> None:
    """Write ``data`` to ``path`` atomically: a crash never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def weights_hash(model_dir: str | Path, cache_dir: str | Path) -> str:
    """SHA-1 (16 hex digits) of the files directly in ``model_dir``, names and bytes: the
    weights, config and tokenizer that ``from_pretrained`` loads.

    The bytes are read once: ``cache_dir/model-digests.json`` keeps the digest with each
    file's name, size, mtime and ctime, and only a change in them reads the directory again
    (so that a 7B model's 15 GB are not read on every run). ctime catches a file replaced by
    one of the same size whose mtime was kept (``rsync -a``, ``cp -p``); a touched file is
    read again and, its bytes unchanged, gives the same digest. Files starting with "." or
    "vstar-" and the digests file are left out, in case ``model.cache_dir`` is the model
    directory. A LoRA adapter directory also covers the local base model its
    ``adapter_config.json`` names.
    """
    model_dir = Path(model_dir).resolve()
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and not p.name.startswith((".", "vstar-")) and p.name != DIGESTS)
    stats = [[p.name, s.st_size, s.st_mtime_ns, s.st_ctime_ns] for p, s in ((p, p.stat()) for p in files)]
    digests_path = Path(cache_dir) / DIGESTS
    known = _read_json(digests_path)
    entry = known.get(str(model_dir))
    if isinstance(entry, dict) and entry.get("files") == stats:
        digest = entry["digest"]
    else:
        # the stats were taken first: a file that changes while it is read is read again next time
        h = hashlib.sha1()
        for path, (name, size, *_) in zip(files, stats):
            h.update(f"{name}:{size}\n".encode())
            _hash_file(h, path)
        digest = h.hexdigest()[:16]
        _write_json(digests_path, {**known, str(model_dir): {"files": stats, "digest": digest}})
    base = _read_json(model_dir / "adapter_config.json").get("base_model_name_or_path")
    if isinstance(base, str) and base and Path(base).is_dir():
        digest = hashlib.sha1(f"{digest}:{weights_hash(base, cache_dir)}".encode()).hexdigest()[:16]
    return digest


def reward_meta(reward_cfg) -> dict:
    """The reward V* is computed with: ``reward.funcs``, their weights, and a hash of the file
    that defines each function named by a path or module (it may change under the same spec).
    No funcs means the task's own reward, which the data options already key."""
    funcs = list(reward_cfg.funcs)
    return {"funcs": funcs, "weights": [float(w) for w in reward_cfg.weights] or [1.0] * len(funcs),
            "sources": {spec: _file_hash(path) for spec in funcs if (path := reward_source_file(spec))}}


def stage_one_rows(cfg, task: Task) -> list[dict]:
    """The training rows stage 1 covers: the first ``algo.vstar_prompts`` (0 = all)."""
    n = cfg.algo.vstar_prompts
    return task.train_rows[:n] if n else task.train_rows


def cache_meta(cfg, rows: list[dict]) -> dict:
    """Everything V* depends on; a cache is reused only when its meta equals this. The model is
    the one ``cfg`` names (``resolve_model_path``), as loaded in ``model.dtype``."""
    ids = hashlib.sha1("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]
    data = row_options(cfg.data)
    return {"weights": weights_hash(resolve_model_path(cfg), cfg.model.cache_dir), "dtype": cfg.model.dtype,
            "data": data, "reward": reward_meta(cfg.reward), "prompt_ids": ids, "prompts": len(rows),
            "n": cfg.algo.vstar_n, "beta1": cfg.algo.astar_beta1, "temperature": TEMPERATURE,
            "max_new_tokens": cfg.rollout.max_new_tokens}


def cache_path(cfg, meta: dict) -> Path:
    """``algo.vstar_path``, or ``model.cache_dir/vstar-<hash of meta>.json``."""
    if cfg.algo.vstar_path:
        return Path(cfg.algo.vstar_path)
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.model.cache_dir) / f"vstar-{key}.json"


@torch.no_grad()
def build_cache(cfg, model, tokenizer, task: Task, console: Console | None = None,
                path: str | Path | None = None) -> dict:
    """Run stage 1 on ``model`` (the reference) and write the cache.

    ``model`` must be the model ``cfg`` names, as loaded: the cache is keyed by that model's
    files, not by the tensors in memory (see ``cache_meta``).

    Overwrites the file at ``path`` (default: ``cache_path``); returns a summary (path,
    prompts, n, mean V*, prompts solved by at least one sample). Sampling uses its own RNG,
    seeded from ``cfg.seed``, so a run that builds the cache continues exactly like one that
    found it.
    """
    console = console or Console()
    rows, n = stage_one_rows(cfg, task), cfg.algo.vstar_n
    meta = cache_meta(cfg, rows)
    path = Path(path) if path is not None else cache_path(cfg, meta)
    # one generate call holds about as many completions as a training step's
    per_call = max(1, cfg.rollout.batch_prompts * cfg.rollout.group_size // n)
    rewards = []
    with torch.random.fork_rng(), Progress(
            TextColumn("[bold]A*-PO stage 1: V*[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        torch.manual_seed(cfg.seed)
        bar = progress.add_task("vstar", total=len(rows))
        for start in range(0, len(rows), per_call):
            chunk = rows[start:start + per_call]
            rollout = generate(model, tokenizer, [r["prompt"] for r in chunk for _ in range(n)],
                               max_new_tokens=cfg.rollout.max_new_tokens, **VSTAR_SAMPLING)
            rewards.append(score(task.reward_fn, chunk, rollout.texts, n).view(len(chunk), n))
            progress.update(bar, advance=len(chunk))
    rewards = torch.cat(rewards)
    v_star = optimal_value(rewards.double(), cfg.algo.astar_beta1)
    cache = {"version": VERSION, "model": str(getattr(model, "name_or_path", "")), "meta": meta,
             "prompts": {r["id"]: {"v_star": v, "rewards": z}
                         for r, v, z in zip(rows, v_star.tolist(), rewards.tolist())}}
    _write_json(path, cache)
    summary = {"path": str(path), "prompts": len(rows), "n": n, "v_star_mean": v_star.mean().item(),
               "solved": int((rewards.amax(dim=1) > 0).sum())}
    console.print(f"A*-PO stage 1: V* of {len(rows)} prompts from {n} samples each (mean V* "
                  f"{summary['v_star_mean']:.3f}; {summary['solved']} solved at least once), saved to {path}")
    return summary


def _flat(meta: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def load_cache(path: str | Path, meta: dict) -> dict:
    """The cache at ``path``; ValueError if it was built for anything other than ``meta``."""
    path = Path(path)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"A*-PO V* cache {path} cannot be read ({e}); delete it, or rebuild it with "
                         f"`frugalrl vstar` and the options of this run") from None
    if cache.get("version") != VERSION:
        raise ValueError(f"A*-PO V* cache {path} has format version {cache.get('version')}, not {VERSION}; "
                         f"rebuild it with `frugalrl vstar` and the options of this run (it overwrites the file)")
    old, new = _flat(cache.get("meta", {})), _flat(meta)
    diffs = [f"{k}: cache {old.get(k, '-')!r}, this run {new.get(k, '-')!r}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(f"A*-PO V* cache {path} is stale, it was built for other settings ("
                         + "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
                         + "). Rebuild it with `frugalrl vstar` and the options of this run (it overwrites "
                         "the file), or set algo.vstar_path to another file (empty = one per setting)")
    return cache


def prepare(cfg, model, tokenizer, task: Task, console: Console | None = None) -> tuple[dict[str, float], list[dict]]:
    """What A*-PO stage 2 trains with: V* per prompt id, and the training rows.

    Loads the cache that matches this run, or runs stage 1 when there is none; refuses a stale
    one. The rows are those of stage 1, less the unsolved ones (no sample with reward > 0)
    under ``algo.vstar_drop_unsolved``. Call it before the first update: ``model`` must hold
    the reference (starting) weights, as loaded from the model ``cfg`` names.
    """
    rows = stage_one_rows(cfg, task)
    meta = cache_meta(cfg, rows)
    path = cache_path(cfg, meta)
    if not path.exists():
        build_cache(cfg, model, tokenizer, task, console, path)
    prompts = load_cache(path, meta)["prompts"]
    if cfg.algo.vstar_drop_unsolved:
        rows = [r for r in rows if max(prompts[r["id"]]["rewards"]) > 0]
        if not rows:
            raise ValueError(f"no training prompt was solved by any of the {cfg.algo.vstar_n} reference samples "
                             f"(V* cache {path}), so algo.vstar_drop_unsolved=true leaves nothing to train on; "
                             f"set it to false, or raise algo.vstar_n")
    return {r["id"]: prompts[r["id"]]["v_star"] for r in rows}, rows


def pass_rates(cfg, task: Task) -> dict[str, float]:
    """Stage 1's pass rate of each prompt: the mean reward of its n reference samples (a prior for
    ``rollout.passrate_prior=vstar``). Reads the cache that ``prepare`` found or built for ``task``."""
    rows = stage_one_rows(cfg, task)
    meta = cache_meta(cfg, rows)
    prompts = load_cache(cache_path(cfg, meta), meta)["prompts"]
    return {r["id"]: sum(prompts[r["id"]]["rewards"]) / len(prompts[r["id"]]["rewards"]) for r in rows}
