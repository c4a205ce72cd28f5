"""Math answer rewards built on math-verify.

``math_reward`` follows TRL's reward-function signature::

    math_reward(prompts, completions, answer=[...], **other_columns) -> list[float]

and scores 1.0 where the final answer of a completion is mathematically equal to the
reference answer, else 0.0.

Final answer of a completion
    The content of the LAST complete ``\\boxed{...}`` (or ``\\fbox{...}``; nested braces and
    escaped ``\\{ \\}`` are handled; an unclosed, truncated box is ignored). When the text has
    no complete box, the last number or expression in it, found with math-verify's own LaTeX
    and plain-expression extraction, restricted to its *unanchored* patterns so that the
    rightmost candidate wins (math-verify would otherwise prefer an earlier "the answer is
    X" over a later number). A box is authoritative: when one exists, nothing outside it is
    looked at, and an empty or unparsable box scores 0. An answer that is arithmetic left
    undone (numbers joined by + - × only, such as a restated question "86 * 50 + 40") is no
    answer and scores 0, unless the reference is written so too.

Reference answers
    Plain strings such as ``"72"``, ``"\\frac{1}{2}"``, ``"x=5"``, ``"(1,2)"``, ``"$1,000"``;
    ints and floats are accepted too. A reference containing ``\\boxed{}`` (a MATH-style
    solution) uses its last box; one containing ``####`` (a GSM8K-style solution) uses the
    text after the last ``####``. Each distinct reference is parsed once per call (and
    kept in a bounded cache across calls).

math-verify behaviour worth knowing (all intended upstream): ``(1,2)`` parses as the open
interval, which also equals the set ``\\{1,2\\}``; a percentage equals both its number and
its fraction (``50\\%`` = ``50`` = ``0.5``); units and currency are stripped (``5 cm``,
``\\$5``, ``5\\text{ dollars}`` all give 5), but ``\\text{72 apples}`` is one symbol, not 72;
``x = 5`` equals ``5`` in either direction; floats match to 6 decimals (``1/3`` =
``0.333333`` but not ``0.33``).

Equality is math-verify's ``verify(gold, pred)`` (it is not symmetric: the reference is the
gold). Safety and cost:

* No model text is evaluated as Python. LaTeX goes through latex2sympy's ANTLR parser;
  math-verify's plain-expression path hands sympy's ``parse_expr`` only strings made of
  digits, operators and parentheses (its extraction regex admits nothing else).
* math-verify's timeouts use ``signal.alarm`` and fail off the main thread, so they are used
  only on the main thread and disabled (``None``) in worker threads. Since a signal cannot
  interrupt a long C-level big-integer computation anyway, every parsed answer is first
  screened for expressions whose evaluation would blow up (power towers such as
  ``9^{9^{9^9}}``, huge factorials, products over huge ranges, very large trees); such an
  answer scores 0 without being compared. Texts are also capped in length.
* Malformed completions (empty, ``None`` content, garbage, huge strings) score 0; this
  function does not raise on them.
* In a worker thread nothing bounds a slow symbolic ``simplify`` inside ``verify``; run the
  reward under ``RewardCombiner(..., timeout_s=...)`` for a wall-clock bound.
"""

from __future__ import annotations

import logging
import math as _m
import re
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from frugalrl.completions import completion_text

__all__ = [
    "math_reward",
    "format_reward",
    "make_format_reward",
    "completion_text",
    "last_boxed",
    "extract_final_answer",
    "parse_answer",
    "parse_gold",
    "answers_match",
    "unfinished_arithmetic",
]

logger = logging.getLogger(__name__)

# Only the tail of a completion is searched for an unboxed final answer: the last number is
# near the end, and math-verify's regexes get slow on very long texts.
MAX_TAIL_CHARS = 4000
# Longest completion that is scanned for boxes (longer ones: their last part).
MAX_COMPLETION_CHARS = 200_000
# A boxed answer longer than this is not an answer; it scores 0.
MAX_ANSWER_CHARS = 1000
# Signal-based timeouts (seconds; integers, as signal.alarm wants) used on the main thread.
PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5

