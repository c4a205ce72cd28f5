"""p̂(x): each prompt's pass rate before its rollout, from its history, shrunk toward a prior.

For prompt x with visits v = 0 (newest), 1, ... in the run's ``PromptHistory``, each a step's
n_v rewards z (clipped to [0, 1]; 1 = solved)::

    w_v   = exp(-v / h)                          h = rollout.passrate_visits: a kernel over *visits*
    s     = sum_v w_v sum(z of visit v)          weighted successes
    n     = sum_v w_v n_v                        weighted samples
    alpha = m p0(x) + s,   beta = m (1 - p0(x)) + n - s     m = rollout.passrate_strength
    p̂(x)  = alpha / (alpha + beta),   std = sqrt(p̂ (1 - p̂) / (alpha + beta + 1))

a Beta posterior (MoPPS keeps one per prompt, decayed over time). The kernel runs over visits, not
steps, because a prompt of a finite pool comes back once an epoch: a window of h *steps* would give
every past visit weight 0, while the policy has changed by an epoch's steps either way; decaying by
visits forgets old evidence at the rate the prompt is seen. With no history p̂ = p0, the prior
(``rollout.passrate_prior``):

* ``population``: the running mean reward of the run (``PromptHistory.population``; 0.5 before the
  first step).
* ``vstar``: A*-PO's stage-1 pass rate of x, its n reference samples' mean reward (a free prior where
  V* was built); the population prior for a prompt stage 1 did not sample.
* ``cross_prompt``: a kernel over prompts. Each training prompt is embedded once, before training,
  as the starting policy's last hidden state at the prompt's last token (``prompt_embeddings``); the
  prior of x is the mean raw pass rate of its ``rollout.prior_neighbors`` nearest prompts with history
  (cosine similarity of the centred embeddings), shrunk toward the population mean by a pseudo-count
  of ``rollout.passrate_strength`` neighbours. A prompt never seen borrows from similar ones. The
  starting policy's states are used, not the current one's, so that the embeddings are a fixed
  function of the run's inputs: the same on every rank and after a resume, with no state to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from frugalrl.history import PromptHistory

__all__ = ["PassRates", "PassRateEstimator", "prompt_embeddings", "PRIORS"]

PRIORS = ("population", "vstar", "cross_prompt")
_EDGE = 1e-3  # priors are kept this far from 0 and 1


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

    @property
    def std(self) -> np.ndarray:
        """The posterior standard deviation of p, (P,)."""
        p = self.mean
        return np.sqrt(p * (1 - p) / (self.alpha + self.beta + 1))


def smoothed(history: PromptHistory, prompt_id: str, h: float) -> tuple[float, float]:
    """(weighted successes s, weighted samples n) of ``prompt_id``'s visits, newest first."""
    s = n = 0.0
    for v, (_, rewards) in enumerate(reversed(history.visits(prompt_id))):
        w = math.exp(-v / h)
        s += w * sum(min(1.0, max(0.0, z)) for z in rewards)
        n += w * len(rewards)
    return s, n


class PassRateEstimator:
    """p̂ of any prompt from the run's ``history``, as the module docstring says.

    ``visits_bandwidth``: h, in visits (> 0). ``strength``: m, the prior's weight in samples (> 0).
    ``prior``: one of ``PRIORS``. ``vstar_rates``: {prompt id: stage-1 mean reward} (prior vstar).
    ``embeddings``: (ids, (M, H) tensor) of the training prompts (prior cross_prompt).
    ``neighbors``: k of the cross-prompt prior.
    """

    def __init__(self, history: PromptHistory, *, visits_bandwidth: float = 2.0, strength: float = 2.0,
                 prior: str = "population", vstar_rates: dict[str, float] | None = None,
                 embeddings: tuple[list[str], torch.Tensor] | None = None, neighbors: int = 32):
        if prior not in PRIORS:
            raise ValueError(f"rollout.passrate_prior={prior!r} is not valid; choose one of {list(PRIORS)}")
        if prior == "vstar" and vstar_rates is None:
            raise ValueError("rollout.passrate_prior=vstar needs A*-PO's stage-1 samples (algo.estimator=astar); "
                             "use population or cross_prompt")
        if prior == "cross_prompt" and embeddings is None:
            raise ValueError("rollout.passrate_prior=cross_prompt needs the prompts' embeddings")
        self.history, self.h, self.m, self.prior = history, visits_bandwidth, strength, prior
        self.vstar_rates = vstar_rates or {}
        self.neighbors = neighbors
        # prompt id -> (its entry count and newest step when computed, s, n): a prompt's (s, n)
        # change only when it is rolled out again, and the cross-prompt prior reads every prompt's
        self._cache: dict[str, tuple[int, int, float, float]] = {}
        self._index: dict[str, int] = {}
        if embeddings is not None:
            ids, vectors = embeddings
            self._index = {k: i for i, k in enumerate(ids)}
            centred = vectors.double() - vectors.double().mean(0)
            self._unit = torch.nn.functional.normalize(centred, dim=1)

    def _sn(self, prompt_id: str) -> tuple[float, float]:
        steps, _ = self.history.get(prompt_id)
        key = (len(steps), steps[-1] if steps else 0)
        hit = self._cache.get(prompt_id)
        if hit is None or hit[:2] != key:
            hit = (*key, *smoothed(self.history, prompt_id, self.h))
            self._cache[prompt_id] = hit
        return hit[2], hit[3]

    def population(self) -> float:
        return 0.5 if self.history.population is None else min(1.0, max(0.0, self.history.population))

    def priors(self, prompt_ids: list[str], kind: str | None = None) -> np.ndarray:
        """(P,) p0 of each prompt under prior ``kind`` (default: this estimator's)."""
        kind = kind or self.prior
        pop = self.population()
        if kind == "population":
            return np.full(len(prompt_ids), pop)
        if kind == "vstar":
            return np.array([min(1.0, max(0.0, self.vstar_rates.get(k, pop))) for k in prompt_ids])
        return self._cross_prompt(prompt_ids, pop)

    def _cross_prompt(self, prompt_ids: list[str], pop: float) -> np.ndarray:
        seen = [k for k in self.history.entries if k in self._index]
        out = np.full(len(prompt_ids), pop)
        rows = [i for i, k in enumerate(prompt_ids) if k in self._index]
        if not seen or not rows:
            return out
        rates_t = torch.tensor([s / n for s, n in map(self._sn, seen)], dtype=torch.float64)
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
        out[rows] = ((total + self.m * pop) / (count + self.m)).numpy()
        return out

    def estimate(self, prompt_ids: list[str]) -> PassRates:
        """The posteriors of ``prompt_ids`` (P strings) from the history as it stands."""
        p0 = np.clip(self.priors(prompt_ids), _EDGE, 1 - _EDGE)  # a Beta needs alpha, beta > 0
        sn = np.array([self._sn(k) for k in prompt_ids], dtype=np.float64).reshape(-1, 2)
        s, n = sn[:, 0], sn[:, 1]
        return PassRates(self.m * p0 + s, self.m * (1 - p0) + n - s, p0, n)


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
