"""Grad bench: what each estimator's baseline does to the policy gradient.

Protocol of ``frugalrl bench grad``, along one real training run probed as ``probe.py``
describes (the value bench's probing: the first ``bench.probes`` held-out prompts; every step,
G fresh samples of each, for every G in ``bench.groups``; KAE's history fed as
``bench.kae_preset`` trains (``kae``) and every step (``kae_every_step``, the upper bound); every
``bench.every`` steps, a checkpoint: V_MC(x) from ``bench.mc_samples`` samples, and each
estimator's output for that step's G samples). The gradient work draws nothing from the shared
random generator, so with the same run config the run and every probe sample are those of
``frugalrl bench value``.

Notation: P probes, N = P x G samples at a checkpoint, s_i = grad log pi(y_i | x_i) the score
of sample i over the trainable parameters (under LoRA, the adapters), log pi the sum of the
completion's token log-probabilities at the sampling temperature (the per-sequence term of the
``seq-mean-token-sum`` aggregation), M Monte Carlo samples per probe.

* Estimators are compared by their baselines: each one's gradient is g = (1/N) sum_i (r_i - b_i) s_i,
  A = r - b with its own baseline b. GRPO's division by the group std and REINFORCE++'s batch
  whitening rescale the advantage rather than centre it: they would change the gradient's
  length, not the baseline's error, so they are left out; GRPO as trained, (r - mean) / (std +
  eps), is one extra row (``grpo_scaled``).
* The headline is the whole error against the true gradient grad J at the best step size
  (below): all of the estimate's error, the cross term included, and not its length, which
  AdamW's update does not see (a constant factor on every gradient leaves it unchanged).
* The whole error at step size 1, E||g - grad J||^2, relative to ||grad J||^2, splits as
  E||g - g_V||^2 (the error the baseline adds) + E||g_V - grad J||^2 (the sampling noise of the
  gradient with V(x) as baseline, the same for every estimator) + 2 E[(g - g_V) . (g_V - grad J)],
  a cross term that is 0 for a baseline unbiased and independent of the sample's own reward,
  but not for a lagging history (KAE's, E[b] != V(x)) or a group or batch mean that holds the
  sample's own reward. Per checkpoint, ||g||^2 - 2 g . grad J + ||grad J||^2 with the unbiased
  estimates below; the cross term is what is left after the other two parts.
* Against the Monte Carlo-baseline gradient g_MC = (1/N) sum_i (r_i - V_MC(x_i)) s_i of the same
  samples: the reward terms cancel, g - g_MC = (1/N) sum_i (V_MC(x_i) - b_i) s_i, one backward
  pass with those per-sample weights. MSE = mean over checkpoints of ||g - g_MC||^2 minus the
  Monte Carlo noise floor: V_MC = V + d with d independent of the probe samples, of variance
  c_x = Var(V_MC(x)) (estimated by s^2(x) / M), so E||g - g_MC||^2 = E||g - g_V||^2 +
  (1/N^2) sum_x c_x ||S_x||^2, S_x the sum of probe x's G scores. The floor is estimated without
  bias by one more backward pass with weights e_x sqrt(c_x) (e_x = +-1 at random per probe):
  E_e ||(1/N) sum_x e_x sqrt(c_x) S_x||^2 = (1/N^2) sum_x c_x ||S_x||^2. Relative MSE: over
  ||grad J||^2. This is the error the baseline adds, with neither the gradient's sampling noise
  nor the cross term in it.
* Against the true gradient grad J = (1/P) sum_x grad V(x) (what every unbiased estimator averages
  to), at the best step size: min over c of E||c g - grad J||^2 / ||grad J||^2 =
  1 - (E[g] . grad J)^2 / (E||g||^2 ||grad J||^2), the estimator's whole error (sampling noise
  and bias included) with its length factored out, so GRPO as trained is compared too. The
  error at step size 1 counts the length: where noise dominates it rewards a shrunk gradient,
  and GRPO's group mean, which holds the sample's own reward, gives exactly (G - 1) / G times
  RLOO's gradient (REINFORCE++'s batch mean (N - 1) / N times REINFORCE's); at the best step
  size those pairs agree.
  grad J is estimated from the Monte Carlo samples: each probe's M samples split in two halves,
  each with its own leave-one-out baseline, give independent unbiased estimates g_A and g_B;
  then g . (g_A + g_B) / 2 estimates E[g] . grad J and g_A . g_B estimates ||grad J||^2, both
  without bias (g is independent of them). Each expectation is a mean over checkpoints (one
  step size for the whole run); n/a where the estimate of E||g||^2 or ||grad J||^2 is not
  positive. The row ``v_mc`` is the gradient g_MC, its ||g_MC||^2 less the Monte Carlo floor (so
  g_V's).
* Intervals (95 %): the checkpoints resampled with replacement, each estimator's figures paired
  with GRPO's by checkpoint (the gradient errors are quadratic in the whole probe batch, so probes
  cannot be resampled without a gradient per probe): ``stats.ratio_ci`` for ratios of
  per-checkpoint means, a bootstrap of the whole figure for the best step size.
* The floor, and g_A and g_B being unbiased, rest on E[s_i] = 0, i.e. on samples drawn from the
  tempered policy whose log-probabilities are differentiated: top_p = 1, the default.
* Cost: per G and checkpoint, one forward and (estimators + 3) backward passes over the N
  samples; per checkpoint, one forward and backward pass over the P x M Monte Carlo samples.
  Memory: that many vectors the size of the trainable parameters (small models, or LoRA).
* Gradients come from ``torch.autograd.grad``: the parameters' ``.grad``, which the optimizer
  reads, is never touched, so probing cannot leak into training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import Tensor

from frugalrl.bench.options import GradOptions
from frugalrl.bench.probe import (ESTIMATORS, EVERY_STEP, RUN_DEFAULTS, Group, Probe, Samples, check_groups,
                                  describe_run, figure, load_probes, mean, plot_by_group, prior_inputs, ratio_line,
                                  ratio_summary, train_probed, trajectory)
from frugalrl.bench.stats import Estimate, bootstrap_ci, ratio_ci
from frugalrl.bench.report import fmt, publish, table
from frugalrl.config import Config
from frugalrl.distributed import private_rng
from frugalrl.rollout import Rollout, forward_completions

TRAIN_DEFAULTS = [*RUN_DEFAULTS, "output_dir=runs/bench-grad"]
GRPO_SCALED = "grpo_scaled"  # GRPO's advantage as trained, std division included
ORACLE = "v_mc"  # V_MC(x) as baseline
_ROWS_MC = {**ESTIMATORS, GRPO_SCALED: "GRPO as trained: (r - mean) / std, a scaling, not a baseline"}
_ROWS_TRUE = {**_ROWS_MC, ORACLE: "V(x) as baseline, Monte Carlo"}


def score_gradients(model, rollouts: list[Rollout], weights: Tensor, temperature: float,
                    micro_batch: int) -> Tensor:
    """(K, D) float32: row k is sum_i weights[k, i] * grad log pi(y_i | x_i).

    rollouts: N sequences, in order across the list. weights: (K, N). The gradient is over the
    trainable parameters, flattened and concatenated (D entries); log pi(y | x) is the sum of
    the completion's token log-probabilities at ``temperature``. One forward pass per
    micro-batch of ``micro_batch`` sequences, then K backward passes through it, with
    ``torch.autograd.grad``: the parameters' ``.grad`` stays as it was.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.zeros(weights.shape[0], sum(p.numel() for p in params), device=params[0].device)
    offset = 0
    for rollout in rollouts:
        for index in torch.arange(len(rollout)).split(micro_batch):
            logp = forward_completions(model, rollout.select(index).trimmed(), temperature).logprobs.sum(-1)
            w = weights[:, offset + index].to(logp)
            for k in range(len(w)):
                grads = torch.autograd.grad(logp @ w[k], params, retain_graph=k < len(w) - 1, allow_unused=True,
                                            materialize_grads=True)
                out[k] += torch.cat([g.flatten() for g in grads])
        offset += len(rollout)
    return out


