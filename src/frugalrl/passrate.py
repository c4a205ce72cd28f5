"""p̂(x): each prompt's pass rate before its rollout, a Beta posterior from its history and an
empirical-Bayes prior.

For prompt x with visits v = 0 (newest), 1, ... in the run's ``PromptHistory`` (at most
``MAX_VISITS``), visit v made at step s_v with n_v rewards z (clipped to [0, 1]; 1 = solved), read
at step t::

    w_v   = exp(-(t - s_v) / tau)                tau: a memory in *steps* (rollout.passrate_memory)
    s     = sum_v w_v sum(z of visit v)          weighted successes
    n     = sum_v w_v n_v                        weighted samples
    alpha = kappa p0(x) + s,   beta = kappa (1 - p0(x)) + n - s

The prior Beta(kappa p0(x), kappa (1 - p0(x))) has its mean p0(x) from ``rollout.passrate_prior``
and its strength kappa (rollout.passrate_strength) *fitted to the run's own visits*: a population of
prompts that are nearly always or nearly never solved (a U-shaped spread of pass rates) has
kappa near 1, a population of alike prompts a large kappa, and no constant fits both.

Why a memory in steps and not a kernel over visits (which weighed the newest visit 1 however old it
was): the policy moves between visits. On the built-in task (pool 2,048, 64 prompts a step) a prompt
comes back about 32 steps later, by which time RL has pushed many pass rates from ~0.5 to ~0 or ~1;
four samples of the old policy counted as four samples of the current one made revisits look more
mixed than they are, and the all-equal share was under-predicted by 0.07 (calibration gap 0.071 on
a replay of the run's groups; 0.023 with the memory in steps, fitted). A policy that does not move
gets a long memory from the same fit (``MEMORIES`` ends at "never forget").

**How kappa and tau are fitted** (``fit_prior``): by the Beta-Binomial marginal likelihood of the
success counts of the run's last ``FIT_WINDOW`` groups, each predicted from the prompt's visits
*before* it, at their ages then (prequential: every group is held out from the posterior that
predicts it)::

    log P(k | n) = log C(n, k) + log B(alpha + k, beta + n - k) - log B(alpha, beta)

maximised over the grid ``STRENGTHS`` x ``MEMORIES``, refitted after every step: from the current
point to the best of its grid neighbours (9 evaluations instead of the grid's 400; one step of
kappa's grid is 23 %, so the fit follows a drift of 8x in ten steps). The window is short (eight
steps of 64 prompts) because the population it describes drifts as the policy learns: a fit over
32 steps lagged the trend (gap 0.032 against 0.023 on the same replay). The likelihood and not
the moment estimate 1/(kappa + 1) = (V / (mu (1 - mu)) - 1/n) / (1 - 1/n), because (a) one
likelihood handles groups of unequal sizes (budget), priors that differ per prompt (cross_prompt,
vstar) and revisits, where the moments need one formula each; (b) the moment estimate leaves
(0, inf) when the spread is small (V < mu (1 - mu)/n) and must be clipped; (c) the quantity
maximised is the mean log predictive probability that the allocator's metrics report
(``passrate_logpred_*``), a proper score, so the fit optimises what is checked. First visits
identify kappa (their predictive is the prior's); revisits identify tau. Until the window holds a
group that identifies a parameter (kappa: a group of two or more, or a revisit; tau: a revisit), it
keeps its start value (``START``). ``rollout.passrate_strength`` / ``passrate_memory`` set to a
number > 0 fix that parameter instead (0, their default, fits it).

**Posterior expectations** (``beta_moment``): every function of p that the allocator uses (the
chance that a group's rewards are all equal, the log predictive, a signal value) is a polynomial
in p and 1 - p, so its expectation under the posterior is a sum of moments
E[p^i (1 - p)^j] = B(alpha + i, beta + j) / B(alpha, beta). Plugging the posterior mean into a
convex function such as p^n + (1 - p)^n always under-predicts it.

The prior means p0 (``rollout.passrate_prior``):

* ``population``: the mean pass rate of the prompts the sampler draws (``PromptHistory.population``:
  every drawn prompt counted once, whether the allocator rolled it out or not; 0.5 before the first
  step).
* ``vstar``: A*-PO's stage-1 pass rate of x, its n reference samples' mean reward (a free prior where
  V* was built); the population prior for a prompt stage 1 did not sample.
* ``cross_prompt``: a kernel over prompts. Each training prompt is embedded once, before training,
  as the starting policy's last hidden state at the prompt's last token (``prompt_embeddings``); the
  prior of x is the mean pass rate of its ``rollout.prior_neighbors`` nearest prompts with history
  (cosine similarity of the centred embeddings), shrunk toward the population mean by
  ``_NEIGHBOUR_PSEUDO`` neighbours. A prompt never seen borrows from similar ones. The starting
  policy's states are used, not the current one's, so that the embeddings are a fixed function of
  the run's inputs: the same on every rank and after a resume, with no state to save.

Each prior kind the run uses (``kinds``: the allocator's, the population one that skip compares
with, KAE's ``algo.kae_prior``) has its own fitted (kappa, tau).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from frugalrl.history import PromptHistory

__all__ = ["PassRates", "PassRateEstimator", "prompt_embeddings", "PRIORS", "beta_moment", "all_equal_probability",
           "log_predictive", "fit_prior", "visit_counts"]

PRIORS = ("population", "vstar", "cross_prompt")
_EDGE = 1e-3  # priors are kept this far from 0 and 1
MAX_VISITS = 24  # a prompt's newest visits that count: bounds the history read per prompt and the fit's time
FIT_WINDOW = 512  # groups the fit reads: 8 steps of 64 prompts; the population drifts as the policy learns
STRENGTHS = np.geomspace(0.05, 200.0, 40)  # kappa's grid, in samples (a step of 23 %)
MEMORIES = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1e6])  # tau, in steps; 1e6: never forget
START = {"strength": 2.0, "memory": 64.0}  # before the data identify them
_NEIGHBOUR_PSEUDO = 2.0  # the cross-prompt prior's pull toward the population mean, in neighbours


def _log_beta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def beta_moment(alpha, beta, i, j, log: bool = False) -> np.ndarray:
    """E[p^i (1 - p)^j] for p ~ Beta(alpha, beta): B(alpha + i, beta + j) / B(alpha, beta); its
    logarithm with ``log``.

    Every argument broadcasts (arrays or numbers; i, j >= 0, fractional allowed). The one function
    through which every expectation of a function of p passes (module docstring). Computed in log
    space in float64, so that a moment of order 30 of a near-certain posterior keeps its digits.
    """
    a, b, i, j = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (alpha, beta, i, j))
    out = _log_beta(a + i, b + j) - _log_beta(a, b)
    return (out if log else out.exp()).numpy()


def all_equal_probability(alpha, beta, n) -> np.ndarray:
    """P(all n rewards equal) under the Beta-Binomial: E[p^n] + E[(1 - p)^n]; 1 for n <= 1.
    alpha, beta, n broadcast."""
    n = np.asarray(n, dtype=np.float64)
    return np.where(n <= 1, 1.0, beta_moment(alpha, beta, n, 0) + beta_moment(alpha, beta, 0, n))


def log_predictive(alpha, beta, n, k) -> np.ndarray:
    """log P(k successes of n) under the Beta-Binomial: log C(n, k) + log E[p^k (1 - p)^(n - k)].
    k may be fractional (rewards in [0, 1] summed), through the gamma function. All broadcast."""
    n, k = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (n, k))
    log_choose = (torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)).numpy()
    return log_choose + beta_moment(alpha, beta, k.numpy(), (n - k).numpy(), log=True)


def smooth_visits(visit_k: np.ndarray, visit_n: np.ndarray, ages: np.ndarray,
                  tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(s, n), each (...,): visits (..., V) of successes and samples, at ``ages`` (..., V) steps,
    weighed exp(-age / tau)."""
    w = np.exp(-ages / tau)
    return (visit_k * w).sum(-1), (visit_n * w).sum(-1)


