"""Losses: pure functions of tensors, written so that micro-batching cannot change them.

Token-level tensors are (N, T): N sequences, T completion positions, right-padded. ``mask``
(N, T, bool or 0/1 float) marks the completion tokens that count; everything else is ignored
(values there may be anything, even inf).

Micro-batching. A rollout batch is usually back-propagated in several micro-batches with one
optimizer step (gradient accumulation). Normalising each micro-batch's loss by its *own*
token or sequence count makes the result depend on how the batch was split — a frequent bug.
Here the normaliser is a ``LossNorm`` computed once from the full rollout batch's mask, and
every loss function returns the micro-batch's *contribution* to the full-batch loss::

    norm = LossNorm.from_mask(batch_mask, "seq-mean-token-sum")
    for mb in micro_batches:                        # any split, any padding width per mb
        loss, _ = policy_loss(lp[mb], None, adv[mb], mask[mb], norm)
        loss.backward()                             # sum of contributions == full-batch loss

so the summed loss and the accumulated gradient are those of the full batch, exactly.

Registered losses. The functions above are the formulas; below them, each *policy loss* of the
configuration (``algo.loss``: ``pg``, ``astar``, ``ppo``) is a small registered class that says
what the update must compute for it (the sampling policy's log-probs, the reference's, hidden
states) and turns one micro-batch's forward pass into its contribution to the loss, like the
estimators of ``advantages.py``. The KL penalty and the entropy bonus are terms of the same
kind, added when their coefficients are > 0. ``update.Learner`` sums the terms of
``build_terms(cfg, model)`` and never asks which ones they are: a new method is one new class
here, registered with ``@register_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from frugalrl.critic import ValueHead, outcome_token_rewards

if TYPE_CHECKING:
    from frugalrl.config import Config

__all__ = [
    "AGG_MODES",
    "LossInputs",
    "LossNorm",
    "LossTerm",
    "TokenOutputs",
    "aggregate",
    "astar_loss",
    "build_terms",
    "gae",
    "kl_penalty",
    "kl_reward",
    "list_losses",
    "policy_loss",
    "register_loss",
    "value_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# exp() of a log-ratio beyond this overflows float32/bf16 on its way to the loss; a ratio of
# e^20 is far outside any clip range, so clamping changes nothing a healthy run would see.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class LossNorm:
    """How token values become one number, with the normalisers of the FULL rollout batch.

    mode: one of ``AGG_MODES``:
      token-mean               sum of all token values / num_tokens (every token weighs the same)
      seq-mean-token-mean      mean over sequences of each sequence's token mean (GRPO's original)
      seq-mean-token-sum       mean over sequences of each sequence's token sum
      seq-mean-token-sum-norm  seq-mean-token-sum / max_len (Dr. GRPO: a constant length
                               normaliser, so long and short answers are not re-weighted)
    num_seqs: sequences in the rollout batch. num_tokens: completion tokens in it.
    max_len: the length normaliser of seq-mean-token-sum-norm, in tokens; for Dr. GRPO a
    constant, the generation budget (the Learner passes ``rollout.max_new_tokens``).
    """

    mode: str
    num_seqs: int
    num_tokens: int
    max_len: int

    def __post_init__(self):
        if self.mode not in AGG_MODES:
            raise ValueError(f"unknown loss aggregation mode {self.mode!r}; choose one of {list(AGG_MODES)}")
        if min(self.num_seqs, self.num_tokens, self.max_len) < 0:
            raise ValueError(f"LossNorm counts must be >= 0, got {self}")

    @classmethod
    def from_mask(cls, mask: Tensor, mode: str, max_len: int | None = None) -> LossNorm:
        """Normalisers of a rollout batch from its full (N, T) completion mask.

        Call it once per rollout batch, before splitting into micro-batches. ``max_len``
        defaults to the longest completion in the batch; pass the generation budget
        (max_new_tokens) to get Dr. GRPO's normaliser, which stays constant across steps.
        """
        if mask.ndim != 2:
            raise ValueError(f"mask must be (N, T), got shape {tuple(mask.shape)}")
        lengths = mask.bool().sum(dim=-1)
        longest = int(lengths.max()) if lengths.numel() else 0
        return cls(mode=mode, num_seqs=mask.shape[0], num_tokens=int(lengths.sum()),
                   max_len=longest if max_len is None else int(max_len))


def aggregate(token_values: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    """Scalar: this micro-batch's contribution to the full-batch aggregate of ``token_values``.

    token_values, mask: (n, t) for the micro-batch's n sequences (t may be its own padded width).
    Summing the results over the micro-batches of a rollout batch gives the full-batch
    aggregate. Masked positions contribute exactly 0 (``where``, not multiply, so inf/NaN in
    padding cannot leak). An empty batch aggregates to 0, not NaN.
    """
    if token_values.shape != mask.shape:
        raise ValueError(f"token_values {tuple(token_values.shape)} and mask {tuple(mask.shape)} must have one shape")
    keep = mask.bool()
    masked = torch.where(keep, token_values, 0.0)
    num_seqs = max(norm.num_seqs, 1)
    if norm.mode == "token-mean":
        return masked.sum() / max(norm.num_tokens, 1)
    if norm.mode == "seq-mean-token-mean":
        # a sequence's token count is local to it (it lives in one micro-batch), so it may be
        # taken from the micro-batch; only the mean over sequences needs the batch total
        seq_means = masked.sum(dim=-1) / keep.sum(dim=-1).clamp(min=1)
        return seq_means.sum() / num_seqs
    if norm.mode == "seq-mean-token-sum":
        return masked.sum() / num_seqs
    # seq-mean-token-sum-norm. verl sums over sequences here (no 1/num_seqs); we take the mean
    # that the mode's name promises, so the loss scale does not grow with the batch size.
    return masked.sum() / (num_seqs * max(norm.max_len, 1))


def _log_ratio(logprobs: Tensor, other_logprobs: Tensor) -> Tensor:
    return (logprobs - other_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def policy_loss(logprobs: Tensor, old_logprobs: Tensor | None, advantages: Tensor, mask: Tensor,
                norm: LossNorm, clip_low: float = 0.2, clip_high: float = 0.2) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip policy-gradient loss; the micro-batch's contribution to the full-batch loss.

    Per token: ``-min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)`` with
    ``rho = exp(logprobs - old_logprobs)``, aggregated by ``norm``.

    logprobs: (n, t) token log-probs under the current policy (with grad).
    old_logprobs: (n, t) under the policy that sampled the batch, or None.
    advantages: (n,) per sequence (broadcast over tokens) or (n, t) per token (GAE).

    Why the loss is "~0": with one optimizer step per rollout batch (the default), the
    sampling policy *is* the current policy, so rho == 1 in value and the clip never acts.
    The loss value is then just ``aggregate(-A)``, a constant that is near 0 because
    advantages are centred, and says nothing about progress; its gradient is the plain policy
    gradient ``-A * grad log pi``. ``old_logprobs=None`` builds that ratio directly as
    ``exp(lp - lp.detach())`` and saves a forward pass. The clip matters only for off-policy
    updates (several optimizer steps per batch), where old_logprobs must be given.

    metrics (detached floats, also contributions: sum them over micro-batches):
      pg_clipfrac: fraction of the batch's tokens where the clipped branch was taken.
      ppo_kl: token-mean of log(pi_old / pi), an estimate of KL(old || current).
    """
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.detach()
    reference = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    log_ratio = _log_ratio(logprobs, reference)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, norm)

    keep = mask.bool()
    num_tokens = max(norm.num_tokens, 1)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": float(((clipped > unclipped) & keep).sum()) / num_tokens,
            "ppo_kl": float(torch.where(keep, -log_ratio, 0.0).sum()) / num_tokens,
        }
    return loss, metrics


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k2") -> Tensor:
    """(n, t) per-token KL loss against the reference, on tokens sampled from pi (Schulman's k2, k3).

    With r = pi_ref / pi at the sampled token, the reference held constant:

    k2 = (log r)^2 / 2. Its gradient, -log r * grad log pi, has expectation grad KL(pi || pi_ref):
        the penalty the RL objective means. As a value it is biased (it is second order in log r).
    k3 = r - 1 - log r (GRPO's). As a value an unbiased, >= 0 estimate of KL(pi || pi_ref), but its
        gradient, (1 - r) grad log pi, has expectation grad KL(pi_ref || pi): the other direction is
        what it optimises. Near pi_ref the two divergences agree to second order; they part as pi
        moves away (KL(pi_ref || pi) punishes pi for dropping what pi_ref samples, not for adding).

    Expectations are per position, over the token drawn there with its prefix held fixed: a
    sequence's KL also changes through which prefixes are drawn, which only a reward sees
    (``kl_reward``). k1 = -log r is no loss: its gradient, grad log pi, has expectation 0.
    Aggregate it with ``aggregate`` and add ``coef`` times that to the loss.
    """
    log_ratio = _log_ratio(logprobs, ref_logprobs.detach())  # log pi - log pi_ref = -log r
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL loss {kind!r}; choose 'k2' or 'k3' (k1 belongs in the reward: kl_reward)")


