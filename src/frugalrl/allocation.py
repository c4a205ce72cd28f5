"""Which prompts a step rolls out, and how many completions each gets (``rollout.allocation``).

Every mode spends the same B = ``rollout.batch_prompts`` x ``rollout.group_size`` completions a
step; they differ in where. Each reads the posterior of p(x), the prompt's pass rate
(``passrate.py``), before the rollout, and uses it only through expectations under it:

* ``uniform``: the sampler's ``batch_prompts`` prompts, G completions each (the plain method).
* ``skip`` (after GRESO, arXiv 2506.02177): walk the sampler's prompts and skip each with
  probability min(q(x), 1 - ``rollout.skip_floor``), q(x) = max(0, 1 - V(x) / V_fresh): V(x) the
  expected signal value of G completions of x under its posterior, V_fresh that of a prompt drawn
  fresh from the pool (the population prior), which is what replaces a skipped prompt. Under the
  population prior a prompt never seen has the fresh prompt's posterior and is kept (under
  cross_prompt or vstar its own prior may already say less); the floor re-checks every skipped
  prompt eventually. Prompts are drawn until ``batch_prompts`` are kept, each drawn one
  considered. GRESO skips on the chance that a group's rewards are all equal, adapted toward a
  target; that is the value of group baselines only, and here the posterior does the adapting.
* ``budget`` (after Knapsack RL, arXiv 2509.25849): consider ``rollout.candidates`` prompts (the
  sampler's batch and more of its order; 2 x ``batch_prompts`` by default) and give each n = 0 or
  ``min_per_prompt`` <= n <= ``max_per_prompt`` completions, summing to B, maximising the summed
  expected signal value (an exact dynamic programme, ``allocate_budget``).

The signal value V(n) of n completions is the estimator's (``AdvantageEstimator.expected_gain_terms``):
the expected first-order increase of the prompt's pass rate from one step on the group's
advantages, a polynomial in p. For every estimator whose baseline never reads the sample's own
reward (rloo, reinforce, kae, astar) it is n p^2 (1 - p)^2; grpo's and dr_grpo's differ. Knapsack
RL's value (1 - p^n - (1 - p)^n) p (1 - p)^2 is GRPO's case with another per-group gain; see
docs/algorithms.md for the derivations and where they part. Its posterior expectation is a sum of
Beta moments (``passrate.beta_moment``), never the polynomial at p̂.

``rollout.dynamic_sampling`` (DAPO, arXiv 2503.14476) is the other way to spend samples: roll out,
drop the all-equal groups, roll out more prompts until ``batch_prompts`` groups differ (at most
``rollout.dynamic_max_rounds`` rounds); it pays for the dropped groups' generation. The trainer
runs its rounds (``trainer.py``) with ``Allocator.extra`` plans; ``keep_varied`` picks the groups.

After the rollout, ``Allocator.record`` enters every completion generated in the step (every
round's, dropped ones included) into the history and scores the predictions that were made for
them: the metrics below, and the data that the pass-rate prior is fitted to.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from frugalrl.data import PromptSampler
from frugalrl.passrate import PassRateEstimator, PassRates, all_equal_probability, log_predictive

__all__ = ["ALLOCATIONS", "Plan", "Allocator", "signal_value", "allocate_budget", "skip_probability", "keep_varied",
           "reliability", "calibration_gap"]

ALLOCATIONS = ("uniform", "skip", "budget")
# skip: stop skipping (take the prompts as they come) after considering this many batches' worth
_MAX_SKIP_DRAWS = 8
# reliability diagram: bins of equal width over the predicted chance of an all-equal group
BINS = 10

GainTerms = Callable[[int], list[tuple[float, int, int]]]


def signal_value(rates: PassRates, n: int, gain: GainTerms) -> np.ndarray:
    """(P,) the expected signal value of n completions of each prompt under its posterior:
    sum c E[p^i (1 - p)^j] over the terms (c, i, j) of ``gain(n)`` (the estimator's
    ``expected_gain_terms``)."""
    return sum((c * rates.moment(i, j) for c, i, j in gain(n)), np.zeros(len(rates.alpha)))


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


def skip_probability(rates: PassRates, fresh: PassRates, gain: GainTerms, group_size: int,
                     floor: float) -> np.ndarray:
    """(P,) the chance of skipping each prompt: 1 - V(x) / V_fresh, clipped to [0, 1 - ``floor``],
    V the expected signal value of ``group_size`` completions under ``rates`` (P prompts) and
    ``fresh`` (one prompt drawn fresh). 0 where a fresh prompt is worth nothing either."""
    v_fresh = float(signal_value(fresh, group_size, gain)[0])
    if v_fresh <= 0:
        return np.zeros(len(rates.alpha))
    return np.clip(1 - signal_value(rates, group_size, gain) / v_fresh, 0.0, 1 - floor)


def keep_varied(rewards: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """(P,) bool: the groups whose rewards are not all equal. rewards, group_of: (N,)."""
    P = int(group_of.max()) + 1 if len(group_of) else 0
    low = np.full(P, np.inf)
    high = np.full(P, -np.inf)
    np.minimum.at(low, group_of, rewards)
    np.maximum.at(high, group_of, rewards)
    return high > low


def _reliability_row(predicted: np.ndarray, equal: np.ndarray) -> dict[str, float]:
    """A step's groups in ``BINS`` bins of their predicted chance of being all-equal: per non-empty
    bin b, ``all_equal_bin{b}_groups``, ``_predicted`` (the predictions' sum) and ``_realised``
    (the all-equal groups)."""
    bins = np.minimum((predicted * BINS).astype(int), BINS - 1)
    row = {}
    for b in np.unique(bins):
        inside = bins == b
        row.update({f"all_equal_bin{b}_groups": float(inside.sum()),
                    f"all_equal_bin{b}_predicted": float(predicted[inside].sum()),
                    f"all_equal_bin{b}_realised": float(equal[inside].sum())})
    return row


def reliability(rows: list[dict]) -> list[tuple[float, float, int]]:
    """The reliability diagram of metrics rows (those with ``all_equal_bin*`` keys): per non-empty
    bin, (mean predicted chance of an all-equal group, realised share of all-equal groups, groups)."""
    out = []
    for b in range(BINS):
        groups = sum(r.get(f"all_equal_bin{b}_groups", 0.0) for r in rows)
        if groups:
            out.append((sum(r.get(f"all_equal_bin{b}_predicted", 0.0) for r in rows) / groups,
                        sum(r.get(f"all_equal_bin{b}_realised", 0.0) for r in rows) / groups, int(groups)))
    return out


def calibration_gap(rows: list[dict]) -> float | None:
    """The gap of the reliability diagram: the mean over groups of |predicted - realised| within
    their bin (the expected calibration error), None without groups. Unlike the per-step
    |all_equal_predicted - all_equal_realised|, it has no floor from one step's 64 groups: a
    calibrated prediction scores near 0 once a bin holds many groups."""
    bins = reliability(rows)
    total = sum(n for _, _, n in bins)
    return sum(n * abs(p - f) for p, f, n in bins) / total if total else None


@dataclass
class Plan:
    """One step's allocation (or one more dynamic-sampling round): ``rows[i]`` gets ``counts[i]``
    completions (every count >= 1).

    rates: the posteriors of ``rows``. considered / skipped: prompts drawn and looked at, and left
    out. left_out: the posterior means of those left out. priors: {prior kind: (len(rows),) p0}
    for the calibration metrics. first: (len(rows),) bool, True for a prompt never rolled out before.
    """

    rows: list[dict]
    counts: list[int]
    rates: PassRates
    considered: int
    skipped: int
    left_out: np.ndarray = field(default_factory=lambda: np.zeros(0))
    priors: dict[str, np.ndarray] = field(default_factory=dict)
    first: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def sample_rows(self) -> list[dict]:
        """One row per completion, each prompt's completions consecutive."""
        return [row for row, n in zip(self.rows, self.counts) for _ in range(n)]


class Allocator:
    """Plans each step's rollout from the sampler's prompts and the run's pass-rate estimates, and
    records what each step generated.

    ``gain``: the estimator's ``expected_gain_terms`` (its signal value). The state is the skip
    coin's RNG and the pass-rate fit (``state_dict``); the history is saved by its owner.
    """

    def __init__(self, ro, sampler: PromptSampler, rates: PassRateEstimator, *, gain: GainTerms, seed: int = 0):
        if ro.allocation not in ALLOCATIONS:
            raise ValueError(f"rollout.allocation={ro.allocation!r} is not valid; choose one of {list(ALLOCATIONS)}")
        self.ro, self.sampler, self.rates, self.gain = ro, sampler, rates, gain
        self.rng = random.Random(seed)

    @property
    def budget(self) -> int:
        return self.ro.batch_prompts * self.ro.group_size

    def plan(self) -> Plan:
        """The next step's prompts and counts."""
        mode, G, B = self.ro.allocation, self.ro.group_size, self.ro.batch_prompts
        rows = self.sampler.next()
        if mode == "uniform":
            return self._plan(rows, [G] * len(rows), len(rows))
        if mode == "budget":
            extra = (self.ro.candidates or 2 * B) - len(rows)
            if extra > 0:
                rows = rows + self.sampler.more(extra)
            rates = self.rates.estimate([r["id"] for r in rows])
            values = np.stack([signal_value(rates, n, self.gain) for n in range(self.ro.max_per_prompt + 1)], axis=1)
            counts = allocate_budget(values, self.budget, self.ro.min_per_prompt, self.ro.max_per_prompt)
            kept = [i for i, n in enumerate(counts) if n]
            return self._plan([rows[i] for i in kept], [counts[i] for i in kept], len(rows),
                              rates.mean[[i for i, n in enumerate(counts) if not n]])
        kept, left_out, considered = [], [], 0
        fresh = self.rates.fresh()
        while len(kept) < B:
            # draw only what can still be kept, so that every prompt drawn is considered
            chunk = rows if not considered else self.sampler.more(B - len(kept))
            rates = self.rates.estimate([r["id"] for r in chunk])
            skip = skip_probability(rates, fresh, self.gain, G, self.ro.skip_floor)
            for row, q, mean in zip(chunk, skip, rates.mean):
                considered += 1
                # past _MAX_SKIP_DRAWS batches' worth every prompt is taken: the batch must fill
                if considered > _MAX_SKIP_DRAWS * B or self.rng.random() >= q:
                    kept.append(row)
                else:
                    left_out.append(mean)
        return self._plan(kept, [G] * len(kept), considered, np.array(left_out))

    def extra(self, prompts: int) -> Plan:
        """A further round of ``prompts`` prompts drawn from the sampler, G completions each (dynamic sampling)."""
        rows = self.sampler.more(prompts)
        return self._plan(rows, [self.ro.group_size] * len(rows), len(rows))

    def _plan(self, rows: list[dict], counts: list[int], considered: int, left_out: np.ndarray | None = None) -> Plan:
        ids = [r["id"] for r in rows]
        rates = self.rates.estimate(ids)
        priors = {kind: self.rates.priors(ids, kind) for kind in self.rates.kinds}
        return Plan(rows, counts, rates, considered, considered - len(rows),
                    np.zeros(0) if left_out is None else left_out, priors, rates.samples == 0)

    def record(self, rounds: list[tuple[Plan, np.ndarray]], step: int) -> dict[str, float]:
        """Enter a step's completions into the history (through the pass-rate estimator, which
        refits its prior) and return the step's allocation metrics. ``rounds``: each plan the step
        rolled out (one, or dynamic sampling's rounds) with the (N,) rewards of its samples in
        ``plan.sample_rows()`` order, every completion generated, kept or not.

        Metrics (over every group of the step): prompts considered, skipped, rolled out,
        completions per prompt; ``all_equal_predicted`` (the posterior chance that a group's rewards
        are all equal, mean over groups) and ``all_equal_realised``; ``passrate_logpred_first`` /
        ``_revisit``, the mean log predictive probability of each group's success count under the
        Beta-Binomial at prompts' first visits / revisits (a proper score: higher is better, and the
        prior's fit maximises it); the reliability bins (``_reliability_row``); at first visits, each
        tracked prior's Brier score ``prior_brier_<kind>`` (p0 against the group's mean reward, the
        same visits for every prior, so their ratio compares them) and ``first_visits``;
        ``passrate_strength`` and ``passrate_memory``, the prior's kappa and tau these predictions used.
        """
        plans = [plan for plan, _ in rounds]
        rewards = np.concatenate([r for _, r in rounds])
        counts = np.concatenate([plan.counts for plan in plans])
        group_of = np.repeat(np.arange(len(counts)), counts)
        successes = np.bincount(group_of, weights=np.clip(rewards, 0, 1), minlength=len(counts))
        alpha, beta = (np.concatenate([getattr(plan.rates, k) for plan in plans]) for k in ("alpha", "beta"))
        first = np.concatenate([plan.first for plan in plans])
        predicted = all_equal_probability(alpha, beta, counts)
        equal = ~keep_varied(rewards, group_of)
        logpred = log_predictive(alpha, beta, counts, successes)
        row = {"prompts_considered": float(sum(p.considered for p in plans)),
               "prompts_skipped": float(sum(p.skipped for p in plans)), "prompts_rolled_out": float(len(counts)),
               "completions_per_prompt_mean": float(counts.mean()), "completions_per_prompt_max": float(counts.max()),
               "all_equal_predicted": float(predicted.mean()), "all_equal_realised": float(equal.mean()),
               "passrate_strength": self.rates.strength(), "passrate_memory": self.rates.memory(),
               **_reliability_row(predicted, equal)}
        for name, visits in (("first", first), ("revisit", ~first)):
            if visits.any():
                row[f"passrate_logpred_{name}"] = float(logpred[visits].mean())
        if first.any():
            realised = successes[first] / counts[first]
            for kind in self.rates.kinds:
                p0 = np.concatenate([plan.priors[kind] for plan in plans])[first]
                row[f"prior_brier_{kind}"] = float(((p0 - realised) ** 2).mean())
            row["first_visits"] = float(first.sum())
        self.rates.record([r["id"] for plan in plans for r in plan.sample_rows()], rewards.tolist(), step,
                          np.concatenate([plan.left_out for plan in plans]).tolist())
        return row

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "passrate": self.rates.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        if "passrate" in state:  # absent from checkpoints written before the prior was fitted
            self.rates.load_state_dict(state["passrate"])
