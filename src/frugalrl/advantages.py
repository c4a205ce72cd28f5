"""Advantage estimators: turn one step's scalar rewards into per-sample advantages.

Every estimator is a registered class, built by name and used the same way::

    est = get_estimator("kae", bandwidth=10.0)
    out = est.estimate(rewards, prompt_ids, step)   # rewards (N,), prompt_ids N strings, step >= 1
    out.advantages, out.baselines, out.metrics      # (N,), (N,), {name: float}

Conventions (all estimators):

* ``rewards`` is a float tensor of shape (N,), one scalar (sequence-level, outcome) reward per
  sample, in the reward function's units. ``prompt_ids`` names the prompt of each sample; the
  samples of one prompt (its *group*) may sit anywhere in the batch, and groups may have
  unequal sizes (e.g. after filtering).
* ``advantages`` and ``baselines`` are (N,) tensors in reward units (before any std scaling),
  on the rewards' device, in the rewards' dtype. ``baselines[g]`` is the value sample ``g`` was
  compared against: ``advantages = rewards - baselines`` except where an estimator divides by a
  standard deviation afterwards (grpo, reinforce_pp, kae with ``scale="batch"``).
* Arithmetic is done on the CPU in float64: N is small, and the leave-one-out means below are
  computed as (group sum - own reward), which loses digits in float32.
* ``zero_signal_for_constant_groups`` says whether a group whose rewards are all equal carries
  no signal. It is True only where the baseline comes from the group itself; ``estimate`` then
  gives such a group advantage exactly 0, whatever the rounding, so that the trainer's filter
  (``train.filter_threshold`` = 0 drops exact zeros) skips its forward pass. Where it is False
  (batch, history or V* baselines) a constant group keeps its non-zero advantage and is trained on.
* Estimators with memory (kae) expose it through ``state_dict()`` / ``load_state_dict()`` as
  plain lists, dicts and floats, so it can go into a JSON checkpoint.
* ``expected_gain_terms(n)`` is the estimator's *signal value*: what n completions of one prompt
  are worth to it, for the rollout allocator (``allocation.py``). Model: one prompt with pass
  rate p, its completions scored 0/1, the policy's parameter on it the logit of p, so that
  d log pi(y) / d logit = r - p. One policy-gradient step along the group's advantages moves the
  logit by sum_g A_g (r_g - p) (per unit step size) and p by p (1 - p) times that: the signal
  value is the expected first-order increase of p,

      V(n) = E[ p (1 - p) sum_g A_g (r_g - p) ],

  a polynomial in p, returned as terms (c, i, j) of sum c p^i (1 - p)^j, so that the allocator can
  take its expectation under a Beta posterior (``passrate.beta_moment``). Derived per estimator in
  docs/algorithms.md and tested against simulations of that very quantity (the estimator run on
  sampled groups).
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from frugalrl.history import PromptHistory

__all__ = [
    "AdvantageEstimator",
    "AdvantageOutput",
    "get_estimator",
    "list_estimators",
    "optimal_value",
    "register_estimator",
]


@dataclass
class AdvantageOutput:
    """Result of one ``estimate`` call.

    advantages: (N,) float, what the policy loss multiplies the log-probabilities by.
    baselines:  (N,) float, in reward units, the value each sample was compared against.
    metrics:    cheap diagnostics as plain floats (e.g. ``kae_fallback``).
    """

    advantages: Tensor
    baselines: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Grouping: shared by every estimator, so that the per-prompt arithmetic is written once.
# --------------------------------------------------------------------------------------------


def _segment_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Sum ``values`` (M,) into ``num_segments`` bins by ``index`` (M,) -> (num_segments,)."""
    return torch.zeros(num_segments, dtype=values.dtype).index_add_(0, index, values)