# Cost screen: an answer whose evaluation may materialise a number with more than
# _MAX_LOG10 decimal digits (or a tree too big or deep) is refused.
_MAX_LOG10 = 100_000.0
_MAX_NODES = 3000
_MAX_DEPTH = 200


# --------------------------------------------------------------------------- text helpers


_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces are matched (nested groups are kept whole); ``\\{`` and ``\\}`` do not count as
    grouping braces. "Last" is the box that opens last among those that close, so an
    unclosed (truncated) box is skipped and the one before it is used.
    """
    if not isinstance(text, str) or ("boxed" not in text and "fbox" not in text):
        return None
    stack: list[tuple[bool, int]] = []  # (is_box, content_start)
    best: tuple[int, int] | None = None
    for tok in _BOX_TOKEN.finditer(text):
        s = tok.group()
        if s[0] == "\\" and len(s) == 2:  # escaped brace
            continue
        if s == "}":
            if stack:
                is_box, start = stack.pop()
                if is_box and (best is None or start > best[0]):
                    best = (start, tok.start())
            continue
        stack.append((s != "{", tok.end()))
    if best is None:
        return None
    return text[best[0] : best[1]]


def _clip(text: str) -> str:
    if len(text) > MAX_COMPLETION_CHARS:
        text = text[-MAX_COMPLETION_CHARS:]
    return text


def _tail(text: str) -> str:
    """The last MAX_TAIL_CHARS of ``text``, starting at a whitespace so no number is cut."""
    if len(text) <= MAX_TAIL_CHARS:
        return text
    tail = text[-MAX_TAIL_CHARS:]
    m = re.search(r"\s", tail)
    return tail[m.end() :] if m else ""


def extract_final_answer(completion: Any) -> str | None:
    """The boxed final answer's source text, if the completion has a complete box.

    (Without a box the answer is found by math-verify's extraction inside ``parse_answer``;
    this helper is for logging and debugging.)
    """
    return last_boxed(_clip(completion_text(completion)))


# --------------------------------------------------------------------------- math-verify glue


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeouts are disabled; we disable them on purpose
    in worker threads (see the module docstring), so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not str(record.msg).startswith("Timeout is disabled")
        except Exception:  # pragma: no cover
            return True


@lru_cache(maxsize=1)
def _mv() -> dict[str, Any]:
    """Import math-verify lazily (it pulls in sympy and the ANTLR parser, ~1 s)."""
    import math_verify
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    from math_verify.errors import TimeoutException

    for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())

    # One config everywhere: math-verify caches its compiled regexes for one config only.
    # Boxes get top priority; the unanchored list below drops the boxed patterns anyway.
    config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    unanchored = extract = mv_timeout = None
    try:  # internal helpers: used to keep only the unanchored ("last match") patterns
        from math_verify.parser import extract_target_from_pred, get_extraction_regexes
        from math_verify.utils import timeout as mv_timeout

        extract = extract_target_from_pred
        regexes = get_extraction_regexes(config)
        unanchored = [
            ([(pat, prio) for pat, prio in pats if prio >= 300], cfg) for pats, cfg in regexes
        ]
        if not all(pats for pats, _ in unanchored):
            unanchored = None
    except Exception:  # pragma: no cover - math-verify internals changed
        logger.warning("math-verify internals changed; using its anchored extraction")
        unanchored = None
    return {
        "parse": math_verify.parse,
        "verify": math_verify.verify,
        "Timeout": TimeoutException,
        "config": config,
        "unanchored": unanchored,
        "extract": extract,
        "timeout": mv_timeout,
    }


def _parse_timeout() -> int | None:
    return PARSE_TIMEOUT_S if _on_main_thread() else None


def _mv_parse(text: str, config) -> list:
    mv = _mv()
    try:
        return mv["parse"](text, extraction_config=config, parsing_timeout=_parse_timeout())
    except (Exception, mv["Timeout"]):  # parse already catches most; be sure
        logger.debug("math-verify parse failed", exc_info=True)
        return []


def _parse_unanchored(text: str) -> list:
    mv = _mv()
    if mv["unanchored"] is None:
        return _mv_parse(text, mv["config"])
    try:
        run = mv["timeout"](timeout_seconds=_parse_timeout())(mv["extract"])
        return run(text, mv["unanchored"], fallback_mode="first_match", extraction_mode="any_match")
    except (Exception, mv["Timeout"]):
        logger.debug("math-verify extraction failed", exc_info=True)
        return []


def parse_answer(completion: Any) -> list:
    """Parse a completion's final answer with math-verify (see the module docstring).

    Returns math-verify's list of candidates (sympy objects and a fallback string); empty
    when there is no usable answer or it is too costly to evaluate.
    """
    text = _clip(completion_text(completion))
    if not text.strip():
        return []
    boxed = last_boxed(text)
    if boxed is not None:
        if not boxed.strip() or len(boxed) > MAX_ANSWER_CHARS:
            return []
        parsed = _mv_parse("\\boxed{" + boxed + "}", _mv()["config"])
    else:
        parsed = _parse_unanchored(_tail(text))
    return _screen(parsed)


def _gold_text(gold: Any) -> str | None:
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, (int, float)):
        if isinstance(gold, float) and not _m.isfinite(gold):
            return None
        return repr(gold) if isinstance(gold, float) else str(gold)
    if not isinstance(gold, str):
        try:  # numpy / sympy numbers and the like
            gold = str(gold)
        except Exception:
            return None
    gold = gold.strip()
    if "####" in gold:  # GSM8K-style "reasoning #### 72"
        gold = gold.rsplit("####", 1)[1].strip()
    boxed = last_boxed(gold)
    if boxed is not None:
        gold = boxed.strip()
    if gold.startswith("$$") and gold.endswith("$$") and len(gold) > 4:
        gold = gold[2:-2].strip()
    elif gold.startswith("$") and gold.endswith("$") and len(gold) > 2 and gold.count("$") == 2:
        gold = gold[1:-1].strip()
    return gold or None


def parse_gold(gold: Any) -> list:
    """Parse a reference answer (see the module docstring); empty list if unusable."""
    text = _gold_text(gold)
    if text is None:
        return []
    mv = _mv()
    parsed = []
    if len(text) <= MAX_ANSWER_CHARS:
        parsed = _mv_parse("\\boxed{" + text + "}", mv["config"])
    if not any(not isinstance(p, str) for p in parsed):
        # not LaTeX-parsable as a whole: let math-verify find an expression in it
        fallback = _mv_parse(text[-MAX_TAIL_CHARS:], mv["config"])
        if any(not isinstance(p, str) for p in fallback):
            parsed = fallback
    return _screen(parsed)


def answers_match(gold_parsed: list, pred_parsed: list) -> bool:
    """math-verify's ``verify`` with the right timeout for the current thread."""
    if not gold_parsed or not pred_parsed:
        return False
    mv = _mv()
    timeout_s = VERIFY_TIMEOUT_S if _on_main_thread() else None
    try:
        return bool(mv["verify"](gold_parsed, pred_parsed, timeout_seconds=timeout_s))
    except (Exception, mv["Timeout"]):
        logger.debug("math-verify verify failed", exc_info=True)
        return False