class GradProbe(Probe):
    """The value bench's probe, plus gradient measures at every checkpoint (see the module doc).

    Per checkpoint, rows by (name, G) (``grpo_scaled`` included; ``v_mc`` in the ``true_*``
    ones): ``mc_err`` ||g - g_MC||^2, ``true_dot`` g . g_J, ``true_sq`` ||g||^2; by G:
    ``mc_floor`` the Monte Carlo floor's one-draw estimate; and ``true_norm`` g_A . g_B.
    """

    def __init__(self, cfg: Config, opts: GradOptions, tokenizer, rows: list[dict], reward_fn, pool: int,
                 embeddings=None):
        super().__init__(cfg, opts, tokenizer, rows, reward_fn, pool, embeddings)
        self.signs = torch.Generator().manual_seed(cfg.seed)  # the floor's random signs, apart from the run's RNG
        self.mc_err: dict[tuple[str, int], list[float]] = {}
        self.true_dot: dict[tuple[str, int], list[float]] = {}
        self.true_sq: dict[tuple[str, int], list[float]] = {}
        self.mc_floor: dict[int, list[float]] = {}
        self.true_norm: list[float] = []

    def _grads(self, model, samples: Samples, weights: Tensor) -> Tensor:
        return score_gradients(model, samples.rollouts, weights, self.cfg.rollout.temperature,
                               self.cfg.train.micro_batch)

    def _half_gradient(self, model, half: Samples) -> Tensor:
        """(D,) unbiased estimate of grad J from ``half`` (P, m), leave-one-out baseline within it."""
        r = half.rewards
        loo = (r.sum(dim=1, keepdim=True) - r) / (r.shape[1] - 1)
        return self._grads(model, half, ((r - loo) / r.numel()).flatten()[None])[0]

    def measure(self, step: int, model, mc: Samples, groups: dict[int, Group]) -> None:
        super().measure(step, model, mc, groups)
        M = mc.rewards.shape[1]
        with private_rng(next(model.parameters()).device):  # a model with dropout draws in its forward pass
            g_a, g_b = (self._half_gradient(model, mc.columns(half)) for half in (slice(0, M // 2), slice(M // 2, M)))
            self.true_norm.append(_dot(g_a, g_b))
            g_true = (g_a + g_b) / 2
            var_v = mc.rewards.var(dim=1) / M  # (P,) estimates of Var(V_MC(x))
            for G, group in groups.items():
                self._measure_group(model, G, group, var_v, g_true)

    def _measure_group(self, model, G: int, group: Group, var_v: Tensor, g_true: Tensor) -> None:
        r = group.samples.rewards.flatten()  # (N,)
        v = self.values[-1].repeat_interleave(G)  # V_MC of each sample's probe
        # per-sample weights w, each row's gradient being (1/N) sum_i w_i s_i
        weights = {name: v - out.baselines for name, out in group.estimates.items()}  # g - g_MC
        if "grpo" in group.estimates:
            weights[GRPO_SCALED] = group.estimates["grpo"].advantages - (r - v)
        weights[ORACLE] = r - v  # g_MC itself
        signs = torch.randint(0, 2, (len(self.rows),), generator=self.signs).double() * 2 - 1
        weights["floor"] = (signs * var_v.sqrt()).repeat_interleave(G)
        grads = dict(zip(weights, self._grads(model, group.samples, torch.stack(list(weights.values())) / len(r))))
        floor = grads.pop("floor")
        self.mc_floor.setdefault(G, []).append(_dot(floor, floor))
        g_mc = grads[ORACLE]
        for name, grad in grads.items():
            g = grad if name == ORACLE else grad + g_mc  # g = (g - g_MC) + g_MC
            if name != ORACLE:
                self.mc_err.setdefault((name, G), []).append(_dot(grad, grad))
            self.true_dot.setdefault((name, G), []).append(_dot(g, g_true))
            self.true_sq.setdefault((name, G), []).append(_dot(g, g))

    def whole(self, name: str, G: int) -> list[float] | None:
        """Per checkpoint, an unbiased estimate of ||g - grad J||^2 = ||g||^2 - 2 g . grad J +
        ||grad J||^2 (for ``v_mc`` less the floor: g_V's); None where there is no such gradient."""
        dots = self.true_dot.get((name, G))
        if not dots:
            return None
        floors = self.mc_floor[G] if name == ORACLE else [0.0] * len(dots)
        return [sq - floor - 2 * dot + norm
                for sq, floor, dot, norm in zip(self.true_sq[(name, G)], floors, dots, self.true_norm)]

    def baseline_err(self, name: str, G: int) -> list[float] | None:
        """Per checkpoint, ||g - g_MC||^2 less the floor, which estimates E||g - g_V||^2: the error
        the baseline adds; None where there is no baseline."""
        errs = self.mc_err.get((name, G))
        return None if not errs else [err - floor for err, floor in zip(errs, self.mc_floor[G])]

    def cross(self, name: str, G: int) -> list[float] | None:
        """Per checkpoint, 2 (g - g_V) . (g_V - grad J): the whole error less the baseline's and
        g_V's own; None where there is no baseline."""
        whole, err = self.whole(name, G), self.baseline_err(name, G)
        if whole is None or err is None:
            return None
        return [w - e - v for w, e, v in zip(whole, err, self.whole(ORACLE, G))]

    def relative(self, per_checkpoint: list[float] | None) -> float | None:
        """The mean of a per-checkpoint measure over ||grad J||^2; None where there is no measure
        or the estimate of ||grad J||^2 is not positive."""
        norm = mean(self.true_norm)
        return None if per_checkpoint is None or norm <= 0 else mean(per_checkpoint) / norm

    def true_relative(self, name: str, G: int, pick: np.ndarray | None = None) -> float | None:
        """min over c of E||c g - grad J||^2 / ||grad J||^2, the expectations over the checkpoints
        ``pick`` (indices, repeats allowed; default all); None where there is no such gradient or
        the estimate of E||g||^2 or of ||grad J||^2 is not positive."""
        dots = self.true_dot.get((name, G))
        if not dots:
            return None
        pick = np.arange(len(dots)) if pick is None else pick

        def over(values: list[float]) -> float:
            return float(np.asarray(values)[pick].mean())

        sq = over(self.true_sq[(name, G)]) - (over(self.mc_floor[G]) if name == ORACLE else 0.0)
        norm = over(self.true_norm)
        return 1.0 - over(dots) ** 2 / (sq * norm) if sq > 0 and norm > 0 else None


def _dot(a: Tensor, b: Tensor) -> float:
    return torch.dot(a.double(), b.double()).item()


def _quotient(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


# summary key prefix: (GradProbe measure, estimator it is divided by, what the page calls the ratio)
_HEADLINES = {
    "grad_total_mse_ratio_kae_vs_grpo": ("true_relative", "grpo", "kae / grpo, whole error at the best step size"),
    "grad_total_mse_ratio_kae_vs_grpo_scaled": (
        "true_relative", GRPO_SCALED, "kae / GRPO as trained (grpo_scaled), whole error at the best step size"),
    "grad_whole_mse_ratio_kae_vs_grpo": ("whole", "grpo", "kae / grpo, whole error E‖g − ∇J‖² at step size 1"),
    "grad_mse_ratio_kae_vs_grpo": (
        "baseline_err", "grpo", "kae / grpo, the error the baseline adds E‖g − g_V‖² (no cross term)"),
}
HEADLINE = "grad_total_mse_ratio_kae_vs_grpo"


def measure_ratio(probe: GradProbe, measure: str, name: str, against: str, G: int) -> Estimate | None:
    """``measure`` of ``name`` over ``against``'s at G, with a 95 % interval from resampling the
    checkpoints (the two paired by checkpoint); None where either has no value or the
    denominator is 0. Per-checkpoint measures are a ratio of means (``ratio_ci``); the best-step
    error (``true_relative``) is not, and is bootstrapped whole."""
    if measure == "true_relative":
        return bootstrap_ci(lambda pick: _quotient(probe.true_relative(name, G, pick),
                                                   probe.true_relative(against, G, pick)),
                            len(probe.checkpoints))
    num, den = getattr(probe, measure)(name, G), getattr(probe, measure)(against, G)
    if num is None or den is None or mean(den) == 0:
        return None
    return ratio_ci(num, den, paired=True)


def run(cfg: Config, opts: GradOptions, command: str, console: Console) -> dict:
    """Train as ``cfg`` says while probing; write grad.md and grad.png; merge the kae / grpo
    gradient-error ratios at G = 2 and 4 (``_HEADLINES``; the headline also for
    ``kae_every_step``) with their intervals into summary.json and return them."""
    check_groups(opts)
    task, rows, reference, tokenizer = load_probes(cfg, opts, console)
    inputs = prior_inputs(opts, task, rows, reference, tokenizer)
    del reference  # train() loads its own copy of the starting model
    probe = GradProbe(cfg, opts, tokenizer, rows, task.reward_fn, len(task.train_rows), **inputs)
    result = train_probed(cfg, opts, console, probe)

    groups = sorted(set(opts.groups))
    ratios = {key: {G: r for G in (2, 4) if G in groups and (r := measure_ratio(probe, measure, "kae", against, G))}
              for key, (measure, against, _) in _HEADLINES.items()}
    every_step = {G: r for G in (2, 4)
                  if G in groups and (r := measure_ratio(probe, _HEADLINES[HEADLINE][0], EVERY_STEP, "grpo", G))}
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    with figure(results_dir / "grad.png", 2) as (left, right):
        plot_by_group(left, {name: [(G, probe.true_relative(name, G)) for G in groups] for name in _ROWS_TRUE},
                      groups, "min_c ||c g - grad J||^2 / ||grad J||^2", f"whole error, at the best step size "
                      f"({cfg.algo.estimator} run, {len(probe.checkpoints)} checkpoints x {opts.probes} probes)",
                      yscale="linear")
        plot_by_group(right, {name: [(G, probe.relative(probe.whole(name, G))) for G in groups] for name in _ROWS_TRUE},
                      groups, "E||g - grad J||^2 / ||grad J||^2", "whole error, at step size 1")
    header = ["estimator (baseline)", *(f"G={G}" for G in groups)]

    def rows_of(names: dict[str, str], figure_of) -> list[list[str]]:
        return [[f"{name} ({what})", *(fmt(figure_of(name, G)) for G in groups)] for name, what in names.items()]

    whole_table = table(header, rows_of(_ROWS_TRUE, lambda name, G: probe.relative(probe.whole(name, G))))
    baseline_table = table(header, rows_of(_ROWS_MC, lambda name, G: probe.relative(probe.baseline_err(name, G)))
                           + [["Monte Carlo floor (subtracted)",
                               *(fmt(probe.relative(probe.mc_floor[G])) for G in groups)]])
    cross_table = table(header, rows_of(_ROWS_MC, lambda name, G: probe.relative(probe.cross(name, G))))
    true_table = table(header, rows_of(_ROWS_TRUE, probe.true_relative))
    ratio_lines = {key: f"{label}: {ratio_line(ratios[key])}" for key, (_, _, label) in _HEADLINES.items()}
    sections = [
        f"Policy-gradient error of each estimator on the probe samples of {describe_run(cfg, opts, probe, result)}. "
        f"KAE's history: {probe.schedule()}. Each gradient is (1/N) Σ (r − b) ∇log π (seq-mean-token-sum) with "
        "the estimator's own baseline b, so that estimators differ by their baselines only: GRPO's std division "
        "and REINFORCE++'s whitening rescale rather than centre; GRPO as trained is one extra row. Every figure "
        "is over ‖∇J‖², the squared norm of the true gradient, estimated from the Monte Carlo samples in two "
        f"halves (≈ {fmt(mean(probe.true_norm))}). Intervals: 95 %, the {len(probe.checkpoints)} checkpoints "
        "resampled. Protocol: `src/frugalrl/bench/grad.py`.",
        "**The whole error, at the best step size** (the headline): min over c of E‖c·g − ∇J‖² / ‖∇J‖² = "
        "1 − (E g·∇J)² / (E‖g‖² ‖∇J‖²), everything by which the gradient misses ∇J (sampling noise, the "
        "baseline's error and their cross term) but its length, which AdamW's update does not see. GRPO's group "
        "mean gives exactly (G − 1)/G times RLOO's gradient, REINFORCE++'s batch mean (N − 1)/N times "
        "REINFORCE's, so those rows agree here:\n\n" + true_table,
        "; ".join(ratio_lines[key] for key in (HEADLINE, "grad_total_mse_ratio_kae_vs_grpo_scaled"))
        + f". Upper bound, every probe at every step (best case for KAE), {EVERY_STEP} / grpo: "
        + ratio_line(every_step) + ".",
        "**The whole error at step size 1**, E‖g − ∇J‖² / ‖∇J‖², counts the gradient's length too: where "
        "noise dominates, a shorter gradient (GRPO's group mean at small G) scores better:\n\n" + whole_table,
        ratio_lines["grad_whole_mse_ratio_kae_vs_grpo"] + ".",
        "**Its parts**: E‖g − ∇J‖² = E‖g − g_V‖² + E‖g_V − ∇J‖² + 2 E[(g − g_V)·(g_V − ∇J)], g_V the gradient "
        "with V(x) as baseline on the same samples (its error is the `v_mc` row above: sampling noise, the "
        "same for every baseline). The error the baseline adds, E‖g − g_V‖², against g_MC with the Monte Carlo "
        "noise floor subtracted:\n\n" + baseline_table,
        ratio_lines["grad_mse_ratio_kae_vs_grpo"] + ".",
        "The cross term 2 E[(g − g_V)·(g_V − ∇J)]: 0 for a baseline that is unbiased and independent of the "
        "sample's own reward, not for a lagging history or a group or batch mean that holds the sample's own "
        "reward:\n\n" + cross_table,
        trajectory(probe),
        f"Torch threads: {torch.get_num_threads()}.",
    ]
    summary = {k: v for key, per_g in ratios.items() for k, v in ratio_summary(key, per_g).items()}
    summary.update(ratio_summary(HEADLINE, every_step, "_every_step"))
    return publish(results_dir, "grad", "Grad bench: policy-gradient error per estimator", command, sections, summary,
                   console)