@dataclass(frozen=True)
class _Groups:
    """The samples of a batch grouped by prompt id.

    index: (N,) long, the group of each sample.
    sizes: (P,) float64, samples per group (G of each prompt).
    keys:  the P prompt ids, in order of first appearance.
    """

    index: Tensor
    sizes: Tensor
    keys: list[str]

    @classmethod
    def by_prompt(cls, prompt_ids: Sequence[str]) -> _Groups:
        # Strings cannot go through torch.unique, so the id -> group map is one dict pass;
        # everything after it is vectorised over the (N,) index.
        first_seen: dict[str, int] = {}
        index = torch.tensor([first_seen.setdefault(p, len(first_seen)) for p in prompt_ids])
        sizes = torch.bincount(index, minlength=len(first_seen)).to(torch.float64)
        return cls(index, sizes, list(first_seen))

    @classmethod
    def whole_batch(cls, n: int) -> _Groups:
        """All N samples as one group: batch-level baselines reuse the group arithmetic."""
        return cls(torch.zeros(n, dtype=torch.long), torch.tensor([float(n)], dtype=torch.float64), [""])

    def sum(self, values: Tensor) -> Tensor:
        """(N,) -> (P,) group sums."""
        return _segment_sum(values, self.index, len(self.keys))

    def mean(self, values: Tensor) -> Tensor:
        """(N,) -> (N,): each sample's group mean."""
        return (self.sum(values) / self.sizes)[self.index]

    def std(self, values: Tensor) -> Tensor:
        """(N,) -> (N,): each sample's group sample std (n - 1, as torch.std); 0 for a group of one.

        Two-pass (centre, then square) for accuracy. A group of one has no spread to measure;
        0 makes its whitened advantage (r - r) / (0 + eps) = 0 rather than NaN.
        """
        centred = values - self.mean(values)
        dof = (self.sizes - 1).clamp(min=1)
        var = torch.where(self.sizes > 1, self.sum(centred**2) / dof, 0.0)
        return var.sqrt()[self.index]

    def loo_mean(self, values: Tensor) -> Tensor:
        """(N,) -> (N,): mean of the *other* samples of each sample's group; 0 in a group of one."""
        others = (self.sizes - 1)[self.index]
        loo_sum = self.sum(values)[self.index] - values
        return torch.where(others > 0, loo_sum / others.clamp(min=1), 0.0)

    def constant(self, values: Tensor) -> Tensor:
        """(N,) -> (N,) bool: whether all values of each sample's group are equal."""
        def reduce(how: str) -> Tensor:
            return torch.zeros(len(self.keys), dtype=values.dtype).scatter_reduce(0, self.index, values, how,
                                                                                  include_self=False)
        return (reduce("amin") == reduce("amax"))[self.index]


def _whiten(r: Tensor, groups: _Groups, eps: float) -> tuple[Tensor, Tensor]:
    """(r - group mean) / (group std + eps) -> (advantages, baselines = group means)."""
    mean = groups.mean(r)
    return (r - mean) / (groups.std(r) + eps), mean


# --------------------------------------------------------------------------------------------
# Registry and base class
# --------------------------------------------------------------------------------------------

_ESTIMATORS: dict[str, type[AdvantageEstimator]] = {}


def register_estimator(name: str):
    """Class decorator: make an ``AdvantageEstimator`` subclass buildable by ``get_estimator(name)``."""

    def decorate(cls: type[AdvantageEstimator]) -> type[AdvantageEstimator]:
        if name in _ESTIMATORS:
            raise ValueError(f"estimator {name!r} is already registered")
        cls.name = name
        _ESTIMATORS[name] = cls
        return cls

    return decorate


def list_estimators() -> list[str]:
    """Names accepted by ``get_estimator``, sorted."""
    return sorted(_ESTIMATORS)


def get_estimator(name: str, **options: Any) -> AdvantageEstimator:
    """Build the estimator registered as ``name`` with keyword ``options``.

    Raises ValueError (never TypeError) for an unknown name, an unknown or missing option,
    or an option value out of range; the message lists what is valid.
    """
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {list_estimators()}")
    cls = _ESTIMATORS[name]
    params = inspect.signature(cls).parameters
    unknown = sorted(set(options) - set(params))
    missing = sorted(p.name for p in params.values() if p.default is p.empty and p.name not in options)
    if unknown or missing:
        valid = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
                          for p in params.values()) or "none"
        problem = f"unknown option(s) {unknown}" if unknown else f"missing required option(s) {missing}"
        raise ValueError(f"estimator {name!r}: {problem}; its options are: {valid}")
    return cls(**options)