def fit_prior(p0: np.ndarray, n: np.ndarray, k: np.ndarray, visit_k: np.ndarray, visit_n: np.ndarray,
              ages: np.ndarray, strengths: np.ndarray, memories: np.ndarray) -> tuple[float, float]:
    """(kappa, tau) of the grid ``strengths`` x ``memories`` that maximise the summed log predictive
    probability of M groups (module docstring).

    p0, n, k: (M,) each group's prior mean, size and successes. visit_k, visit_n, ages: (M, V) the
    prompt's earlier visits and their ages in steps at the group's step, zero-padded. Ties go to the
    first grid point. Groups alike in all of these are scored once and weighed by their number
    (C(n, k), the same at every grid point, is left out).
    """
    rows, weight = np.unique(np.column_stack([p0, n, k, visit_k, visit_n, ages]), axis=0, return_counts=True)
    p0, n, k = rows[:, 0], rows[:, 1], rows[:, 2]
    visit_k, visit_n, ages = np.split(rows[:, 3:], 3, axis=1)
    kappa = np.asarray(strengths, dtype=np.float64)[:, None]  # (K, 1)
    best, out = -np.inf, (float(strengths[0]), float(memories[0]))
    for tau in memories:
        s, m = smooth_visits(visit_k, visit_n, ages, float(tau))  # (M,)
        score = beta_moment(kappa * p0 + s, kappa * (1 - p0) + m - s, k, n - k, log=True) @ weight  # (K,)
        top = int(np.argmax(score))
        if score[top] > best:
            best, out = float(score[top]), (float(kappa[top, 0]), float(tau))
    return out


