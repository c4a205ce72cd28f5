"""Loading reward functions and combining several into one reward.

Reward functions follow TRL's signature::

    f(prompts, completions, **columns) -> list[float | None]

``completions`` are strings or chat message lists; every other dataset column arrives as a
keyword argument holding one entry per completion (e.g. ``answer=[...]``). ``None`` means
"this function does not apply to this sample" (TRL semantics).

``load_reward_fn(spec)`` turns a string into such a function: a built-in name (``"math"``,
``"format"``, ``"arithmetic"``), ``"package.module:function"``, or ``"path/to/file.py:function"``.

``RewardCombiner`` calls several functions, checks what they return, and forms the weighted
sum. See its docstring for the error, timeout and ``None`` rules. ``CombinedReward`` puts a
combiner behind the single-function signature, and ``build_reward(cfg.reward, default)`` is
what the trainer scores with: the ``reward.funcs`` of the config, or the task's own reward.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import multiprocessing
import numbers
import os
import signal
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from frugalrl.tasks.arithmetic import arithmetic_reward

from .math import format_reward, math_reward

__all__ = [
    "RewardError",
    "RewardCombiner",
    "check_reward_values",
    "reward_fn_name",
    "reward_source_file",
    "load_reward_fn",
    "register_reward_fn",
    "list_reward_fns",
    "CombinedReward",
    "build_reward",
]

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]

_BUILTINS: dict[str, RewardFn] = {
    "math": math_reward,
    "format": format_reward,
    "arithmetic": arithmetic_reward,
}


class RewardError(ValueError):
    """A reward function failed, timed out, or returned something unusable.

    Attributes: ``func_name``; ``index`` (the offending sample, or None when it could not be
    pinned down); ``prompt`` and ``completion`` of that sample (None when unknown); ``cause``
    (the original exception, if any).
    """

    def __init__(
        self,
        message: str,
        *,
        func_name: str | None = None,
        index: int | None = None,
        prompt: Any = None,
        completion: Any = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.func_name = func_name
        self.index = index
        self.prompt = prompt
        self.completion = completion
        self.cause = cause


# --------------------------------------------------------------------------- registry


def register_reward_fn(name: str, fn: RewardFn | None = None):
    """Register ``fn`` under ``name`` for ``load_reward_fn``; usable as a decorator."""

    def deco(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise ValueError(f"register_reward_fn({name!r}): {f!r} is not callable")
        _BUILTINS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def list_reward_fns() -> list[str]:
    """Names that ``load_reward_fn`` accepts without a ``:``."""
    return sorted(_BUILTINS)


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
    """Resolve a reward-function spec.

    * a registered name: ``"math"`` (``math_reward``), ``"format"`` (``format_reward``),
      ``"arithmetic"`` (the built-in task's ``arithmetic_reward``);
    * ``"package.module:function"`` — imported with ``importlib`` (dotted attributes such as
      ``"module:obj.method"`` are followed);
    * ``"path/to/file.py:function"`` — the file is executed as a fresh module (the path is
      relative to the current directory unless absolute).

    A callable is returned unchanged. Anything that fails raises ``ValueError`` naming the
    spec and what went wrong (file or module missing, error while importing it, attribute
    missing, not callable).
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward function spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in _BUILTINS:
        return _BUILTINS[spec]
    if ":" not in spec or spec.endswith(":"):
        raise ValueError(
            f"reward function spec {spec!r}: not a built-in name ({', '.join(list_reward_fns())}) "
            "and not of the form 'module:function' or 'path/to/file.py:function'"
        )
    target, attr = spec.rsplit(":", 1)
    attr = attr.strip()
    if _looks_like_path(target):
        module = _load_file(spec, target)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ValueError(f"reward function spec {spec!r}: cannot import module {target!r} ({exc})") from exc
        except Exception as exc:
            raise ValueError(
                f"reward function spec {spec!r}: importing module {target!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            where = getattr(module, "__file__", None) or target
            raise ValueError(f"reward function spec {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"reward function spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable"
        )
    return obj


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _file_path(target: str) -> str:
    """The absolute path a path spec's file part names (relative to the current directory)."""
    return os.path.abspath(os.path.expanduser(target))


def reward_source_file(spec: str) -> str | None:
    """The file that defines the reward function of ``spec`` (see ``load_reward_fn``): the
    file of a path spec, the source file of a module spec's module; None for a built-in name,
    or where there is no such file (``load_reward_fn`` says what is wrong with such a spec).
    The spec is not loaded (a module spec's parent packages are imported to find the module)."""
    target, colon, _ = spec.strip().rpartition(":")
    if not colon or spec.strip() in _BUILTINS:
        return None
    if _looks_like_path(target):
        path = _file_path(target)
    else:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            return None
        path = found.origin if found is not None else None
    return path if path and os.path.isfile(path) else None


def _load_file(spec: str, target: str):
    path = _file_path(target)
    if not os.path.isfile(path):
        raise ValueError(f"reward function spec {spec!r}: file {path} does not exist")
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"frugalrl_user_rewards.{''.join(c if c.isalnum() else '_' for c in stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward function spec {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so that pickling / dataclasses inside the file work
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if not isinstance(exc, Exception):
            raise
        raise ValueError(
            f"reward function spec {spec!r}: executing {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


# --------------------------------------------------------------------------- combiner


class _Timeout(Exception):
    pass


# fork: the worker inherits the functions as loaded, whatever they are (closures, functions from
# a file). Where fork is missing or unsafe (macOS, Windows) the worker is a fresh interpreter
# that loads each function from its spec, or unpickles it (a callable must then be picklable).
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
# seconds for a worker to load its functions: past it the worker is taken to be stuck
_START_TIMEOUT_S = 120.0


def _serve(conn, trainer_end, funcs: dict[str, RewardFn | str]) -> None:
    """The worker process: loads ``funcs`` (name -> spec or callable), says ``("ready", None)``,
    then answers each ``(name, prompts, completions, columns)`` on ``conn`` with
    ``("ok", rewards)`` or ``("error", exception)`` until the trainer's end closes."""
    # Ctrl-C is for the trainer, which finishes its step; a forked copy of its SIGTERM handler
    # would keep the worker alive when told to end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    trainer_end.close()  # a copy held here would keep the pipe open after the trainer is gone
    try:
        funcs = {name: load_reward_fn(f) for name, f in funcs.items()}
        conn.send(("ready", None))
    except Exception as exc:
        conn.send(("error", exc))
        return
    while True:
        try:
            name, prompts, completions, columns = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", funcs[name](prompts, completions, **columns))
        except Exception as exc:
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # a value or an exception that does not pickle
            conn.send(("error", TypeError(f"the reward worker could not send back {_preview(reply[1])}: "
                                          f"{_short(exc)}")))


def _stop_worker(process, conn) -> None:
    process.kill()
    process.join()
    conn.close()


class _Worker:
    """Reward functions called in a child process, so that a call past its deadline can be
    stopped: Python cannot kill a thread (one stuck in sympy, or in ``while True``), but it can
    kill a process. The process starts at once, while this process is small (a forked child
    shares the memory of its parent, and a CPU-trained model's pages would be copied as the
    parent writes them), and again after each kill, at the next call."""

    def __init__(self, funcs: dict[str, RewardFn | str]):
        self.funcs = funcs
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context(_START_METHOD)
        conn, child_end = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child_end, conn, self.funcs), name="frugalrl-reward",
                              daemon=True)
        process.start()
        child_end.close()
        self._process, self._conn, self._ready = process, conn, False
        self._stop = weakref.finalize(self, _stop_worker, process, conn)

    def close(self) -> None:
        """Kill the worker process (the next call starts another)."""
        self._stop()
        self._process = None

    def call(self, name: str, prompts: list, completions: list, columns: dict, timeout_s: float) -> Any:
        """What the function ``name`` returns for these arguments, within ``timeout_s`` seconds;
        else ``_Timeout``, and the worker is killed. An exception it raises is raised here."""
        if self._process is None or not self._process.is_alive():
            self.close()
            self._start()
        if not self._ready:
            self._receive(_START_TIMEOUT_S, f"did not load its reward functions within {_START_TIMEOUT_S:g} s")
            self._ready = True
        self._conn.send((name, prompts, completions, columns))
        return self._receive(timeout_s, f"exceeded timeout_s={timeout_s:g}")

    def _receive(self, timeout_s: float, late: str) -> Any:
        """The worker's next reply within ``timeout_s`` seconds, else ``_Timeout(late)``."""
        try:
            arrived = self._conn.poll(timeout_s)
            status, value = self._conn.recv() if arrived else (None, None)
        except (EOFError, OSError):  # the function ended the process (os._exit, a crash, the OOM killer)
            self._process.join(1.0)
            code = self._process.exitcode
            self.close()
            raise RuntimeError(f"the reward worker process ended (exit code {code})") from None
        if not arrived:
            self.close()
            raise _Timeout(late)
        if status == "error":
            raise value
        return value


def reward_fn_name(fn: Any) -> str:
    """A reward function's name for messages and metrics (its ``__name__`` where it has one)."""
    for obj in (fn, getattr(fn, "func", None)):  # functools.partial -> .func
        name = getattr(obj, "__name__", None)
        if isinstance(name, str) and name and name != "<lambda>":
            return name
    return type(fn).__name__ if not hasattr(fn, "__name__") else "reward"  # callable object / lambda


class RewardCombiner:
    """Several reward functions combined into one weighted reward.

    ``RewardCombiner(funcs, weights=None, on_error="raise", timeout_s=0.0)``

    * ``funcs``: callables or specs for ``load_reward_fn`` (a list), or a ``{name: func}``
      mapping. Names default to each function's ``__name__`` (made unique with ``_2``, ...).
    * ``weights``: one finite number per function; default 1.0 each.
    * ``on_error``: what happens when a function raises or exceeds ``timeout_s``:
      ``"raise"`` raises ``RewardError`` carrying the prompt and completion that caused it;
      ``"zero"`` scores 0 instead and counts the failure in ``stats["reward_errors"]``.
    * ``timeout_s``: > 0 calls the functions in a worker process with that deadline per call
      (seconds), killing it when a call runs past (a thread could not be stopped) and starting
      another for the next call; the functions' signature and results are unchanged, but
      whatever state they change stays in the worker. On Linux the worker is forked, so any
      callable works; elsewhere it is a fresh interpreter that loads each function from its spec
      (a callable given directly must then be picklable). 0 calls the function directly, in
      this process, with no deadline.

    ``combiner(prompts, completions, **columns)`` returns ``(total, per_func, stats)``:
    ``total[i] = Σ_f w_f · r_f[i]``; ``per_func[name]`` is function ``f``'s list of rewards
    (unweighted); ``stats`` is a flat dict of numbers for logging: ``reward_errors``,
    ``reward_timeouts``, and per function ``reward/<name>/mean`` (over the samples it applies
    to; NaN when none), ``reward/<name>/none_frac``, ``reward/<name>/time_s``, plus
    ``reward/total/mean``.

    ``None`` from a function means "not applicable" (TRL semantics): it adds 0 to the total,
    is recorded as 0.0 in ``per_func``, and is left out of that function's mean.

    Outputs are checked: a function must return a list (or tuple, or array/tensor with
    ``.tolist()``) of one real number or None per completion. A wrong length, a wrong type,
    or a NaN/inf value raises ``RewardError`` naming the function and the offending index,
    whatever ``on_error`` says: that is a bug in the function, not a hard sample.

    When a batch call raises, the function is run again sample by sample (list-valued
    columns with one entry per completion are sliced, other keyword values are passed
    whole) to find the culprit: with ``on_error="raise"`` the first failing sample's prompt
    and completion go into the ``RewardError``; with ``"zero"`` only the failing samples
    score 0 (each counts as one error). When a batch call times out, ``"zero"`` scores the
    whole batch 0 (one error and one timeout; re-running a hanging function per sample could
    cost ``timeout_s`` per sample), while ``"raise"`` re-runs per sample, each with the same
    deadline, until one fails, and reports that sample.
    """

    def __init__(
        self,
        funcs: Sequence[RewardFn | str] | Mapping[str, RewardFn | str],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        timeout_s: float = 0.0,
    ) -> None:
        if isinstance(funcs, Mapping):
            items = [(str(k), load_reward_fn(v), v) for k, v in funcs.items()]
        else:
            if isinstance(funcs, (str, bytes)) or callable(funcs):
                funcs = [funcs]  # type: ignore[list-item]
            items = []
            for f in funcs:
                fn = load_reward_fn(f)
                items.append((reward_fn_name(fn), fn, f))
        if not items:
            raise ValueError("RewardCombiner needs at least one reward function")
        seen: dict[str, int] = {}
        self.names: list[str] = []
        self.funcs: list[RewardFn] = []
        for name, fn, _ in items:
            seen[name] = seen.get(name, 0) + 1
            self.names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
            self.funcs.append(fn)
        if weights is None:
            self.weights = [1.0] * len(self.funcs)
        else:
            weights = list(weights)
            if len(weights) != len(self.funcs):
                raise ValueError(
                    f"RewardCombiner: {len(weights)} weights for {len(self.funcs)} functions "
                    f"({', '.join(self.names)}); give one weight per function"
                )
            try:
                self.weights = [float(w) for w in weights]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"RewardCombiner: weights must be numbers, got {weights!r}") from exc
            if not all(math.isfinite(w) for w in self.weights):
                raise ValueError(f"RewardCombiner: weights must be finite, got {weights!r}")
        if on_error not in ("raise", "zero"):
            raise ValueError(f"RewardCombiner: on_error must be 'raise' or 'zero', got {on_error!r}")
        self.on_error = on_error
        try:
            self.timeout_s = float(timeout_s or 0.0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"RewardCombiner: timeout_s must be a number, got {timeout_s!r}") from exc
        if not math.isfinite(self.timeout_s) or self.timeout_s < 0:
            raise ValueError(f"RewardCombiner: timeout_s must be >= 0 (0 = no deadline), got {timeout_s!r}")
        # a worker that cannot fork loads each function itself: from its spec where there is one
        sources = [fn if _START_METHOD == "fork" else source for _, fn, source in items]
        self._worker = _Worker(dict(zip(self.names, sources))) if self.timeout_s > 0 else None

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}×{w:g}" for n, w in zip(self.names, self.weights))
        return f"RewardCombiner({parts}, on_error={self.on_error!r}, timeout_s={self.timeout_s:g})"

    # ----------------------------------------------------------------- calling

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[Any], **columns: Any
    ) -> tuple[list[float], dict[str, list[float]], dict[str, float]]:
        completions = list(completions)
        n = len(completions)
        if prompts is None:
            prompts = [None] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(
                f"RewardCombiner: {len(prompts)} prompts for {n} completions; "
                "repeat each prompt once per completion"
            )
        total = [0.0] * n
        per_func: dict[str, list[float]] = {}
        stats: dict[str, float] = {"reward_errors": 0, "reward_timeouts": 0}
        for name, fn, w in zip(self.names, self.funcs, self.weights):
            t0 = time.perf_counter()
            values, errors, timeouts = self._run_one(name, fn, prompts, completions, columns)
            stats[f"reward/{name}/time_s"] = time.perf_counter() - t0
            stats["reward_errors"] += errors
            stats["reward_timeouts"] += timeouts
            applicable = [v for v in values if v is not None]
            stats[f"reward/{name}/mean"] = sum(applicable) / len(applicable) if applicable else math.nan
            stats[f"reward/{name}/none_frac"] = (n - len(applicable)) / n if n else 0.0
            row = [0.0 if v is None else v for v in values]
            per_func[name] = row
            for i, v in enumerate(row):
                total[i] += w * v
        stats["reward/total/mean"] = sum(total) / n if n else math.nan
        return total, per_func, stats

    def _invoke(self, name: str, fn: RewardFn, prompts: list, completions: list, columns: dict) -> Any:
        if self._worker is not None:
            return self._worker.call(name, prompts, completions, columns, self.timeout_s)
        return fn(prompts, completions, **columns)

    def _run_one(
        self, name: str, fn: RewardFn, prompts: list, completions: list, columns: dict
    ) -> tuple[list[float | None], int, int]:
        """Rewards of one function (None kept), number of errors, number of timeouts."""
        n = len(completions)
        try:
            out = self._invoke(name, fn, prompts, completions, columns)
        except _Timeout as exc:
            if self.on_error == "zero":
                logger.warning("reward function %r %s on a batch of %d; scoring the batch 0", name, exc, n)
                return [0.0] * n, 1, 1
            return self._find_culprit(name, fn, prompts, completions, columns, exc, timed_out=True)
        except Exception as exc:
            if n == 1 and self.on_error == "raise":
                raise self._error(name, 0, prompts, completions, exc) from exc
            return self._find_culprit(name, fn, prompts, completions, columns, exc, timed_out=False)
        return check_reward_values(name, out, n), 0, 0

    def _find_culprit(self, name, fn, prompts, completions, columns, batch_exc, timed_out):
        n = len(completions)
        values: list[float | None] = []
        errors = timeouts = 0
        for i in range(n):
            cols = {k: (v[i : i + 1] if _is_per_sample(v, n) else v) for k, v in columns.items()}
            try:
                out = self._invoke(name, fn, prompts[i : i + 1], completions[i : i + 1], cols)
            except (_Timeout, Exception) as exc:
                if self.on_error == "raise":
                    raise self._error(name, i, prompts, completions, exc) from exc
                logger.warning("reward function %r failed on sample %d (%s); scoring it 0", name, i, _short(exc))
                errors += 1
                timeouts += isinstance(exc, _Timeout)
                values.append(0.0)
                continue
            values.extend(check_reward_values(name, out, 1, offset=i))
        if timed_out:
            timeouts += 1
            if self.on_error == "raise":
                raise RewardError(
                    f"reward function {name!r} {batch_exc} on a batch of {n} samples, but no single "
                    "sample did: the function is too slow for this deadline; raise timeout_s",
                    func_name=name,
                    cause=batch_exc,
                )
        if errors == 0 and not timed_out:
            # every sample passes alone, so the failure depends on the batch
            msg = (
                f"reward function {name!r} raised {_short(batch_exc)} on a batch of {n} samples, "
                "but on none of them alone"
            )
            if self.on_error == "raise":
                raise RewardError(msg, func_name=name, cause=batch_exc) from batch_exc
            logger.warning("%s; using the per-sample results", msg)
            errors = 1
        return values, errors, timeouts

    def _error(self, name: str, i: int, prompts: list, completions: list, exc: BaseException) -> RewardError:
        what = str(exc) if isinstance(exc, _Timeout) else f"raised {_short(exc)}"
        return RewardError(
            f"reward function {name!r} {what} on sample {i}: prompt={_preview(prompts[i])}, "
            f"completion={_preview(completions[i])}",
            func_name=name,
            index=i,
            prompt=prompts[i],
            completion=completions[i],
            cause=exc,
        )