@torch.no_grad()
def kl_reward(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, coef: float) -> Tensor:
    """(N, T) per-token reward -coef * k1 = -coef * log(pi / pi_ref), 0 where masked: the KL penalty
    in the reward, where PPO-RLHF puts it (Ziegler et al. 2019, arXiv 1909.08593).

    logprobs: (N, T) token log-probs of the policy that sampled the tokens; ref_logprobs: (N, T) the
    reference's. In the reward the policy gradient does the differentiating: with the returns to
    go R_t = sum_{s >= t} of these rewards, E[sum_t R_t grad log pi(y_t)] = -coef grad KL(pi || pi_ref)
    of whole sequences, including the part that flows through which prefixes are drawn, which the
    per-token losses of ``kl_penalty`` miss. A constant.
    """
    return torch.where(mask.bool(), -coef * _log_ratio(logprobs, ref_logprobs), 0.0)


def astar_loss(seq_logprobs: Tensor, ref_seq_logprobs: Tensor, advantages: Tensor,
               beta2: float, num_seqs_total: int) -> Tensor:
    """A*-PO least-squares loss; the micro-batch's contribution to the full-batch mean.

    Per sequence: ``( beta2 * [log pi(y|x) - log pi_ref(y|x)] - (r - V*(x)) )^2``, summed and
    divided by ``num_seqs_total`` (sequences in the whole rollout batch), so micro-batch
    contributions add up to the mean over the batch.

    seq_logprobs: (n,) log pi(y|x), the sum of token log-probs of each completion (with grad).
    ref_seq_logprobs: (n,) the same under the reference policy (constant).
    advantages: (n,) r - V*(x), in reward units (constant).
    beta2: the KL-regularisation scale (1e-3 in the paper).

    Unlike the PPO loss there is no ratio to the sampling policy and no clip: the regression
    target r - V* makes the update on-policy-free, which is what allows one sample per prompt.
    """
    if not seq_logprobs.shape == ref_seq_logprobs.shape == advantages.shape or seq_logprobs.ndim != 1:
        raise ValueError(f"seq_logprobs {tuple(seq_logprobs.shape)}, ref_seq_logprobs "
                         f"{tuple(ref_seq_logprobs.shape)} and advantages {tuple(advantages.shape)} "
                         f"must all be (n,): sum token log-probs per sequence first")
    residual = beta2 * (seq_logprobs - ref_seq_logprobs.detach()) - advantages.detach()
    return residual.square().sum() / max(num_seqs_total, 1)