# --------------------------------------------------------------------------- cost screen


def _screen(parsed: list) -> list:
    """Drop candidates whose comparison could hang (see ``_too_costly``)."""
    out = []
    for p in parsed:
        if isinstance(p, str):
            out.append(p)
            continue
        try:
            if _too_costly(p):
                logger.debug("answer refused as too costly to evaluate")
                continue
        except Exception:
            continue
        out.append(p)
    # a lone fallback string (the sympy form was refused) could still match textually;
    # that is harmless, so it is kept.
    return out


def _too_costly(expr: Any) -> bool:
    counter = [0]
    return _log10_bound(expr, counter, 0) > _MAX_LOG10


@lru_cache(maxsize=1)
def _sympy_types():
    import sympy
    from sympy.concrete.expr_with_limits import ExprWithLimits

    factorials = tuple(
        getattr(sympy, n)
        for n in ("factorial", "factorial2", "subfactorial", "gamma", "binomial", "RisingFactorial", "FallingFactorial")
        if hasattr(sympy, n)
    )
    return sympy, factorials, ExprWithLimits


def _log10_bound(e: Any, counter: list[int], depth: int) -> float:
    """Rough upper bound of log10 |value| that evaluating ``e`` may reach (inf = refuse)."""
    sympy, factorials, with_limits = _sympy_types()
    counter[0] += 1
    if counter[0] > _MAX_NODES or depth > _MAX_DEPTH:
        return _m.inf
    if isinstance(e, str):
        return 0.0
    if isinstance(e, sympy.MatrixBase):
        return max((_log10_bound(x, counter, depth + 1) for x in e), default=0.0)
    if not isinstance(e, sympy.Basic):
        return 0.0
    if isinstance(e, sympy.Integer):
        return int(abs(e.p)).bit_length() * 0.30103
    if isinstance(e, sympy.Rational):
        return max(abs(e.p).bit_length(), abs(e.q).bit_length()) * 0.30103
    if isinstance(e, sympy.Float):
        _sign, man, exp, bc = e._mpf_ if len(e._mpf_) == 4 else (0, 0, 0, 0)
        return abs(exp + bc) * 0.30103 if man else 0.0
    if isinstance(e, (sympy.Symbol, sympy.NumberSymbol, sympy.core.numbers.ImaginaryUnit)):
        return 1.0
    if isinstance(e, (sympy.Pow, sympy.exp)):
        if isinstance(e, sympy.exp):
            base, ex = sympy.E, e.args[0]
        else:
            base, ex = e.args
        xb = _log10_bound(ex, counter, depth + 1)
        bb = _log10_bound(base, counter, depth + 1)
        if xb > 6 or bb > _MAX_LOG10:  # exponent beyond a million: refuse
            return _m.inf
        xv = 10.0**xb
        if base.free_symbols and xv > 10_000:  # symbolic expansion risk
            return _m.inf
        return xv * max(bb, 0.30103)
    if isinstance(e, factorials):
        nb = max((_log10_bound(a, counter, depth + 1) for a in e.args), default=0.0)
        if nb > 4:  # n > 10^4
            return _m.inf
        n = 10.0**nb
        return n * max(nb, 1.0)
    if isinstance(e, with_limits):  # Sum, Product, Integral, ...
        span = 0.0
        for lim in e.limits:
            for bound in lim[1:]:
                span = max(span, _log10_bound(bound, counter, depth + 1))
        if span > 4:
            return _m.inf
        inner = _log10_bound(e.function, counter, depth + 1)
        return inner * 10.0**span + span
    children = [_log10_bound(a, counter, depth + 1) for a in e.args]
    if not children:
        return 1.0
    if isinstance(e, sympy.Mul):
        return sum(children)
    return max(children) + _m.log10(len(children) + 1)