class CombinedReward:
    """A ``RewardCombiner`` with TRL's single-function signature: ``f(prompts, completions,
    **columns)`` returns the weighted totals, so that anything that scores with one reward
    function (training, evaluation, A*-PO's stage 1) can use it. ``last_stats`` holds the
    combiner's statistics of the latest call (per-function means, errors, timeouts)."""

    def __init__(self, combiner: RewardCombiner) -> None:
        self.combiner = combiner
        self.__name__ = "+".join(combiner.names)
        self.last_stats: dict[str, float] = {}

    def __call__(self, prompts, completions, **columns) -> list[float]:
        total, _, self.last_stats = self.combiner(prompts, completions, **columns)
        return total


def build_reward(reward_cfg, default: RewardFn) -> RewardFn:
    """The reward to train and evaluate with: ``reward_cfg.funcs`` (``cfg.reward``) combined with
    their weights, error policy and deadline, or ``default`` (the task's own) when none is given.
    A spec that does not load raises ValueError before any work starts."""
    if not reward_cfg.funcs:
        return default
    return CombinedReward(RewardCombiner(reward_cfg.funcs, reward_cfg.weights or None, reward_cfg.on_error,
                                         reward_cfg.timeout_s))


def check_reward_values(name: str, out: Any, n: int, offset: int = 0) -> list[float | None]:
    """The ``n`` values a reward function ``name`` returned, as floats (None kept); a wrong
    container, length or type, or a NaN/inf, raises RewardError naming the function and index
    (``offset`` is added to the index, for per-sample calls)."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy array / torch tensor
    if not isinstance(out, (list, tuple)):
        raise RewardError(
            f"reward function {name!r} returned a {type(out).__name__}; "
            f"it must return a list of {n} numbers (or None)",
            func_name=name,
        )
    if len(out) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(out)} values for {n} completions",
            func_name=name,
        )
    values: list[float | None] = []
    for j, v in enumerate(out):
        i = offset + j
        if v is None:
            values.append(None)
            continue
        if not isinstance(v, numbers.Real):  # bools count as 0/1
            raise RewardError(
                f"reward function {name!r} returned {type(v).__name__} {_preview(v)} at index {i}; "
                "rewards must be real numbers or None",
                func_name=name,
                index=i,
            )
        fv = float(v)
        if not math.isfinite(fv):
            raise RewardError(
                f"reward function {name!r} returned {fv} at index {i}; rewards must be finite",
                func_name=name,
                index=i,
            )
        values.append(fv)
    return values


def _is_per_sample(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _preview(x: Any, limit: int = 200) -> str:
    try:
        s = repr(x)
    except Exception:
        s = f"<unprintable {type(x).__name__}>"
    return s if len(s) <= limit else s[: limit - 3] + "..."
