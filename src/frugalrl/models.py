"""Loading the policy: a local Hugging Face model, or the embedded default warmed up by SFT.

``load_policy`` loads it as saved; ``prepare_for_training`` adds gradient checkpointing and
LoRA adapters.

The embedded default is built and trained once, then cached under ``model.cache_dir`` in a
directory named by a hash of everything that determines it (model shape, vocabulary, task,
SFT settings, seed), so a changed setting never picks up a stale model.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoModelForCausalLM, AutoTokenizer

from frugalrl import checkpoint, embedded, gguf_models, lora
from frugalrl.config import config_to_dict
from frugalrl.data import load_task, row_options
from frugalrl.evaluation import evaluate
from frugalrl.prompts import format_task
from frugalrl.sft import StopRule, sft

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Options that only shape reasoning-gym rows: left out of other sources' cache keys, so that
# adding them did not invalidate cached models of the built-in task.
_GYM_ONLY = ("task", "task_weights", "task_config", "size", "answer_extract", "partial_credit")


def _sft_key(cfg) -> str:
    # schedule options left out (row_options), so that presets which change them (KAE's
    # sticky_steps) share the default SFT model instead of building their own
    data = row_options(cfg.data)
    if cfg.data.source != "reasoning_gym":
        data = {k: v for k, v in data.items() if k not in _GYM_ONLY}
        if not data["prompt_template"]:  # it shaped reasoning-gym rows only, until data files took it too
            del data["prompt_template"]
    m = cfg.model
    recipe = {"shape": embedded.MODEL_SHAPE, "vocab": embedded.SPECIAL_TOKENS + embedded.CHARS,
              "data": data, "steps": m.sft_steps, "lr": m.sft_lr, "batch": m.sft_batch, "seed": cfg.seed,
              "target": m.sft_target_accuracy, "eval_every": m.sft_eval_every, "eval_size": m.sft_eval_size,
              "patience": m.sft_patience, "max_wall_s": m.sft_max_wall_s,
              "max_new_tokens": cfg.rollout.max_new_tokens, "version": 3}  # 3: micro-batches, stop rules
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def embedded_sft_path(cfg) -> Path:
    return Path(cfg.model.cache_dir) / f"embedded-{cfg.data.source}-{_sft_key(cfg)}"


def sft_split(rows: list[dict], size: int) -> tuple[list[dict], list[dict]]:
    """(rows the warm-up trains on, rows held out to check it): the last ``size`` rows, at most
    a tenth of them. RL may train on the held-out ones later; the evaluation split stays unseen,
    so that "accuracy before RL" is not the number the warm-up was stopped on."""
    n = min(size, len(rows) // 10)
    return rows[:len(rows) - n], rows[len(rows) - n:]


def build_embedded_sft(cfg, path: str | Path, console: Console | None = None, again: bool = False) -> dict:
    """Build the embedded model, warm it up on the task's worked solutions (its "solution"
    column), save it atomically to ``path`` with ``sft_info.json``; returns that info.

    The warm-up is checked every ``model.sft_eval_every`` steps by its greedy accuracy on
    training problems held out of it (``sft_split``) and stops at the first of (``StopRule``,
    recorded as "stopped"): a check that reaches ``model.sft_target_accuracy`` ("target");
    ``model.sft_patience`` checks without a new best, once halfway there ("patience");
    ``model.sft_max_wall_s`` seconds ("time"); ``model.sft_steps`` steps ("steps"). A fixed
    number of steps is a lottery: the learning curve is steep there and its timing varies by
    seed (700 steps gave 0.30, 0.18, 0.04, 0.15 for seeds 0-3), and RL from a warm-up that has
    not learnt the format gets no signal. A warm-up that stops short of the target is saved all
    the same, and RL starts from it: a task whose answers the model cannot learn to the target
    (or not in the time) still trains. One that the clock stopped short of the target is
    provisional: a later process's ``resolve_model_path`` warms up once more (``again``) rather
    than reuse it, since the clock may only have measured a busy machine.
    """
    console = console or Console()
    tokenizer = embedded.build_tokenizer()
    model = embedded.build_model(tokenizer, seed=cfg.seed)
    task, _ = format_task(load_task(cfg), tokenizer, cfg.data)  # the prompts RL will see
    # before the warm-up, not after it: a prompt too long for the model stops the command at once
    check_prompt_lengths(model, tokenizer, task.train_rows + task.eval_rows, cfg.rollout.max_new_tokens)
    m = cfg.model
    train_rows, check_rows = sft_split(task.train_rows, m.sft_eval_size)
    # The checks generate no further than a completion that imitates the longest worked solution
    # needs (its tokens and EOS): an untrained model that never stops costs that much, not
    # rollout.max_new_tokens (arithmetic: 33 tokens of 48).
    solution_tokens = [len(tokenizer(r.get("solution", ""), add_special_tokens=False)["input_ids"]) for r in check_rows]
    check_tokens = min(cfg.rollout.max_new_tokens, 1 + max(solution_tokens, default=cfg.rollout.max_new_tokens))

    def accuracy(rows: list[dict], max_new_tokens: int) -> float:
        return evaluate(model, tokenizer, rows, task.reward_fn, max_new_tokens=max_new_tokens)["accuracy"]

    rule = StopRule(m.sft_target_accuracy, m.sft_patience, m.sft_max_wall_s, len(check_rows))
    stopped: str | None = None  # why the warm-up stopped before its step cap
    curve: list[list[float]] = []  # [step, accuracy on check_rows]
    plain = not console.is_terminal and not console.quiet  # a log file: the bar shows only at the end

    def on_step(step: int, loss: float) -> bool:
        nonlocal stopped
        progress.update(bar, advance=1, loss=loss)
        if step % m.sft_eval_every == 0:
            checked = bool(m.sft_target_accuracy)
            if checked:
                curve.append([step, accuracy(check_rows, check_tokens)])
                progress.update(bar, acc=f"{curve[-1][1]:.2f}")
                stopped = rule.after_check(curve[-1][1])
            if plain:
                console.print(f"SFT warm-up step {step}/{m.sft_steps}  loss {loss:.3f}  check accuracy "
                              f"{f'{curve[-1][1]:.3f}' if checked else '-'}  {time.perf_counter() - t0:.0f} s")
        if not stopped and rule.out_of_time(time.perf_counter() - t0):
            stopped = "time"
        return bool(stopped)

    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]SFT warm-up[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.3f}  check accuracy {task.fields[acc]}"),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("sft", total=m.sft_steps, loss=float("nan"), acc="-")
        steps, _ = sft(model, tokenizer, train_rows, steps=m.sft_steps, batch_size=m.sft_batch, lr=m.sft_lr,
                       seed=cfg.seed, on_step=on_step)
    stopped = stopped or "steps"
    check = curve[-1][1] if curve and curve[-1][0] == steps else accuracy(check_rows, check_tokens)
    seconds = time.perf_counter() - t0
    reached = check >= m.sft_target_accuracy
    info = {"sft_steps": steps, "max_steps": m.sft_steps, "target_accuracy": m.sft_target_accuracy,
            "check_accuracy": check, "check_problems": len(check_rows), "check_new_tokens": check_tokens,
            "reached_target": reached, "stopped": stopped, "patience": m.sft_patience,
            "max_wall_s": m.sft_max_wall_s, "seconds": round(seconds, 1), "curve": curve,
            "eval_accuracy": accuracy(task.eval_rows, cfg.rollout.max_new_tokens), "data": config_to_dict(cfg.data),
            "parameters": sum(p.numel() for p in model.parameters()), "again": again}
    with checkpoint.atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "sft_info.json").write_text(json.dumps(info, indent=1))
    _WARMED_HERE.add(Path(path))
    why = {"target": f"its target (model.sft_target_accuracy={m.sft_target_accuracy:g})",
           "patience": f"its patience (model.sft_patience={m.sft_patience} checks without a new best)",
           "time": f"its time limit (model.sft_max_wall_s={m.sft_max_wall_s:g})",
           "steps": f"its step cap (model.sft_steps={m.sft_steps})"}[stopped]
    if not reached:
        more = {"patience": "raise model.sft_patience (0 = never)", "time": "raise model.sft_max_wall_s (0 = no limit)",
                "steps": "raise model.sft_steps"}[stopped]
        top = max((acc for _, acc in curve), default=check)
        best = f" (best check {top:.3f})" if top > check else ""
        console.print(f"[bold yellow]SFT warm-up stopped short of model.sft_target_accuracy={m.sft_target_accuracy:g}"
                      f"[/], by {why}, with accuracy {check:.3f} on {len(check_rows)} held-out training problems"
                      f"{best}: RL starts from there, and a weak warm-up may give it little signal (all-wrong "
                      f"groups); to warm up longer, {more}")
    console.print(f"SFT warm-up: {steps} steps in {seconds:.0f} s, stopped by {why}; greedy accuracy "
                  f"{check:.3f} on held-out training problems, {info['eval_accuracy']:.3f} on the evaluation split; "
                  f"saved to {path}")
    return info


def sft_info(path: str | Path) -> dict | None:
    """The ``sft_info.json`` of a model directory built by ``build_embedded_sft``, else None."""
    file = Path(path) / "sft_info.json"
    return json.loads(file.read_text()) if file.is_file() else None


# The warm-ups this process built: its own provisional one it keeps using (a run resolves its model
# more than once), where a later process would warm up again.
_WARMED_HERE: set[Path] = set()


def resolve_model_path(cfg, console: Console | None = None) -> Path:
    """The directory to load: ``model.name_or_path``, the dequantised copy of a GGUF model
    (``gguf_models``), or the cached embedded SFT model (built first when missing or incomplete)."""
    if converted := gguf_models.resolve(cfg.model, console):
        return converted
    if cfg.model.name_or_path:
        path = Path(cfg.model.name_or_path)
        if not path.is_dir():
            raise ValueError(f"model.name_or_path={cfg.model.name_or_path}: no such directory; give a local "
                             "Hugging Face model directory, a .gguf file, a shipped model ("
                             f"{', '.join(gguf_models.SHIPPED)}), or leave it empty for the embedded model")
        return path
    path = embedded_sft_path(cfg)
    info = sft_info(path) if checkpoint.is_complete(path) else None
    if info is None:
        (console or Console()).print(f"embedded model not cached yet: building it in {path}")
        build_embedded_sft(cfg, path, console)
    elif info["stopped"] == "time" and not info["reached_target"] and path not in _WARMED_HERE:
        # Provisional: the run that built it used it, but a warm-up cut short by the clock may only
        # say that the machine was busy (measured: 56 steps in 280 s at check accuracy 0.00 beside
        # a benchmark, where a quiet machine reaches the target in ~900 steps), and cached it would
        # hand every later run a model that cannot answer. Once more only: a task that the model
        # cannot learn in the time would otherwise pay for a warm-up on every run.
        what = (f"the cached warm-up in {path} stopped on its time limit (model.sft_max_wall_s={info['max_wall_s']:g}) "
                f"after {info['sft_steps']} steps at check accuracy {info['check_accuracy']:.3f}, short of its target "
                f"{info['target_accuracy']:g}")
        if info.get("again"):
            (console or Console()).print(f"[yellow]{what}, twice[/]: used as it is (delete that directory to warm "
                                         "up again on a quiet machine, or raise model.sft_max_wall_s, 0 = no limit)")
        else:
            (console or Console()).print(f"[bold yellow]{what}[/]: warming up once more, in case the machine was busy "
                                         "(raise model.sft_max_wall_s, 0 = no limit, if it needs longer)")
            build_embedded_sft(cfg, path, console, again=True)
    return path


@contextmanager
def cpu_threads(n: int):
    """Run the block with ``n`` torch CPU threads (0: torch's count as it is), then put back the caller's."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def policy_device(cfg) -> str:
    """Where the policy lives: ``model.device``, with auto = cuda when torch sees a GPU, else cpu."""
    device = cfg.model.device if cfg.model.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device=cuda, but torch sees no CUDA GPU; use model.device=cpu (or auto)")
    return device


def load_policy(cfg, console: Console | None = None):
    """(model, tokenizer) in training mode, in ``model.dtype`` on ``model.device``; the tokenizer
    pads on the left.

    A directory without a usable tokenizer or model raises a one-line ValueError.
    """
    path = resolve_model_path(cfg, console)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:  # transformers' messages span lines; keep the first
        raise ValueError(f"{path}: cannot load a tokenizer ({str(e).strip().splitlines()[0]}); the model "
                         "directory needs the tokenizer files too (tokenizer.save_pretrained(DIR))") from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.model.dtype])
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load a causal language model ({str(e).strip().splitlines()[0]}); "
                         "give a directory written by save_pretrained (config.json and weights)") from e
    model.to(policy_device(cfg))
    model.train()
    return model, tokenizer