# --------------------------------------------------------------------------- unfinished arithmetic


def unfinished_arithmetic(parsed: list) -> bool:
    """Whether a parsed answer is arithmetic left undone: numbers joined by + - × with nothing
    else (``86*50 + 40``, ``3 - -4``); fractions, roots, powers, percentages and symbols are
    answers in their own right.

    math-verify compares values, so an answer that restates the question ("Solve 86 * 50 +
    40.") equals the reference 4340: on arithmetic tasks RL learns to echo the question within
    a few dozen steps. ``math_reward`` scores such an answer 0 unless the reference is written
    that way too.
    """
    sympy = _sympy_types()[0]
    expr = next((p for p in parsed if isinstance(p, sympy.Basic)), None)
    if not isinstance(expr, (sympy.Add, sympy.Mul)) or expr.free_symbols:
        return False
    for node in sympy.preorder_traversal(expr):
        inverse = isinstance(node, sympy.Pow) and node.exp == -1 and node.base.is_Number
        if not (node.is_Number or inverse or isinstance(node, (sympy.Add, sympy.Mul))):
            return False
    # a fraction (3/4, -3/4) is one number over another; 86*50 multiplies two
    factors = [a for a in expr.args if a != -1 and not (isinstance(a, sympy.Pow) and a.exp == -1)]
    return isinstance(expr, sympy.Add) or len(factors) >= 2


# --------------------------------------------------------------------------- rewards

# Parsed references shared across calls (training reuses the same prompts step after step);
# sympy objects are immutable, so sharing them between threads is safe.
_GOLD_CACHE: dict[Any, list] = {}
_GOLD_CACHE_MAX = 20_000
_WARNED_GOLDS: set = set()