@torch.no_grad()
def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over completion tokens.

    token_rewards: (N, T) reward received after each token (for outcome rewards: the score on
    the last completion token, 0 elsewhere). values: (N, T) critic predictions V(s_t).
    Returns (advantages (N, T), returns (N, T) = advantages + values), both 0 where mask is 0.
    Not whitened; constants, no gradient.

    Masked positions are skipped: the next value and the running advantage carry through
    them, so a right-padded sequence ends at its last completion token (value 0 after it),
    and tokens masked in the middle (e.g. tool output) are stepped over rather than
    bootstrapped from. With gamma = lam = 1, A_t = sum_{k >= t} r_k - V(s_t).
    """
    if not token_rewards.shape == values.shape == mask.shape or mask.ndim != 2:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and "
                         f"mask {tuple(mask.shape)} must all be (N, T)")
    keep = mask.bool()
    rewards = torch.where(keep, token_rewards, 0.0)
    values = torch.where(keep, values, 0.0)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step_adv = delta + gamma * lam * running
        running = torch.where(keep[:, t], step_adv, running)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(keep[:, t], step_adv, 0.0)
    return advantages, advantages + values


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, norm: LossNorm,
               clip: float = 0.2) -> Tensor:
    """PPO clipped value loss; the micro-batch's contribution to the full-batch loss.

    Per token ``0.5 * max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = V_old + clamp(V - V_old, -clip, clip)``: the critic is not rewarded for moving
    further than ``clip`` (in reward units) from its old prediction in one update.
    values: (n, t) with grad; old_values, returns: (n, t) constants.
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_token = 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())
    return aggregate(per_token, mask, norm)