def _choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid; choose one of {list(choices)}")
    return value


def _positive(option: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{option}={value!r} is not valid; it must be a finite number > 0")
    return number


def _check_batch(rewards: Tensor, prompt_ids: Sequence[str], step: int) -> tuple[Tensor, list[str], int]:
    """Validate one step's inputs -> (rewards as CPU float64, prompt ids as a list, step as an int)."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D tensor (N,), one reward per sample; "
                         f"got shape {tuple(rewards.shape)} (flatten it)")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty; pass at least one sample")
    if isinstance(prompt_ids, str):
        raise ValueError("prompt_ids must be a list of strings, one per sample, not one string")
    prompt_ids = list(prompt_ids)
    if len(prompt_ids) != rewards.numel():
        raise ValueError(f"rewards has {rewards.numel()} entries but prompt_ids has {len(prompt_ids)}; "
                         f"pass one prompt id per reward")
    if not all(isinstance(p, str) for p in prompt_ids):
        raise ValueError("prompt_ids must be strings (e.g. a hash of the prompt text), "
                         "so that estimator state can be saved as JSON")
    r = rewards.detach().to("cpu", torch.float64)
    bad = (~torch.isfinite(r)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"rewards must be finite; got NaN/inf at positions {bad[:10].tolist()}; "
                         f"make the reward function return a number (e.g. 0.0) for unscorable samples")
    if isinstance(step, bool):
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    try:
        step = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be an int >= 1, got {step!r}") from None
    if step < 1:
        raise ValueError(f"step must be >= 1 (steps are 1-based), got {step}")
    return r, prompt_ids, step


class AdvantageEstimator:
    """Base class. Subclasses implement ``_estimate`` on validated float64 CPU rewards."""

    name: ClassVar[str] = ""
    zero_signal_for_constant_groups: ClassVar[bool] = False
    history: PromptHistory | None = None  # the prompts' past rewards, for estimators that read them (kae)
    _history_shared = False

    def use_history(self, history: PromptHistory) -> None:
        """Read past rewards from ``history``, the run's one per-prompt history, shared with the
        rollout allocator. Its owner records every completion generated, including those that never
        reach ``estimate`` (dynamic sampling's dropped groups), and saves it."""
        self.history, self._history_shared = history, True

    def expected_gain_terms(self, n: int) -> list[tuple[float, int, int]]:
        """The signal value of n completions of one prompt (module docstring) as terms (c, i, j) of
        sum c p^i (1 - p)^j.

        Here for every baseline that never reads the sample's own reward (rloo's leave-one-out,
        reinforce's 0 or batch leave-one-out, kae's history and prior, astar's V*): then
        E[A_g (r_g - p) | p] = E[r_g (r_g - p)] - E[b_g] E[r_g - p] = p (1 - p), whatever b_g, so
        V(n) = n p^2 (1 - p)^2. The baseline changes the update's noise, not its expected size. A
        batch-wide scaling (reinforce_pp's and kae's division by the batch std) multiplies every
        prompt's value alike and leaves every allocation unchanged.
        """
        return [(float(n), 2, 2)]

    def estimate(self, rewards: Tensor, prompt_ids: Sequence[str], step: int) -> AdvantageOutput:
        """Advantages for one training step.

        rewards: (N,) float, one reward per sample. prompt_ids: N strings. step: 1-based
        training step (only history-based estimators use it). Raises ValueError on bad input.
        """
        if not isinstance(rewards, Tensor):
            try:
                rewards = torch.as_tensor(rewards, dtype=torch.get_default_dtype())
            except (TypeError, ValueError, RuntimeError) as err:
                raise ValueError(f"rewards must be a float tensor (N,) or a list of numbers: {err}") from None
        r, prompt_ids, step = _check_batch(rewards, prompt_ids, step)
        groups = _Groups.by_prompt(prompt_ids)
        advantages, baselines, metrics = self._estimate(r, groups, step)
        self._record(prompt_ids, r, step)
        if self.zero_signal_for_constant_groups:
            # r - mean is only ~0 where the group sum rounds (three rewards of 0.1 in float64): the
            # trainer's filter at threshold 0 drops exact zeros, so make the promised 0 exact
            advantages = torch.where(groups.constant(r), 0.0, advantages)
        dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
        return AdvantageOutput(advantages.to(rewards.device, dtype), baselines.to(rewards.device, dtype), metrics)

    def _estimate(self, r: Tensor, groups: _Groups, step: int) -> tuple[Tensor, Tensor, dict[str, float]]:
        """r: (N,) float64 CPU rewards -> (advantages (N,), baselines (N,), metrics)."""
        raise NotImplementedError

    def _record(self, prompt_ids: list[str], r: Tensor, step: int) -> None:
        """After the baselines: what an estimator with memory of its own keeps of this step (none here)."""

    def state_dict(self) -> dict[str, Any]:
        """Estimator memory as plain python containers; {} for stateless estimators."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"estimator {self.name!r} is stateless but got state with keys {sorted(state)}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "history")
        return f"{type(self).__name__}({opts})"


# --------------------------------------------------------------------------------------------
# Group baselines: the value of a prompt is estimated from its own G samples at this step.
# --------------------------------------------------------------------------------------------


@register_estimator("grpo")
class GRPO(AdvantageEstimator):
    """GRPO (Shao et al. 2024): ``A_g = (r_g - mean(r)) / (std(r) + eps)`` within each group.

    std is the sample std (n - 1), as torch.std, TRL and verl compute it. A group of one gets
    advantage 0 (no spread to measure). ``scale=False`` drops the division (= dr_grpo).
    Baseline: the group mean.
    """

    zero_signal_for_constant_groups = True

    def __init__(self, *, eps: float = 1e-6, scale: bool = True):
        self.eps = _positive("eps", eps)  # > 0: a constant group has std 0, and 0/0 is NaN
        self.scale = bool(scale)

    def _estimate(self, r, groups, step):
        if self.scale:
            advantages, baselines = _whiten(r, groups, self.eps)
        else:
            baselines = groups.mean(r)
            advantages = r - baselines
        return advantages, baselines, {}

    def expected_gain_terms(self, n: int) -> list[tuple[float, int, int]]:
        """The group mean holds the sample's own reward, so the base class's argument fails. With k
        of n solved, sum_g A_g (r_g - p) = sum_g A_g r_g (the advantages sum to 0) = k (n - k) / n
        divided by (s_k + eps), s_k = sqrt(k (n - k) / (n (n - 1))) the sample std (``scale``), and
        P(k | p) = C(n, k) p^k (1 - p)^(n - k): V(n) = sum_{k=1}^{n-1} C(n, k) p^(k+1) (1 - p)^(n-k+1)
        k (n - k) / (n (s_k + eps)). Without the std (dr_grpo) the sum is (n - 1) p^2 (1 - p)^2: the
        group mean takes 1/n of each sample's own signal back. All-equal outcomes (k = 0, n) add 0."""
        if not self.scale:
            return [(float(max(n - 1, 0)), 2, 2)]
        return [(math.comb(n, k) * k * (n - k) / n / (math.sqrt(k * (n - k) / (n * (n - 1))) + self.eps), k + 1,
                 n - k + 1) for k in range(1, n)]


@register_estimator("dr_grpo")
class DrGRPO(GRPO):
    """Dr. GRPO (Liu et al. 2025): ``A_g = r_g - mean(r)`` within each group.

    Departs from GRPO by not dividing by the group std, which up-weights prompts that are
    nearly always solved or failed (difficulty bias). Pair it with the
    ``seq-mean-token-sum-norm`` aggregation, which removes GRPO's length bias. Baseline: the
    group mean.
    """

    def __init__(self):
        super().__init__(scale=False)


@register_estimator("rloo")
class RLOO(AdvantageEstimator):
    """RLOO (Ahmadian et al. 2024): ``A_g = r_g - mean_{k != g} r_k`` within each group.

    The leave-one-out baseline does not depend on the sample's own reward, so the policy
    gradient stays unbiased. Needs at least 2 samples per prompt. Baseline: the LOO mean.
    """

    zero_signal_for_constant_groups = True

    def _estimate(self, r, groups, step):
        singles = (groups.sizes < 2).nonzero().flatten()
        if singles.numel():
            ids = [groups.keys[i] for i in singles[:5].tolist()]
            raise ValueError(f"rloo needs G >= 2 samples per prompt, but {singles.numel()} prompt(s) "
                             f"have 1 (e.g. {ids}); sample more completions per prompt, or use "
                             f"'reinforce' (batch leave-one-out) or 'kae' (history) for G = 1")
        baselines = groups.loo_mean(r)
        return r - baselines, baselines, {}


# --------------------------------------------------------------------------------------------
# Batch baselines: one value for the whole batch, ignoring which prompt a sample came from.
# --------------------------------------------------------------------------------------------


@register_estimator("reinforce")
class Reinforce(AdvantageEstimator):
    """REINFORCE (Williams 1992): ``A = r - b``.

    ``baseline="loo"``: b_g = mean of all *other* samples in the batch (any prompt), which keeps
    the estimator unbiased; with N = 1 there is no other sample and b = 0.
    ``baseline="none"``: b = 0, the plain score-function estimator.
    """

    def __init__(self, *, baseline: str = "loo"):
        self.baseline = _choice("baseline", baseline, ("loo", "none"))

    def _estimate(self, r, groups, step):
        baselines = _Groups.whole_batch(r.numel()).loo_mean(r) if self.baseline == "loo" else torch.zeros_like(r)
        return r - baselines, baselines, {}


@register_estimator("reinforce_pp")
class ReinforcePP(AdvantageEstimator):
    """REINFORCE++ (Hu 2025): ``A = (r - mean_batch(r)) / (std_batch(r) + eps)``.

    GRPO's whitening applied to the whole batch instead of each group (sample std, n - 1).
    The paper's token-level KL-in-reward is not part of this estimator (see losses.kl_penalty).
    Baseline: the batch mean.
    """

    def __init__(self, *, eps: float = 1e-6):
        self.eps = _positive("eps", eps)

    def _estimate(self, r, groups, step):
        advantages, baselines = _whiten(r, _Groups.whole_batch(r.numel()), self.eps)
        return advantages, baselines, {}


# --------------------------------------------------------------------------------------------
# Value baselines from outside the current group: history (kae) or an offline V* (astar).
# --------------------------------------------------------------------------------------------


@register_estimator("kae")
class KAE(AdvantageEstimator):
    """KAE, kernelized advantage estimation (Gong et al., arXiv 2604.28005).

    The value of prompt x at step i is a kernel-weighted mean of x's own past rewards
    H(x) = [(s, z), ...] and the *other* samples of its current group::

        V_g = [ sum_{(s,z) in H(x)} K(d(i,s)) z + K(0) sum_{k != g} r_k ]
              / [ sum_{(s,z) in H(x)} K(d(i,s)) + (G - 1) K(0) ]
        A_g = r_g - V_g                                      (reward units)

    A sample's own reward never enters its baseline, so the gradient stays unbiased; with
    G = 1 the baseline comes from history alone, which is what lets KAE work where group
    baselines cannot.

    Options:
      kernel: "triangular" K(u) = max(0, 1 - u) | "exponential" K(u) = exp(-u) for u <= 1, else 0.
      bandwidth_mode: "window"   d = (i - s) / h, with h in steps (a window of h steps);
                      "relative" d = (i - s) / (i h), the paper theory's relative distance;
                      "auto"     relative distance with h = auto_c * N(x)^(-1/3), where N(x) is the
                                 number of history entries of x plus its current group size.
                                 The N^(-1/3) rate is the theory's; the constant auto_c is ours
                                 (the paper gives none), so treat it as a tuning knob.
      bandwidth: h for "window" and "relative" (the paper reports h ~ 10, units unconfirmed).
                 In "relative" mode d < 1/h, so h = 10 keeps every past reward at nearly full
                 weight (d < 0.1); relative bandwidths that forget are well below 1.
      scale: "none" | "batch": divide advantages by their batch sample std + eps. Whether the
             paper divides by a std is unconfirmed, hence an option (off by default).
      max_history: entries kept per prompt (oldest dropped first).

    Each ``estimate`` call is one step; the current rewards join H(x) *after* the baselines
    are computed. History is meant to come from strictly earlier steps: the lag i - s is
    clamped at 0, so entries from a repeated (or later) step count with full weight K(0).
    Entries whose weight has reached 0 are dropped (in "window" and "relative" modes the
    distance only grows as i grows, so they can never count again; in "auto" mode h moves
    with N(x), so there only ``max_history`` bounds memory). Steps are assumed non-decreasing.

    ``use_prior(prior)`` (``algo.kae_prior``; not in the paper) adds to both sums a prior
    pseudo-observation of weight kappa(x) at p0(x), the prompt's pass-rate prior and its fitted
    strength (``passrate.py``)::

        V_g = [ sum_H K z + K(0) sum_{k != g} r_k + kappa p0 ] / [ sum_H K + (G - 1) K(0) + kappa ]

    so that a prompt with little history gets a baseline between its prior and its few rewards:
    the posterior mean of its pass rate given everything but its own sample. p0 and kappa come
    from earlier steps and other prompts, never from the sample's own reward, so the gradient
    stays unbiased.

    When the denominator is 0 (no history with weight, G = 1 and no prior), the baseline falls
    back to the batch leave-one-out mean (0 if N = 1); such samples are counted in
    ``metrics["kae_fallback"]``. ``metrics["kae_history_weight_mean"]`` is the mean over samples
    of sum K(d) over H(x): the effective number of past rewards in a baseline.
    ``metrics["kae_history_size"]`` is the number of (step, reward) entries stored after the step;
    ``metrics["kae_prior_weight_mean"]``, with a prior, the mean kappa over samples.
    """

    def __init__(self, *, kernel: str = "triangular", bandwidth: float = 10.0, bandwidth_mode: str = "window",
                 auto_c: float = 1.0, scale: str = "none", eps: float = 1e-6, max_history: int = 512):
        self.kernel = _choice("kernel", kernel, ("triangular", "exponential"))
        self.bandwidth = _positive("bandwidth", bandwidth)
        self.bandwidth_mode = _choice("bandwidth_mode", bandwidth_mode, ("window", "relative", "auto"))
        self.auto_c = _positive("auto_c", auto_c)
        self.scale = _choice("scale", scale, ("none", "batch"))
        self.eps = _positive("eps", eps)
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history={max_history!r} is not valid; it must be an int >= 1")
        self.max_history = max_history
        self.history = PromptHistory(max_history)  # H(x), until ``use_history`` shares the run's
        self._prior: Callable[[list[str]], tuple[Any, Any]] | None = None

    def use_prior(self, prior: Callable[[list[str]], tuple[Any, Any]]) -> None:
        """Shrink every baseline toward a prior (class docstring): ``prior(prompt_ids)`` gives, for
        the P prompt ids of a batch, (p0, kappa), each (P,) or a number, from earlier steps only."""
        self._prior = prior

    def _kernel(self, u: Tensor) -> Tensor:
        """K(u) for distances u >= 0; both kernels have K(0) = 1 and support [0, 1]."""
        if self.kernel == "triangular":
            return (1 - u).clamp(min=0)
        return torch.where(u <= 1, torch.exp(-u), 0.0)

    def _weight(self, step: int, past_steps: Tensor, h: Tensor) -> Tensor:
        """K(d(step, s)) for history entries at ``past_steps`` (M,) with bandwidths ``h`` (M,)."""
        lag = (step - past_steps).clamp(min=0)
        return self._kernel(lag / h if self.bandwidth_mode == "window" else lag / (step * h))

    def lag_weight(self, lag: int, step: int) -> float:
        """K(d): the weight at ``step`` of a reward the prompt got ``lag`` steps earlier, with
        h = ``bandwidth`` ("window" and "relative" modes; "auto" sets h per prompt from N(x))."""
        past = torch.tensor([float(step - lag)], dtype=torch.float64)
        return float(self._weight(step, past, torch.tensor([self.bandwidth], dtype=torch.float64))[0])

    def _estimate(self, r, groups, step):
        P = len(groups.keys)
        hist = [self.history.get(key) for key in groups.keys]
        counts = torch.tensor([len(steps) for steps, _ in hist], dtype=torch.float64)
        if self.bandwidth_mode == "auto":
            h = self.auto_c * (counts + groups.sizes) ** (-1 / 3)
        else:
            h = torch.full((P,), self.bandwidth, dtype=torch.float64)

        # All history entries of this batch's prompts, flattened, with their group index.
        entry_group = torch.repeat_interleave(torch.arange(P), counts.long())
        entry_step = torch.tensor([s for steps, _ in hist for s in steps], dtype=torch.float64)
        entry_reward = torch.tensor([z for _, rewards in hist for z in rewards], dtype=torch.float64)
        w = self._weight(step, entry_step, h[entry_group])
        hist_w = _segment_sum(w, entry_group, P)
        hist_wz = _segment_sum(w * entry_reward, entry_group, P)

        prior_wz = prior_w = torch.zeros(P, dtype=torch.float64)
        if self._prior is not None:  # the prior is one more observation with weight kappa, at p0
            p0, prior_w = (torch.as_tensor(v, dtype=torch.float64).expand(P) for v in self._prior(groups.keys))
            prior_wz = prior_w * p0
        k0 = float(self._kernel(torch.zeros(())))
        i = groups.index
        num = hist_wz[i] + prior_wz[i] + k0 * (groups.sum(r)[i] - r)
        den = hist_w[i] + prior_w[i] + k0 * (groups.sizes[i] - 1)
        # weights are >= 0, so the sum is exactly 0 only when every term is 0
        fallback = den == 0
        baselines = torch.where(fallback, _Groups.whole_batch(r.numel()).loo_mean(r),
                                num / torch.where(fallback, 1.0, den))
        advantages = r - baselines
        if self.scale == "batch" and r.numel() > 1:  # a batch of one has no std to divide by
            advantages = advantages / (advantages.std() + self.eps)

        metrics = {"kae_fallback": float(fallback.sum()), "kae_history_weight_mean": float(hist_w[i].mean())}
        if self._prior is not None:
            metrics["kae_prior_weight_mean"] = float(prior_w[i].mean())
        return advantages, baselines, metrics

    def estimate(self, rewards: Tensor, prompt_ids: Sequence[str], step: int) -> AdvantageOutput:
        out = super().estimate(rewards, prompt_ids, step)
        # after this step's rewards joined (a shared history's owner records them after this call)
        out.metrics["kae_history_size"] = float(self.history.size())
        return out

    def _record(self, prompt_ids: list[str], r: Tensor, step: int) -> None:
        """Add this step's rewards to a history of its own, and drop entries that can no longer count.

        A shared history (``use_history``) is its owner's to record and is not pruned: the rollout
        allocator reads a prompt's past visits an epoch later, long after they stopped counting for KAE.
        """
        if self._history_shared:
            return
        self.history.record(prompt_ids, r.tolist(), step)
        if self.bandwidth_mode == "auto":  # h moves with N(x): an entry of weight 0 may count again
            return
        h = torch.tensor([self.bandwidth], dtype=torch.float64)
        for key in dict.fromkeys(prompt_ids):
            steps, rewards = self.history.get(key)
            alive = (self._weight(step, torch.tensor(steps, dtype=torch.float64), h) > 0).tolist()
            self.history.set(key, [s for s, k in zip(steps, alive) if k], [z for z, k in zip(rewards, alive) if k])
        self._drop_stale_prompts(step)

    def _drop_stale_prompts(self, step: int) -> None:
        """Forget prompts absent from recent batches whose newest entry already has weight 0.

        Older entries of a prompt have larger lags, so a zero weight for the newest one means
        the whole history is dead. Keeps memory bounded by the recent prompts, not the dataset.
        """
        keys = list(self.history.entries)
        newest = torch.tensor([float(self.history.get(k)[0][-1]) for k in keys], dtype=torch.float64)
        dead = self._weight(step, newest, torch.full_like(newest, self.bandwidth)) == 0
        for k in (keys[j] for j in dead.nonzero().flatten().tolist()):
            self.history.set(k, [], [])

    def state_dict(self) -> dict[str, Any]:
        """{"history": {prompt_id: [[step, reward], ...]}}, oldest first; JSON-safe, exact. {} when
        the history is shared (``use_history``): its owner saves it."""
        return {} if self._history_shared else {"history": self.history.state_dict()["history"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"history"}
        if unknown:
            raise ValueError(f"unexpected kae state keys {sorted(unknown)}; expected {{'history': ...}}")
        if "history" in state:  # absent when the history was shared, and restored by its owner
            self.history.load_state_dict({"history": state["history"], "population": self.history.population})


@register_estimator("astar")
class AStar(AdvantageEstimator):
    """A*-PO stage 2 (Brantley et al., arXiv 2505.20686): ``A = r - V*(x)``.

    ``v_star`` maps each prompt id to V*(x), estimated offline from reference-policy samples
    (see ``optimal_value``). Baseline: V*(x). Because V* does not come from the group, a group
    of equal rewards still carries signal.
    """

    def __init__(self, *, v_star: dict[str, float]):
        if not isinstance(v_star, dict):
            raise ValueError("v_star must be a dict {prompt_id: V*(x)}")
        self.v_star = {str(k): float(v) for k, v in v_star.items()}
        bad = [k for k, v in self.v_star.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"v_star has non-finite values for prompt ids {bad[:5]}; recompute V* for them")

    def __repr__(self) -> str:
        return f"AStar(v_star=<{len(self.v_star)} prompts>)"

    def _estimate(self, r, groups, step):
        missing = [k for k in groups.keys if k not in self.v_star]
        if missing:
            raise ValueError(f"astar has no V* for prompt id(s) {missing[:5]}"
                             f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}; "
                             f"run stage 1 (`frugalrl vstar`) on these prompts or drop them from the batch")
        baselines = torch.tensor([self.v_star[k] for k in groups.keys], dtype=torch.float64)[groups.index]
        return r - baselines, baselines, {}


# --------------------------------------------------------------------------------------------


def optimal_value(rewards: Tensor, beta: float) -> Tensor:
    """V* of A*-PO over the last dim: ``beta * log( mean_j exp(r_j / beta) )``.

    rewards: (..., n) float rewards of n reference-policy samples per prompt -> (...,) V*.
    beta > 0 is the KL-regularisation temperature (beta_1 in the paper, 0.5 by default there).

    Computed as a logsumexp shifted by the max, so exp() never overflows however large
    r / beta gets, and written with expm1/log1p so that large beta (exponents near 0, V* near
    the mean) keeps its digits in float32.

    V* is a soft maximum: mean(r) <= V* <= max(r); it tends to the mean as beta -> inf and
    to the *max* as beta -> 0+. ``beta = 0`` is defined (by the SPEC, not as a limit) as the plain
    mean, the convention for "no KL-optimal correction".
    """
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    if r.ndim == 0 or r.shape[-1] == 0:
        raise ValueError(f"rewards must have at least one sample in the last dim; got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite; score unscorable samples as a number (e.g. 0.0)")
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0 (0 = plain mean), got {beta}")
    if beta == 0:
        return r.mean(dim=-1)
    top = r.amax(dim=-1, keepdim=True)
    # = top + beta * log(mean(exp((r - top) / beta))) = beta * (logsumexp(r / beta) - log n)
    return top.squeeze(-1) + beta * torch.log1p(torch.expm1((r - top) / beta).mean(dim=-1))