@dataclass
class PassRates:
    """Beta posteriors of P prompts' pass rates; every field is a (P,) float64 array.

    alpha, beta: the posterior's parameters. prior: p0 of each prompt. samples: weighted
    past samples n (0 = never rolled out).
    """

    alpha: np.ndarray
    beta: np.ndarray
    prior: np.ndarray
    samples: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """p̂, (P,)."""
        return self.alpha / (self.alpha + self.beta)

    def moment(self, i, j) -> np.ndarray:
        """(P,) E[p^i (1 - p)^j] under each posterior (``beta_moment``)."""
        return beta_moment(self.alpha, self.beta, i, j)


def visit_counts(history: PromptHistory, prompt_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(successes, samples, steps) of ``prompt_id``'s newest ``MAX_VISITS`` visits, newest first, each (V,)."""
    visits = history.visits(prompt_id)[::-1][:MAX_VISITS]
    return (np.array([sum(min(1.0, max(0.0, z)) for z in rewards) for _, rewards in visits], dtype=np.float64),
            np.array([len(rewards) for _, rewards in visits], dtype=np.float64),
            np.array([step for step, _ in visits], dtype=np.float64))


def _neighbours(grid: np.ndarray, value: float) -> np.ndarray:
    """The grid point nearest ``value`` (on a log scale) first, then its neighbours on the grid."""
    i = int(np.argmin(np.abs(np.log(grid / value))))
    return grid[[i, *(j for j in (i - 1, i + 1) if 0 <= j < len(grid))]]


def _padded(rows: Sequence[np.ndarray]) -> np.ndarray:
    """(M, MAX_VISITS) from M rows of at most MAX_VISITS values, zero-padded."""
    out = np.zeros((len(rows), MAX_VISITS))
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


class PassRateEstimator:
    """p̂ of any prompt from the run's ``history``, as the module docstring says.

    ``prior``: one of ``PRIORS``, the kind ``estimate`` uses by default. ``kinds``: further prior
    kinds to track (each with its own fitted kappa and tau); ``population`` always is.
    ``strength``: kappa, a number of samples, or 0: fitted. ``memory``: tau, a number of steps, or
    0: fitted. ``vstar_rates``: {prompt id: stage-1 mean reward} (prior vstar).
    ``embeddings``: (ids, (M, H) tensor) of the training prompts (prior cross_prompt).
    ``neighbors``: k of the cross-prompt prior.

    ``record`` is how a step's rewards reach the history: it scores each group against the
    posterior that predicted it (the fit's data), records the rewards, and refits. Estimates are read
    at ``now``, the step after the newest recorded one: the step about to be rolled out.
    """

    def __init__(self, history: PromptHistory, *, prior: str = "population", kinds: Sequence[str] = (),
                 strength: float = 0.0, memory: float = 0.0,
                 vstar_rates: dict[str, float] | None = None,
                 embeddings: tuple[list[str], torch.Tensor] | None = None, neighbors: int = 32):
        self.kinds = tuple(dict.fromkeys((prior, "population", *kinds)))
        bad = [k for k in self.kinds if k not in PRIORS]
        if bad:
            raise ValueError(f"prior {bad[0]!r} is not valid; choose one of {list(PRIORS)}")
        if "vstar" in self.kinds and vstar_rates is None:
            raise ValueError("a vstar prior needs A*-PO's stage-1 samples (algo.estimator=astar, or "
                             "algo.kae_prior=vstar); use population or cross_prompt")
        if "cross_prompt" in self.kinds and embeddings is None:
            raise ValueError("a cross_prompt prior needs the prompts' embeddings")
        for name, value in (("strength", strength), ("memory", memory)):
            if not value >= 0:
                raise ValueError(f"rollout.passrate_{name}={value!r} is not valid; give a number > 0, or 0 to fit it")
        self.history, self.prior, self.neighbors = history, prior, neighbors
        self.fixed = {"strength": float(strength), "memory": float(memory)}  # 0: fitted
        self.vstar_rates = vstar_rates or {}
        # kind -> [kappa, tau]: fitted (or fixed) parameters of each tracked prior
        self.params = {k: [self.fixed[p] or START[p] for p in ("strength", "memory")] for k in self.kinds}
        # the fit's data: one entry a group, [p0 of each kind, n, k, earlier visits' k, ... n, ... ages]
        self.window: list[list] = []
        self.now = 1
        # prompt id -> (entry count and newest step when read, visits' successes, samples, steps): a
        # prompt's visits change only when it is rolled out again, and the cross-prompt prior reads every prompt's
        self._cache: dict[str, tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._index: dict[str, int] = {}
        if embeddings is not None:
            ids, vectors = embeddings
            self._index = {k: i for i, k in enumerate(ids)}
            centred = vectors.double() - vectors.double().mean(0)
            self._unit = torch.nn.functional.normalize(centred, dim=1)

    def strength(self, kind: str | None = None) -> float:
        """kappa of prior ``kind`` (default: this estimator's), in samples."""
        return self.params[kind or self.prior][0]

    def memory(self, kind: str | None = None) -> float:
        """tau of prior ``kind`` (default: this estimator's), in steps."""
        return self.params[kind or self.prior][1]

    def _visits(self, prompt_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(successes, samples, steps) of the prompt's visits (``visit_counts``)."""
        steps, _ = self.history.get(prompt_id)
        key = (len(steps), steps[-1] if steps else 0)
        hit = self._cache.get(prompt_id)
        if hit is None or hit[:2] != key:
            hit = (*key, *visit_counts(self.history, prompt_id))
            self._cache[prompt_id] = hit
        return hit[2:]

    def _smoothed(self, prompt_ids: Sequence[str], tau: float) -> tuple[np.ndarray, np.ndarray]:
        """(s, n), each (P,), of ``prompt_ids`` read at step ``now`` with memory tau."""
        visits = [self._visits(k) for k in prompt_ids]
        ages = _padded([self.now - steps for _, _, steps in visits])  # padding: no samples, at age 0
        return smooth_visits(_padded([k for k, _, _ in visits]), _padded([n for _, n, _ in visits]), ages, tau)

    def population(self) -> float:
        return 0.5 if self.history.population is None else min(1.0, max(0.0, self.history.population))

    def priors(self, prompt_ids: Sequence[str], kind: str | None = None) -> np.ndarray:
        """(P,) p0 of each prompt under prior ``kind`` (default: this estimator's)."""
        kind = kind or self.prior
        pop = self.population()
        if kind == "population":
            return np.full(len(prompt_ids), pop)
        if kind == "vstar":
            return np.array([min(1.0, max(0.0, self.vstar_rates.get(k, pop))) for k in prompt_ids])
        return self._cross_prompt(prompt_ids, pop)

    def _cross_prompt(self, prompt_ids: Sequence[str], pop: float) -> np.ndarray:
        seen = [k for k in self.history.entries if k in self._index]
        out = np.full(len(prompt_ids), pop)
        rows = [i for i, k in enumerate(prompt_ids) if k in self._index]
        if not seen or not rows:
            return out
        s, n = self._smoothed(seen, self.memory("cross_prompt"))
        rates_t = torch.from_numpy(s / n)
        sims = self._unit[[self._index[prompt_ids[i]] for i in rows]] @ self._unit[[self._index[k] for k in seen]].T
        column = {k: c for c, k in enumerate(seen)}
        for j, i in enumerate(rows):  # a prompt is not its own neighbour
            if prompt_ids[i] in column:
                sims[j, column[prompt_ids[i]]] = -math.inf
        k = min(self.neighbors, len(seen))
        top = sims.topk(k, dim=1)
        valid = torch.isfinite(top.values)
        total = (rates_t[top.indices] * valid).sum(1)
        count = valid.sum(1).double()
        out[rows] = ((total + _NEIGHBOUR_PSEUDO * pop) / (count + _NEIGHBOUR_PSEUDO)).numpy()
        return out

    def estimate(self, prompt_ids: Sequence[str], kind: str | None = None) -> PassRates:
        """The posteriors of ``prompt_ids`` (P strings) under prior ``kind`` (default: this estimator's),
        from the history as it stands."""
        kind = kind or self.prior
        kappa, tau = self.params[kind]
        p0 = np.clip(self.priors(prompt_ids, kind), _EDGE, 1 - _EDGE)  # a Beta needs alpha, beta > 0
        s, n = self._smoothed(prompt_ids, tau)
        return PassRates(kappa * p0 + s, kappa * (1 - p0) + n - s, p0, n)

    def fresh(self) -> PassRates:
        """The posterior of a prompt drawn fresh from the pool, (1,): the population prior."""
        kappa, p0 = self.strength("population"), min(max(self.population(), _EDGE), 1 - _EDGE)
        return PassRates(np.array([kappa * p0]), np.array([kappa * (1 - p0)]), np.array([p0]), np.zeros(1))

    def record(self, prompt_ids: Sequence[str], rewards: Sequence[float], step: int,
               left_out: Sequence[float] = ()) -> None:
        """Enter one step's generated completions (N ids, N rewards, each group's consecutive or not):
        each group joins the fit's window with what predicted it, the rewards join the history
        (``left_out``: pass-rate estimates of drawn prompts not rolled out, for the population
        mean), and every tracked prior is refitted."""
        groups: dict[str, list[float]] = {}
        for key, z in zip(prompt_ids, rewards):
            groups.setdefault(key, []).append(min(1.0, max(0.0, float(z))))
        ids = list(groups)
        p0 = np.stack([np.clip(self.priors(ids, kind), _EDGE, 1 - _EDGE) for kind in self.kinds], axis=1)
        for key, priors in zip(ids, p0):
            visit_k, visit_n, steps = self._visits(key)
            self.window.append([priors.tolist(), len(groups[key]), sum(groups[key]), visit_k.tolist(),
                                visit_n.tolist(), (step - steps).tolist()])
        del self.window[:-FIT_WINDOW]
        self.history.record(prompt_ids, rewards, step, left_out)
        self.now = step + 1
        self._refit()

    def _refit(self) -> None:
        """Each tracked prior's (kappa, tau): the best of the current point and its grid neighbours
        for the window (module docstring). A parameter no group of the window identifies, or one
        fixed by the config, keeps its value."""
        p0 = np.array([w[0] for w in self.window])  # (M, kinds)
        n, k = (np.array([w[i] for w in self.window], dtype=np.float64) for i in (1, 2))
        visit_k, visit_n, ages = (_padded([w[i] for w in self.window]) for i in (3, 4, 5))
        revisit = bool(visit_n.any())
        free = {"strength": not self.fixed["strength"] and (revisit or bool((n >= 2).any())),
                "memory": not self.fixed["memory"] and revisit}
        if not any(free.values()):
            return
        for column, kind in enumerate(self.kinds):
            grids = (_neighbours(grid, value) if free[name] else np.array([value])
                     for name, grid, value in zip(("strength", "memory"), (STRENGTHS, MEMORIES), self.params[kind]))
            self.params[kind] = list(fit_prior(p0[:, column], n, k, visit_k, visit_n, ages, *grids))

    def state_dict(self) -> dict[str, Any]:
        """{"params": {kind: [kappa, tau]}, "window": [...], "now": step}: JSON-safe, exact."""
        return {"params": {k: list(v) for k, v in self.params.items()}, "window": [list(w) for w in self.window],
                "now": self.now}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["params"]) != list(self.kinds):
            raise ValueError(f"the saved pass-rate state tracks priors {sorted(state['params'])}, this run "
                             f"{sorted(self.kinds)}; resume with the same rollout.passrate_prior and algo.kae_prior")
        if "now" not in state:  # written before the memory was in steps: its fit is refitted from the next step
            steps = [s for entry_steps, _ in self.history.entries.values() for s in entry_steps[-1:]]
            self.now = max(steps, default=0) + 1
            return
        self.params = {k: list(v) for k, v in state["params"].items()}
        self.window = [list(w) for w in state["window"]]
        self.now = int(state["now"])


@torch.no_grad()
def prompt_embeddings(model, tokenizer, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """(P, H) float32: the model's last hidden state at each prompt's last token (left-padded
    batches, so the last position is the prompt's last token)."""
    from frugalrl.rollout import encode_prompts, eval_mode

    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch):
            enc = {k: v.to(device) for k, v in encode_prompts(tokenizer, prompts[start:start + batch]).items()}
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            hidden = model(**enc, position_ids=positions, output_hidden_states=True).hidden_states[-1]
            out.append(hidden[:, -1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)