# ---------------------------------------------------------------------------------------------
# Registered loss terms
# ---------------------------------------------------------------------------------------------

@dataclass
class TokenOutputs:
    """A training forward pass over N completions (``rollout.forward_completions`` makes it); (N, T)
    tensors, 0 where masked. With ``LossInputs``, all a loss term reads.

    logprobs: log pi(y_t | x, y_<t) of each completion token, at the sampling temperature.
    entropy: entropy (nats) of that tempered next-token distribution; None unless asked for.
    hidden: (N, T, H) last-layer hidden state that token t was predicted from, i.e. the state
        s_t before the token (a critic reads V(s_t) off it); None unless asked for.
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    hidden: Tensor | None = None


@dataclass
class LossInputs:
    """What an update holds fixed, for N sequences and T completion positions.

    advantages: (N,) per sequence from the estimator, or (N, T) per token (PPO's GAE); reward units.
    old_logprobs: (N, T) the sampling policy's token log-probs (off-policy steps), else None.
    ref_logprobs: (N, T) the reference policy's token log-probs, else None.
    old_values, returns: (N, T) PPO's critic values before the update and its GAE returns, else None.
    Rows of samples without a forward pass hold 0.
    """

    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    old_values: Tensor | None = None
    returns: Tensor | None = None

    def select(self, index: Tensor, width: int) -> LossInputs:
        """The rows ``index``, cut to the first ``width`` completion positions."""
        def cut(x):
            if x is None:
                return None
            return x[index] if x.ndim == 1 else x[index, :width]
        return LossInputs(*(cut(getattr(self, f.name)) for f in fields(self)))


class LossTerm:
    """One term of the training loss.

    The class attributes say what the update must compute for the term:

    needs_old_logprobs: the sampling policy's log-probs, a no-grad pass each update: set it only
        where they are used (the ratio of off-policy steps; a reward read off them, ``kl_reward``).
    needs_reference: the frozen reference policy's log-probs.
    needs_entropy, needs_hidden: the token entropy / the last hidden states from each forward pass.
    zero_advantage_no_gradient: a sample with A = 0 adds nothing to the gradient, so gradient
        filtering at threshold 0 leaves the update unchanged.
    filterable: samples may skip their forward pass at all (gradient filtering).
    metric_names: the metrics a call returns; "loss" is the term's share of the reported loss.

    ``__call__`` gets one micro-batch: ``out`` (token log-probs (n, t), and entropy/hidden when
    asked), ``mask`` (n, t), ``inputs`` (``LossInputs`` of the micro-batch) and the batch's
    ``LossNorm``, and returns the micro-batch's contribution to the step's loss (a scalar with
    grad) and its metrics (floats, contributions too: the Learner sums them over micro-batches
    and ranks). The hooks below serve terms with weights of their own (PPO's critic).
    """

    needs_old_logprobs = False
    needs_reference = False
    needs_entropy = False
    needs_hidden = False
    zero_advantage_no_gradient = False
    filterable = True
    metric_names: tuple[str, ...] = ("loss",)

    def __call__(self, out: TokenOutputs, mask: Tensor, inputs: LossInputs,
                 norm: LossNorm) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def begin(self, inputs: LossInputs, mask: Tensor) -> None:
        """Before the update's no-grad pass over the batch (mask: (N, T))."""

    def observe(self, inputs: LossInputs, index: Tensor, out: TokenOutputs, mask: Tensor) -> None:
        """One micro-batch of that pass: rows ``index``, their outputs and (n, t) mask."""

    def finish(self, inputs: LossInputs, rewards: Tensor, mask: Tensor) -> dict[str, float]:
        """After that pass (rewards: (N,)); returns sums over the batch's samples that the Learner
        sums over ranks and reports per sample."""
        return {}

    def optimizers(self) -> list[tuple[list[torch.nn.Parameter], torch.optim.Optimizer]]:
        """(parameters, optimizer) pairs the term trains besides the policy; each optimizer step."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_LOSSES: dict[str, type[LossTerm]] = {}


def register_loss(name: str):
    """Class decorator: make a ``LossTerm`` subclass the policy loss ``algo.loss=name``. The class
    is built as ``cls(cfg, model)``."""

    def decorate(cls: type[LossTerm]) -> type[LossTerm]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = cls
        return cls

    return decorate


def list_losses() -> list[str]:
    """Names of the registered policy losses, sorted."""
    return sorted(_LOSSES)


def _token_mean(values: Tensor, mask: Tensor, norm: LossNorm) -> float:
    """The micro-batch's contribution to the batch's token mean of ``values`` (a metric)."""
    return float(torch.where(mask.bool(), values.detach(), 0.0).sum()) / max(norm.num_tokens, 1)


@register_loss("pg")
class PolicyGradient(LossTerm):
    """Policy gradient with the PPO clip (``policy_loss``); advantages (n,) or (n, t).

    With one optimizer step per rollout batch the ratio is 1 and this is plain REINFORCE-style
    policy gradient; its clip fraction and KL to the sampler are then 0 and not reported.
    ``algo.kl_estimator=k1_reward`` puts the KL penalty in the reward (``kl_reward``): after the
    no-grad pass each token's advantage becomes the estimator's plus the KL reward still to come
    in its sequence (a GAE with a zero critic), so the advantages are per token from then on.
    """

    zero_advantage_no_gradient = True

    def __init__(self, cfg: Config, model=None):
        self.clip = (cfg.algo.clip_low, cfg.algo.clip_high)
        self.off_policy = cfg.train.ppo_epochs * cfg.train.mini_batches > 1
        self.kl_coef = cfg.algo.kl_coef if cfg.algo.kl_estimator == "k1_reward" else 0.0
        self.needs_old_logprobs = self.off_policy or self.kl_coef > 0
        self.needs_reference = self.kl_coef > 0
        self.zero_advantage_no_gradient = not self.kl_coef  # the KL reward pulls on samples of advantage 0 too
        self.metric_names = (("loss", "pg_clipfrac", "ppo_kl") if self.off_policy else ("loss",)) + (
            ("kl_ref",) if self.needs_reference else ())

    def kl_rewards(self, inputs: LossInputs, mask: Tensor) -> Tensor:
        """(N, T) the KL penalty of each sampled token as a reward (``kl_reward``)."""
        return kl_reward(inputs.old_logprobs, inputs.ref_logprobs, mask, self.kl_coef)

    def finish(self, inputs, rewards, mask):
        if self.kl_coef:
            kl = self.kl_rewards(inputs, mask)
            to_go, _ = gae(kl, torch.zeros_like(kl), mask)
            inputs.advantages = inputs.advantages.unsqueeze(-1) + to_go
        return {}

    def __call__(self, out, mask, inputs, norm):
        loss, metrics = policy_loss(out.logprobs, inputs.old_logprobs, inputs.advantages, mask, norm, *self.clip)
        metrics = {"loss": loss.item(), **(metrics if self.off_policy else {})}
        if self.kl_coef:
            metrics["kl_ref"] = _kl_metric(out, mask, inputs, norm)
        return loss, metrics


@register_loss("astar")
class AStarRegression(LossTerm):
    """A*-PO's least squares (``astar_loss``) on sequence log-probs: (n, t) summed over t.

    Departs from pg: no ratio to the sampling policy and no clip; the target r - V* ties each
    sample to the reference, so an A = 0 sample still has a gradient (it is not filtered at 0).
    """

    needs_reference = True

    def __init__(self, cfg: Config, model=None):
        self.beta2 = cfg.algo.astar_beta2

    def __call__(self, out, mask, inputs, norm):
        loss = astar_loss(out.logprobs.sum(-1), inputs.ref_logprobs.sum(-1), inputs.advantages, self.beta2,
                          norm.num_seqs)
        return loss, {"loss": loss.item()}


@register_loss("ppo")
class PPO(PolicyGradient):
    """pg on per-token GAE advantages from a learned critic (``critic.ValueHead``), plus the
    critic's clipped value loss (``value_loss``).

    Departs from pg: the estimator's advantages are replaced, after the no-grad pass, by
    ``gae`` over the critic's values (N, T); the critic learns from every sample, so nothing is
    filtered. The value loss reaches only the critic (its input is detached) and is reported
    as ``value_loss``, apart from ``loss``.
    """

    needs_hidden = True
    filterable = False

    def __init__(self, cfg: Config, model):
        super().__init__(cfg)
        self.metric_names = (*self.metric_names, "value_loss")
        self.gamma, self.lam, self.value_clip = cfg.algo.gae_gamma, cfg.algo.gae_lambda, cfg.algo.value_clip
        self.critic = ValueHead(model.config.hidden_size).to(next(model.parameters()).device)
        self.optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.train.critic_lr)

    def begin(self, inputs, mask):
        inputs.old_values = torch.zeros_like(mask)

    def observe(self, inputs, index, out, mask):
        inputs.old_values[index, :mask.shape[1]] = torch.where(mask.bool(), self.critic(out.hidden), 0.0)

    def finish(self, inputs, rewards, mask):
        token_rewards = outcome_token_rewards(rewards, mask)
        if self.kl_coef:  # PPO-RLHF: the critic learns the returns with the KL penalty in them
            token_rewards = token_rewards + self.kl_rewards(inputs, mask)
        inputs.advantages, inputs.returns = gae(token_rewards, inputs.old_values, mask, self.gamma, self.lam)
        return {"value_mean": inputs.old_values[:, 0].sum().item()}  # V(s_0): the critic's value of the prompts

    def __call__(self, out, mask, inputs, norm):
        loss, metrics = super().__call__(out, mask, inputs, norm)
        v_loss = value_loss(self.critic(out.hidden), inputs.old_values, inputs.returns, mask, norm, self.value_clip)
        return loss + v_loss, {**metrics, "value_loss": v_loss.item()}

    def optimizers(self):
        return [(list(self.critic.parameters()), self.optimizer)]

    def state_dict(self):
        return {"critic": self.critic.state_dict(), "critic_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["critic_optimizer"])


def _kl_metric(out: TokenOutputs, mask: Tensor, inputs: LossInputs, norm: LossNorm) -> float:
    """``kl_ref``: KL(pi || pi_ref) per token, k3's unbiased value whichever term trains with it."""
    return _token_mean(kl_penalty(out.logprobs, inputs.ref_logprobs, "k3"), mask, norm)


class KLPenalty(LossTerm):
    """``algo.kl_coef`` x the per-token KL loss ``algo.kl_estimator`` (k2 or k3, ``kl_penalty``),
    aggregated like the loss."""

    needs_reference = True
    metric_names = ("loss", "kl_ref")

    def __init__(self, cfg: Config):
        self.coef, self.estimator = cfg.algo.kl_coef, cfg.algo.kl_estimator

    def __call__(self, out, mask, inputs, norm):
        term = self.coef * aggregate(kl_penalty(out.logprobs, inputs.ref_logprobs, self.estimator), mask, norm)
        return term, {"loss": term.item(), "kl_ref": _kl_metric(out, mask, inputs, norm)}


class EntropyBonus(LossTerm):
    """Minus ``algo.entropy_coef`` x the token entropy, aggregated like the loss."""

    needs_entropy = True
    metric_names = ("loss", "entropy")

    def __init__(self, cfg: Config):
        self.coef = cfg.algo.entropy_coef

    def __call__(self, out, mask, inputs, norm):
        term = -self.coef * aggregate(out.entropy, mask, norm)
        return term, {"loss": term.item(), "entropy": _token_mean(out.entropy, mask, norm)}


def build_terms(cfg: Config, model) -> list[LossTerm]:
    """The terms of ``cfg``'s loss: the policy loss ``algo.loss`` (``auto``: astar under
    algo.estimator=astar, else pg), then the KL penalty (as a loss; ``k1_reward`` is the policy
    gradient's) and the entropy bonus where their coefficients are > 0. ``model``: the policy (PPO
    sizes its critic from it)."""
    name = cfg.algo.policy_loss
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {list_losses()}")
    terms = [_LOSSES[name](cfg, model)]
    if cfg.algo.kl_coef > 0 and cfg.algo.kl_estimator != "k1_reward":
        terms.append(KLPenalty(cfg))
    if cfg.algo.entropy_coef > 0:
        terms.append(EntropyBonus(cfg))
    return terms
