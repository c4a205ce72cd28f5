"""Which prompts a step rolls out, and how many completions each gets (``rollout.allocation``).

Every mode spends the same B = ``rollout.batch_prompts`` x ``rollout.group_size`` completions a
step; they differ in where. Each reads p̂(x) (``passrate.py``) before the rollout:

* ``uniform``: the sampler's ``batch_prompts`` prompts, G completions each (the plain method).
* ``skip`` (after GRESO, arXiv 2506.02177): walk the sampler's prompts and skip each with
  probability min(q(x), 1 - ``rollout.skip_floor``), where q(x) = P(all G rewards equal) under
  x's posterior, taken only once x has been rolled out (no evidence, no skip); draw more prompts
  until ``batch_prompts`` are kept. q grows with the evidence as the posterior narrows toward 0
  or 1; the floor re-checks every skipped prompt eventually. GRESO counts consecutive all-equal
  visits and adapts its probabilities toward a target; here the posterior does both jobs.
* ``budget`` (after Knapsack RL, arXiv 2509.25849): consider ``rollout.candidates`` prompts (the
  sampler's batch and more of its order; 2 x ``batch_prompts`` by default) and
  give each n = 0 or ``min_per_prompt`` <= n <= ``max_per_prompt`` completions, summing to B,
  maximising the summed value of the groups (an exact dynamic programme, ``allocate_budget``).

The value of n completions of a prompt with pass rate p (``signal_value``) depends on the baseline:

* group baselines (grpo, dr_grpo, rloo; the estimator's ``zero_signal_for_constant_groups``): a
  group teaches only if its rewards differ, so V(n) = (1 - p^n - (1 - p)^n) p (1 - p): Knapsack RL's
  value, which saturates in n and favours prompts of middling difficulty.
* baselines from outside the group (kae's history, astar's V*, batch baselines): every sample
  teaches by its squared advantage, E[(r - b)^2] = p - 2 p b + b^2 for a 0/1 reward r and baseline b,
  so V(n) = n (p - 2 p b + b^2) with b = V*(x) under astar and b = p̂ otherwise (KAE's baseline is
  the prompt's smoothed history): linear in n, so the budget goes to the prompts whose samples
  are most uncertain, each up to ``max_per_prompt``.

``rollout.dynamic_sampling`` (DAPO, arXiv 2503.14476) is the other way to spend samples: roll out,
drop the all-equal groups, roll out more prompts until ``batch_prompts`` groups differ (at most
``rollout.dynamic_max_rounds`` rounds); it pays for the dropped groups' generation. The trainer
runs its rounds (``trainer.py``); ``keep_varied`` picks the groups.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np

from frugalrl.data import PromptSampler
from frugalrl.passrate import PassRateEstimator, PassRates

__all__ = ["ALLOCATIONS", "Plan", "Allocator", "all_equal_probability", "signal_value", "allocate_budget",
           "skip_probability", "keep_varied"]

ALLOCATIONS = ("uniform", "skip", "budget")
# skip: stop skipping (take the prompts as they come) after considering this many batches' worth
_MAX_SKIP_DRAWS = 8


def all_equal_probability(p: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """P(all n rewards equal) for 0/1 rewards of pass rate p: p^n + (1 - p)^n (1 for n <= 1)."""
    p = np.asarray(p, dtype=np.float64)
    return np.where(np.asarray(n) <= 1, 1.0, p ** n + (1 - p) ** n)


def signal_value(p: np.ndarray, n: np.ndarray, baseline: np.ndarray | None = None) -> np.ndarray:
    """The expected learning signal of n completions of prompts of pass rate p (module docstring).

    ``baseline`` None: a group baseline, V = (1 - P(all equal)) p (1 - p). Else the baseline b of
    each prompt: V = n (p - 2 p b + b^2). p, baseline: (C, 1) or (C,); n broadcasts against them.
    """
    p = np.asarray(p, dtype=np.float64)
    if baseline is None:
        return (1 - all_equal_probability(p, n)) * p * (1 - p)
    b = np.asarray(baseline, dtype=np.float64)
    return np.asarray(n) * (p - 2 * p * b + b * b)


def allocate_budget(values: np.ndarray, budget: int, min_n: int, max_n: int) -> list[int]:
    """Completions per candidate maximising the summed value, exactly ``budget`` in all.

    values: (C, max_n + 1), values[c, n] = the value of n completions of candidate c. Each count is
    0 or in [min_n, max_n]. Ties go to the earlier candidate and the smaller count. An exact
    dynamic programme over (candidate, completions spent): C x (max_n - min_n + 1) vector steps.
    Raises ValueError when no choice of counts sums to ``budget``.
    """
    C = values.shape[0]
    if not 1 <= min_n <= max_n or values.shape[1] < max_n + 1:
        raise ValueError(f"need 1 <= min_n <= max_n and values of width max_n + 1; got {min_n}, {max_n}, "
                         f"{values.shape}")
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    choice = np.zeros((C, budget + 1), dtype=np.int64)
    for c in range(C):
        new = best.copy()
        for n in range(min_n, min(max_n, budget) + 1):
            shifted = np.full(budget + 1, -np.inf)
            shifted[n:] = best[:-n] + values[c, n]
            better = shifted > new
            new[better] = shifted[better]
            choice[c, better] = n
        best = new
    if not np.isfinite(best[budget]):
        raise ValueError(f"{C} candidates with {min_n}..{max_n} completions each cannot spend exactly {budget}; "
                         "raise rollout.candidates or rollout.max_per_prompt")
    counts, left = [0] * C, budget
    for c in reversed(range(C)):
        counts[c] = int(choice[c, left])
        left -= counts[c]
    return counts


_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])


def _log_beta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _lgamma(a) + _lgamma(b) - _lgamma(a + b)


def skip_probability(rates: PassRates, group_size: int, floor: float) -> np.ndarray:
    """(P,) the chance of skipping each prompt: P(all G equal) under its posterior (the Beta-Binomial
    ends, computed in log space), capped at 1 - ``floor``; 0 for a prompt never rolled out."""
    a, b, G = rates.alpha, rates.beta, group_size
    q = np.exp(_log_beta(a + G, b) - _log_beta(a, b)) + np.exp(_log_beta(a, b + G) - _log_beta(a, b))
    return np.where(rates.samples > 0, np.minimum(q, 1 - floor), 0.0)


def keep_varied(rewards: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """(P,) bool: the groups whose rewards are not all equal. rewards, group_of: (N,)."""
    P = int(group_of.max()) + 1 if len(group_of) else 0
    low = np.full(P, np.inf)
    high = np.full(P, -np.inf)
    np.minimum.at(low, group_of, rewards)
    np.maximum.at(high, group_of, rewards)
    return high > low


@dataclass
class Plan:
    """One step's allocation: ``rows[i]`` gets ``counts[i]`` completions (every count >= 1).

    rates: the posteriors of ``rows``. considered / skipped: prompts looked at, and left out.
    priors: {prior name: (len(rows),) p0} for the calibration metrics. first: (len(rows),) bool,
    True for a prompt never rolled out before.
    """

    rows: list[dict]
    counts: list[int]
    rates: PassRates
    considered: int
    skipped: int
    priors: dict[str, np.ndarray] = field(default_factory=dict)
    first: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def sample_rows(self) -> list[dict]:
        """One row per completion, each prompt's completions consecutive."""
        return [row for row, n in zip(self.rows, self.counts) for _ in range(n)]


