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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "LossNorm",
    "aggregate",
    "astar_loss",
    "gae",
    "kl_penalty",
    "policy_loss",
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


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """(n, t) per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1 / k3).

    k1 = log pi - log pi_ref: unbiased, high variance, can be negative.
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1: unbiased, low variance, >= 0.
    Aggregate it with ``aggregate`` and add ``coef * kl`` to the loss. The reference is
    treated as constant.
    """
    log_ratio = _log_ratio(logprobs, ref_logprobs.detach())
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1' or 'k3'")


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
