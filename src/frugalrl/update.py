"""The optimizer steps of one rollout batch: filtering, micro-batched losses, AdamW.

The loss math lives in ``losses.py``: the terms of ``losses.build_terms`` (the policy loss
``algo.loss``, and the KL penalty and entropy bonus when on) say what they need, and this module
provides it without knowing which method runs: it decides which samples get a forward pass,
keeps the frozen reference when a term needs it, and accumulates gradients so that an update
does not depend on the micro-batch size. One ``Learner.update``:

1. picks the samples that get a forward pass (DASH gradient filtering, *before* the pass);
2. when needed, makes one no-grad pass over them for the constants of the update: the
   sampling policy's log-probs (off-policy updates, the KL reward), the reference's, and whatever
   a term derives from the pass (PPO: the critic's values, and from them GAE advantages);
3. makes ``train.ppo_epochs`` passes over the batch, each split into ``train.mini_batches``
   optimizer steps, each accumulated over micro-batches of ``train.micro_batch`` sequences. A
   step's loss normaliser comes from its whole mini-batch, dropped samples included, never from
   a micro-batch (see ``losses.py``).

With one epoch and one mini-batch (the default) the update is on-policy: the PPO ratio is 1,
the clip never acts, and no old log-probs are computed for it (the reported loss is then ~0 by
construction; watch the reward). More than one optimizer step per batch is PPO proper: every
step after the first is off-policy and the clip bounds it, as DASH does.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from dataclasses import replace

import torch
from torch import Tensor

from frugalrl import lora, sharding
from frugalrl.config import Config
from frugalrl.distributed import Dist
from frugalrl.losses import LossInputs, LossNorm, build_terms
from frugalrl.profiling import phase
from frugalrl.rollout import Rollout, eval_mode, forward_completions, packing_cost, prompt_groups, tokens_fed


def optimizer_steps(cfg: Config) -> int:
    """Optimizer steps per rollout batch: ``train.ppo_epochs`` x ``train.mini_batches``."""
    return cfg.train.ppo_epochs * cfg.train.mini_batches


def reference_policy(model):
    """The frozen reference policy pi_ref, built from ``model``'s current (starting) weights.

    With LoRA, ``model`` itself with its adapter disabled, which needs no copy; otherwise a copy
    of the weights, in eval mode, without grad.
    """
    if lora.is_lora(model):
        return lora.AdapterDisabled(model)
    if sharding.is_sharded(model):  # train.strategy=fsdp: a copy sharded the same way
        return sharding.frozen_copy(model)
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def _micro_batches(index: Tensor, size: int) -> tuple[Tensor, ...]:
    """``index`` in chunks of ``size``; none for an empty index (``split`` would give one empty
    chunk, and a forward pass over no rows fails)."""
    return index.split(size) if len(index) else ()


def _lexsort(keys: list[Tensor]) -> Tensor:
    """The stable order that sorts by ``keys[-1]``, ties by ``keys[-2]``, and so on."""
    order = torch.arange(len(keys[0]), device=keys[0].device)
    for key in keys:
        order = order[torch.argsort(key[order], stable=True)]
    return order


class Learner:
    """Turns scored rollouts into optimizer steps of ``model`` (and of what a loss term trains,
    such as PPO's critic).

    Holds what the steps need besides the policy and its optimizer: the loss terms
    (``self.terms``; ``self.loss`` is the policy loss, the first) and the frozen reference, built
    only when a term needs it.

    ``scheduler``, when given, is the policy's learning-rate schedule; it advances once per
    optimizer step of the update, ``optimizer_steps(cfg)`` per rollout batch, including the
    steps skipped because every sample of their mini-batch was filtered out or the gradient was
    not finite: the schedule's place is then a function of the rollout batches done, the same on
    every rank and after a resume, and the cosine decay ends with the run.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, cfg: Config, dist: Dist | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
        self.model, self.optimizer, self.scheduler, self.cfg = model, optimizer, scheduler, cfg
        self.dist = dist or Dist()
        # train.strategy=fsdp: every forward and backward pass of the policy (and reference) is a
        # collective, so every rank makes as many as the rank with the most (``_passes``)
        self.sharded = sharding.is_sharded(model)
        self.terms = build_terms(cfg, model)
        self.loss = self.terms[0]
        self.reference = reference_policy(model) if self._any("needs_reference") else None
        self.need_old = self._any("needs_old_logprobs")
        # what attention costs the policy where it may run packed rows (None: whole rows)
        self.packing = packing_cost(model) if cfg.train.share_prompts else None
        # what ``_loss`` reports, fixed up front: ranks sum them even when one had no sample
        self.metric_names = list(dict.fromkeys(name for term in self.terms for name in term.metric_names))

    def _forward(self, model, part: Rollout, **outputs):
        """``forward_completions`` of ``model`` over ``part`` at the sampling temperature, packed (each
        shared prompt run once) where ``train.share_prompts`` asks and that costs less."""
        return forward_completions(model, part, self.cfg.rollout.temperature, packing=self.packing, **outputs)

    def _any(self, need: str) -> bool:
        return any(getattr(term, need) for term in self.terms)

    def state_dict(self) -> dict:
        """What the loss terms train besides the policy (PPO's critic and its optimizer: tensors,
        for ``torch.save``); {} when they train nothing. The reference needs no saving: it is
        rebuilt from the starting weights."""
        return {key: value for term in self.terms for key, value in term.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for term in self.terms:
            term.load_state_dict(state)

    def forward_mask(self, advantages: Tensor) -> Tensor:
        """(N,) bool: the samples that get a forward pass (DASH gradient filtering).

        A sample with |A| <= ``train.filter_threshold`` is dropped before its forward pass (the
        DASH reference code drops it after, saving only the backward). Where every loss term has
        ``zero_advantage_no_gradient`` (the policy gradient) a sample with A = 0 has exactly zero
        gradient, so threshold 0 leaves the update unchanged; it drops the groups of equal rewards
        under the estimators whose ``zero_signal_for_constant_groups`` makes their advantage
        exactly 0, and keeps them under the others, where they carry signal. The A*-PO
        regression, the KL penalty and the entropy bonus still pull on such a sample, so with
        them threshold 0 keeps every sample and only a threshold > 0 filters (an approximation,
        as in DASH). A term that is not ``filterable`` (PPO: per-token advantages from the critic
        after this choice, and a critic that learns from every sample) keeps every sample.
        """
        tau = self.cfg.train.filter_threshold
        if not all(term.filterable for term in self.terms) or (
                tau == 0 and not all(term.zero_advantage_no_gradient for term in self.terms)):
            return torch.ones(advantages.shape[0], dtype=torch.bool, device=advantages.device)
        return advantages.abs() > tau

    def update(self, rollout: Rollout, rewards: Tensor, advantages: Tensor) -> dict:
        """All optimizer steps on one rollout batch; returns the loss and diagnostics.

        rollout: N sequences. rewards: (N,) scalar rewards (PPO's critic learns from them).
        advantages: (N,) from the estimator, reward units (PPO replaces them by per-token GAE).
        Under data parallelism these are this rank's shard of the global batch (``distributed``);
        the steps and the returned figures are those of the global batch.
        Metrics of several optimizer steps are averaged over the steps; ``bad_step`` is then the
        fraction of them skipped for a non-finite loss or gradient.
        """
        t, dist = self.cfg.train, self.dist
        device = next(self.model.parameters()).device  # the rollout may come from elsewhere (vLLM, CPU)
        rollout, rewards, advantages = rollout.to(device), rewards.to(device), advantages.to(device)
        keep = self.forward_mask(advantages)
        mask = rollout.completion_mask
        n, total = len(rollout), len(rollout) * dist.world
        kept, trained, skipped = dist.sum([keep.sum().item(), mask[keep].sum().item(), mask[~keep].sum().item()])
        stats = {"filtered_frac": 1.0 - kept / total,
                 "tokens_trained": int(trained),  # per pass over the batch
                 "tokens_skipped": int(skipped)}
        if not kept:
            self._advance_schedule(optimizer_steps(self.cfg))
            return {**stats, "loss": 0.0, "grad_norm": 0.0, "bad_step": 0.0}
        # Every epoch's order over the global batch, drawn before any forward pass so that all
        # ranks draw it alike. CleanRL's order: a fresh shuffle per epoch, so mini-batches differ
        # between epochs.
        orders = [torch.randperm(total) if t.mini_batches > 1 else torch.arange(total) for _ in range(t.ppo_epochs)]
        with phase("constants"):
            const, sums = self._constants(rollout, rewards, advantages, keep)
        if sums:  # a collective only where a term reports one
            stats.update({key: value / total for key, value in zip(sums, dist.sum(list(sums.values())))})
        offset = dist.rank * n
        steps = []
        for order in orders:
            # tensor_split, not chunk: exactly mini_batches steps, which chunk does not promise
            for part in order.to(device).tensor_split(t.mini_batches):
                mine = part[(part >= offset) & (part < offset + n)] - offset  # this rank's samples of it
                # The first step runs at the weights that sampled the batch, so its ratio pi / pi_old
                # is 1: built from the step's own log-probs (as on-policy), it is exactly 1, where a
                # second forward pass would differ by dropout in the training pass and by round-off.
                steps.append(self._step(rollout, const if steps else replace(const, old_logprobs=None), mine, keep))
                self._advance_schedule(1)
        totals: dict[str, float] = defaultdict(float)
        for step in steps:
            for key, value in step.items():
                totals[key] += value / len(steps)
        return {**stats, **totals}

    @torch.no_grad()
    def _constants(self, rollout: Rollout, rewards: Tensor, advantages: Tensor,
                   keep: Tensor) -> tuple[LossInputs, dict[str, float]]:
        """One no-grad pass over the kept samples for what the update holds fixed, every model in
        eval mode: the sampling policy's log-probs are those of the model as it sampled, without
        dropout, and so are the reference's and what the loss terms read (``LossTerm.observe``).
        Also returns the terms' sums over this rank's samples (``LossTerm.finish``)."""
        mask = rollout.completion_mask
        const = LossInputs(advantages)
        hidden = self._any("needs_hidden")
        if self.need_old:
            const.old_logprobs = torch.zeros_like(mask)
        if self.reference is not None:
            const.ref_logprobs = torch.zeros_like(mask)
        for term in self.terms:
            term.begin(const, mask)
        for index in self._passes(keep.nonzero().flatten(), rollout):
            dummy = index is None  # its outputs are dropped (``_passes``)
            part = rollout.select([0] if dummy else index).trimmed()
            width = part.completion_mask.shape[1]
            if self.need_old or hidden:
                with eval_mode(self.model):
                    out = self._forward(self.model, part, hidden=hidden)
                if not dummy:
                    if self.need_old:
                        const.old_logprobs[index, :width] = out.logprobs
                    for term in self.terms:
                        term.observe(const, index, out, part.completion_mask)
            if self.reference is not None:
                ref = self._forward(self.reference, part).logprobs
                if not dummy:
                    const.ref_logprobs[index, :width] = ref
        sums = {key: value for term in self.terms for key, value in term.finish(const, rewards, mask).items()}
        return const, sums

    def _step(self, rollout: Rollout, const: LossInputs, index: Tensor, keep: Tensor) -> dict[str, float]:
        """One optimizer step on the mini-batch ``index`` (dropped samples included: they count
        in the normaliser, as in the unfiltered update, but get no forward pass)."""
        cfg, dist = self.cfg, self.dist
        local = LossNorm.from_mask(rollout.completion_mask[index], cfg.algo.loss_agg)
        num_seqs, num_tokens = dist.sum([local.num_seqs, local.num_tokens])
        # Dr. GRPO's length normaliser is the generation budget, a constant: the batch's longest
        # completion would let one long answer shrink every other sample's gradient
        norm = LossNorm(local.mode, int(num_seqs), int(num_tokens), cfg.rollout.max_new_tokens)
        index = index[keep[index]]
        others = [pair for term in self.terms for pair in term.optimizers()]
        for optimizer in [self.optimizer, *(opt for _, opt in others)]:
            optimizer.zero_grad(set_to_none=True)
        totals = dict.fromkeys(self.metric_names, 0.0)
        for micro in self._passes(index, rollout):
            if micro is None:  # a pass with zero loss, for FSDP's collectives (``_passes``)
                self._forward(self.model, rollout.select([0]).trimmed()).logprobs.sum().mul(0.0).backward()
                continue
            part = rollout.select(micro).trimmed()
            with phase("forward"):
                out = self._forward(self.model, part, entropy=self._any("needs_entropy"),
                                    hidden=self._any("needs_hidden"))
                loss, metrics = self._loss(out, part.completion_mask,
                                           const.select(micro, part.completion_mask.shape[1]), norm)
            with phase("backward"):
                loss.backward()
            for key, value in metrics.items():
                totals[key] += value
        # each rank's figures are its share of the mini-batch's: their sums are the step's
        *sums, trained = dist.sum([*totals.values(), len(index)])
        if not trained:  # every sample of this mini-batch was filtered: nothing to learn from
            return {"loss": 0.0, "grad_norm": 0.0, "bad_step": 0.0}
        totals = dict(zip(totals, sums))
        finite_loss = math.isfinite(totals["loss"])
        with phase("optimizer"):
            grad_norm = self._clip_and_step(self.model.parameters(), self.optimizer, finite_loss)
            for params, optimizer in others:
                self._clip_and_step(params, optimizer, finite_loss)
        bad = not (finite_loss and math.isfinite(grad_norm))
        return {**totals, "grad_norm": grad_norm, "bad_step": float(bad)}

    def _clip_and_step(self, params, optimizer, finite_loss: bool = True) -> float:
        """Sum the gradient over ranks, clip its norm and step. A non-finite loss or gradient
        skips the step and drops the gradient, so that one bad batch cannot poison the weights
        (the trainer stops after ``train.max_bad_steps`` such steps in a row)."""
        params = list(params)
        if not any(hasattr(p, "to_local") for p in params):  # sharded (DTensor) ones are summed in backward
            self.dist.sum_grads(params)
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = sharding.clip_grad_norm(params, max_norm)  # of all ranks' shards together
        if finite_loss and math.isfinite(grad_norm):
            optimizer.step()
        # dropped either way: the next step starts from none, and kept they would add their size
        # to the next rollout's peak memory
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _passes(self, index: Tensor, rollout: Rollout) -> list[Tensor | None]:
        """The micro-batches of ``index`` (``train.micro_batch`` samples each), then, under
        train.strategy=fsdp, as many ``None`` as this rank has fewer than the rank with the most.

        The samples are taken in order of length, so that each micro-batch, trimmed to its longest
        sequence, carries little padding: in order of prompt+completion length, or, where rows may
        run packed (``self.packing``), in order of prompt length, then prompt, then completion
        length where that costs less (``rollout.tokens_fed``): it keeps a group's samples
        together, so that their prompt runs once. The sum of the gradients is the same in any
        order, up to round-off.

        FSDP gathers each layer's weights in every forward pass and reduce-scatters its
        gradients in every backward: collectives that every rank must join. After filtering
        the ranks keep different numbers of samples, so a rank with fewer micro-batches makes
        dummy passes (a sample of its rollout, zero loss, outputs dropped) to match.
        """
        packing, size = self.packing, self.cfg.train.micro_batch
        prompt, completion = rollout.prompt_mask.sum(1)[index], rollout.completion_mask.sum(1)[index]
        orders = [[prompt + completion]]
        if packing is not None:
            orders.append([completion, prompt_groups(rollout)[1][index], prompt])  # the last key is the primary
        splits = [_micro_batches(index[_lexsort(keys)], size) for keys in orders]
        # the cheaper order, where there are two to choose from
        batches = list(splits[0] if len(splits) == 1 else min(
            splits, key=lambda split: sum(tokens_fed(rollout.select(b).trimmed(), packing) for b in split)))
        if not self.sharded:
            return batches
        most = int(self.dist.max([len(batches)])[0])
        return batches + [None] * (most - len(batches))

    def _advance_schedule(self, steps: int) -> None:
        """Move the learning-rate schedule on by ``steps`` optimizer steps, taken or skipped."""
        if self.scheduler is None:
            return
        with warnings.catch_warnings():
            # a skipped step calls no optimizer.step(): torch's warning about that order is noise
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
            for _ in range(steps):
                self.scheduler.step()

    def _loss(self, out, mask: Tensor, const: LossInputs, norm: LossNorm) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's contribution to the step's loss, the sum of the terms', and their
        metrics (contributions too, summed where terms share a name: "loss")."""
        loss, metrics = None, defaultdict(float)
        for term in self.terms:
            part, term_metrics = term(out, mask, const, norm)
            loss = part if loss is None else loss + part
            for key, value in term_metrics.items():
                metrics[key] += value
        return loss, metrics