def prepare_for_training(model, cfg):
    """The policy as training wants it: gradient checkpointing (``model.gradient_checkpointing``)
    and LoRA adapters (``lora.r > 0``, see ``lora.py``). Separate from ``load_policy`` because
    what is computed from the starting model (A*-PO's V*, keyed by a hash of its weights) must
    see it as loaded."""
    if cfg.model.gradient_checkpointing:
        # non-reentrant checkpointing also works when no input needs grad (frozen embeddings, LoRA)
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if cfg.lora.r:
        model = lora.wrap(model, cfg.lora)
    model.train()
    return model


def _context_length(model) -> int | None:
    """The longest sequence the model accepts, from its config (None when it does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_lengths(model, tokenizer, rows: list[dict], max_new_tokens: int) -> None:
    """Raise a ValueError naming the longest prompt of ``rows`` when it plus ``max_new_tokens``
    does not fit the model's context."""
    limit = _context_length(model)
    if limit is None or not rows:
        return
    # No tokenizer makes more tokens than UTF-8 bytes plus its special tokens (+1 for a
    # SentencePiece word-start), so only prompts above that bound need tokenizing: the check
    # stays cheap on large datasets.
    extra = len(tokenizer("")["input_ids"]) + 1
    candidates = [r for r in rows if len(r["prompt"].encode()) + extra + max_new_tokens > limit]
    if not candidates:
        return
    lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in candidates])["input_ids"]]
    n, row = max(zip(lengths, candidates), key=lambda pair: pair[0])
    if n + max_new_tokens <= limit:
        return
    fix = (f"lower rollout.max_new_tokens to {limit - n} or shorten it" if n < limit
           else "shorten it or drop it from the data")
    raise ValueError(f"prompt {row['id']} is {n} tokens, and with rollout.max_new_tokens={max_new_tokens} it "
                     f"exceeds the model's context of {limit} tokens; {fix}")