class Allocator:
    """Plans each step's rollout from the sampler's prompts and the run's pass-rate estimates.

    ``group_baseline``: whether the estimator's baseline comes from the group (signal_value).
    ``vstar``: {prompt id: V*} under astar (its baseline b). ``compare_priors``: extra priors
    whose first-visit Brier scores are logged next to the one in use.
    The only state is the skip coin's RNG (``state_dict``); the history is saved by its owner.
    """

    def __init__(self, ro, sampler: PromptSampler, rates: PassRateEstimator, *, group_baseline: bool,
                 vstar: dict[str, float] | None = None, compare_priors: tuple[str, ...] = (), seed: int = 0):
        if ro.allocation not in ALLOCATIONS:
            raise ValueError(f"rollout.allocation={ro.allocation!r} is not valid; choose one of {list(ALLOCATIONS)}")
        self.ro, self.sampler, self.rates = ro, sampler, rates
        self.group_baseline, self.vstar = group_baseline, vstar
        self.compare_priors = tuple(p for p in compare_priors if p != rates.prior)
        self.rng = random.Random(seed)

    @property
    def budget(self) -> int:
        return self.ro.batch_prompts * self.ro.group_size

    def plan(self) -> Plan:
        """The next step's prompts and counts."""
        mode, G = self.ro.allocation, self.ro.group_size
        if mode == "budget":
            rows = self.sampler.next()
            extra = (self.ro.candidates or 2 * self.ro.batch_prompts) - len(rows)
            if extra > 0:
                rows = rows + self.sampler.more(extra)
            rates = self.rates.estimate([r["id"] for r in rows])
            counts = self._budget_counts(rows, rates)
            kept = [i for i, n in enumerate(counts) if n]
            return self._plan([rows[i] for i in kept], [counts[i] for i in kept], len(rows))
        rows = self.sampler.next()
        if mode == "uniform":
            return self._plan(rows, [G] * len(rows), len(rows))
        kept, considered = [], 0
        while len(kept) < self.ro.batch_prompts:
            if considered >= len(rows):
                rows = rows + self.sampler.more(self.ro.batch_prompts)
            chunk = rows[considered:]
            skip = skip_probability(self.rates.estimate([r["id"] for r in chunk]), G, self.ro.skip_floor)
            for row, p in zip(chunk, skip):
                considered += 1
                # past _MAX_SKIP_DRAWS batches' worth every prompt is taken: the batch must fill
                if considered > _MAX_SKIP_DRAWS * self.ro.batch_prompts or self.rng.random() >= p:
                    kept.append(row)
                    if len(kept) == self.ro.batch_prompts:
                        break
        return self._plan(kept, [G] * len(kept), considered)

    def _budget_counts(self, rows: list[dict], rates: PassRates) -> list[int]:
        lo, hi = self.ro.min_per_prompt, self.ro.max_per_prompt
        p = rates.mean[:, None]
        n = np.arange(hi + 1)[None, :]
        if self.group_baseline:
            baseline = None
        elif self.vstar is not None:
            baseline = np.array([self.vstar[r["id"]] for r in rows])[:, None]
        else:
            baseline = p
        return allocate_budget(signal_value(p, n, baseline), self.budget, lo, hi)

    def _plan(self, rows: list[dict], counts: list[int], considered: int) -> Plan:
        ids = [r["id"] for r in rows]
        rates = self.rates.estimate(ids)
        priors = {kind: self.rates.priors(ids, kind) for kind in (self.rates.prior, *self.compare_priors)}
        return Plan(rows, counts, rates, considered, considered - len(rows), priors, rates.samples == 0)

    def metrics(self, plan: Plan, rewards: np.ndarray) -> dict[str, float]:
        """The step's allocation figures, from its ``plan`` and the (N,) rewards of its samples in
        ``plan.sample_rows()`` order."""
        counts = np.array(plan.counts)
        group_of = np.repeat(np.arange(len(counts)), counts)
        realised = np.bincount(group_of, weights=np.clip(rewards, 0, 1), minlength=len(counts)) / counts
        p = plan.rates.mean
        row = {"prompts_considered": float(plan.considered), "prompts_skipped": float(plan.skipped),
               "prompts_rolled_out": float(len(counts)), "completions_per_prompt_mean": float(counts.mean()),
               "completions_per_prompt_max": float(counts.max()),
               "all_equal_predicted": float(all_equal_probability(p, counts).mean()),
               "all_equal_realised": float((~keep_varied(rewards, group_of)).mean()),
               "passrate_brier": float(((p - realised) ** 2).mean())}
        if plan.first.any():  # each prior's Brier score at first visits
            for kind, p0 in plan.priors.items():
                row[f"prior_brier_{kind}"] = float(((p0[plan.first] - realised[plan.first]) ** 2).mean())
            row["first_visits"] = float(plan.first.sum())
        return row

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