def _parse_gold_shared(gold: Any, key: Any) -> list:
    cached = _GOLD_CACHE.get(key)
    if cached is not None:
        return cached
    parsed = parse_gold(gold)
    if parsed:
        if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[key] = parsed
    elif key not in _WARNED_GOLDS and len(_WARNED_GOLDS) < 1000:
        _WARNED_GOLDS.add(key)
        logger.warning("math_reward: reference answer %r could not be parsed; it scores 0", gold)
    return parsed


def math_reward(prompts: Any, completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
    """1.0 where the completion's final answer equals the reference answer, else 0.0; an answer
    that is arithmetic left undone (``unfinished_arithmetic``: "86 * 50 + 40" for 4340) scores 0.

    TRL signature: ``prompts`` is unused; ``completions`` are strings or chat message
    lists; ``answer`` is the dataset column of reference answers, one per completion
    (``solution`` is accepted when there is no ``answer`` column). Other columns are
    ignored. Safe to call from worker threads. See the module docstring for details.
    """
    if answer is None:
        answer = kwargs.get("solution")
    if answer is None:
        raise ValueError(
            "math_reward needs the reference answers: pass answer=[...] "
            "(a dataset column named 'answer', one entry per completion)"
        )
    if isinstance(answer, (str, bytes)) or not isinstance(answer, Sequence):
        answer = list(answer) if not isinstance(answer, (str, bytes)) else [answer]
    completions = list(completions)
    if len(answer) != len(completions):
        raise ValueError(
            f"math_reward: got {len(completions)} completions but {len(answer)} answers; "
            "pass one reference answer per completion"
        )
    gold_cache: dict[Any, list] = {}
    scores: list[float] = []
    for completion, gold in zip(completions, answer):
        try:
            key = gold if isinstance(gold, (str, int, float)) and not isinstance(gold, bool) else repr(gold)
            if key not in gold_cache:
                gold_cache[key] = _parse_gold_shared(gold, key)
            g = gold_cache[key]
            pred = parse_answer(completion)
            ok = bool(g) and answers_match(g, pred) and (not unfinished_arithmetic(pred) or unfinished_arithmetic(g))
        except Exception:  # never raise on malformed input
            logger.debug("math_reward: scoring failed", exc_info=True)
            ok = False
        scores.append(1.0 if ok else 0.0)
    return scores


def make_format_reward(pattern: str | None = None, *, fullmatch: bool = False, flags: int = re.DOTALL):
    """Build a format reward: 1.0 where the completion has a complete, non-empty
    ``\\boxed{...}`` (``pattern=None``), or where the regex ``pattern`` matches the
    completion's text (``re.search``; the whole text with ``fullmatch=True``; ``flags``
    default to ``re.DOTALL``), else 0.0. A bad regex raises ``ValueError`` here, at build time.
    """
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"format reward: invalid regex {pattern!r}: {exc}") from exc

    def format_reward(prompts: Any, completions: Sequence[Any], **kwargs: Any) -> list[float]:
        out = []
        for completion in completions:
            text = _clip(completion_text(completion))
            if regex is None:
                boxed = last_boxed(text)
                ok = boxed is not None and bool(boxed.strip())
            else:
                ok = (regex.fullmatch(text) if fullmatch else regex.search(text)) is not None
            out.append(1.0 if ok else 0.0)
        return out

    format_reward.pattern = pattern  # type: ignore[attr-defined]
    return format_reward


_default_format_reward = make_format_reward(None)


def format_reward(prompts: Any, completions: Sequence[Any], pattern: str | None = None, **kwargs: Any) -> list[float]:
    """1.0 where the completion contains a complete, non-empty ``\\boxed{...}`` answer, or,
    with ``pattern``, where that regex (``re.search``, ``re.DOTALL``) matches its text.
    ``make_format_reward(pattern)`` builds a reward with the pattern fixed."""
    if pattern is None:
        return _default_format_reward(prompts, completions)
    return _cached_format_reward(pattern)(prompts, completions)


@lru_cache(maxsize=32)
def _cached_format_reward(pattern: str):
    return make_format_reward(pattern)
