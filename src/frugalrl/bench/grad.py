"""Grad bench: what each estimator's baseline does to the policy gradient.

Protocol of ``frugalrl bench grad``, along one real training run probed as ``probe.py``
describes (the value bench's probing: the first ``bench.probes`` held-out prompts; every step,
G fresh samples of each, for every G in ``bench.groups``, feed a KAE estimator of their own;
every ``bench.every`` steps, a checkpoint: V_MC(x) from ``bench.mc_samples`` samples, and each
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
* Against the Monte Carlo-baseline gradient g_MC = (1/N) sum_i (r_i - V_MC(x_i)) s_i of the same
  samples: the reward terms cancel, g - g_MC = (1/N) sum_i (V_MC(x_i) - b_i) s_i, one backward
  pass with those per-sample weights. MSE = mean over checkpoints of ||g - g_MC||^2 minus the
  Monte Carlo noise floor: V_MC = V + d with d independent of the probe samples, of variance
  c_x = Var(V_MC(x)) (estimated by s^2(x) / M), so E||g - g_MC||^2 = E||g - g_V||^2 +
  (1/N^2) sum_x c_x ||S_x||^2, S_x the sum of probe x's G scores. The floor is estimated without
  bias by one more backward pass with weights e_x sqrt(c_x) (e_x = +-1 at random per probe):
  E_e ||(1/N) sum_x e_x sqrt(c_x) S_x||^2 = (1/N^2) sum_x c_x ||S_x||^2. Relative MSE: over
  E||g_V||^2, the mean ||g_MC||^2 minus the same floor. This is the error the baseline adds; the
  gradient's sampling noise, the same for every baseline, is not in it.
* Against the true gradient grad J = (1/P) sum_x grad V(x) (what every unbiased estimator averages
  to), at the best step size: min over c of E||c g - grad J||^2 / ||grad J||^2 =
  1 - (E[g] . grad J)^2 / (E||g||^2 ||grad J||^2), the estimator's whole error (sampling noise
  and bias included) with its length factored out, so GRPO as trained is compared too. A plain
  MSE against grad J would reward any shrunk gradient where noise dominates: GRPO's group mean,
  which holds the sample's own reward, gives exactly (G - 1) / G times RLOO's gradient (and
  REINFORCE++'s batch mean (N - 1) / N times REINFORCE's), so those pairs agree here.
  grad J is estimated from the Monte Carlo samples: each probe's M samples split in two halves,
  each with its own leave-one-out baseline, give independent unbiased estimates g_A and g_B;
  then g . (g_A + g_B) / 2 estimates E[g] . grad J and g_A . g_B estimates ||grad J||^2, both
  without bias (g is independent of them). Each expectation is a mean over checkpoints (one
  step size for the whole run); n/a where the estimate of E||g||^2 or ||grad J||^2 is not
  positive. The row ``v_mc`` is the gradient g_MC, its ||g_MC||^2 less the Monte Carlo floor.
* The floor, and g_A and g_B being unbiased, rest on E[s_i] = 0, i.e. on samples drawn from the
  tempered policy whose log-probabilities are differentiated: top_p = 1, the default.
* Cost: per G and checkpoint, one forward and (estimators + 3) backward passes over the N
  samples; per checkpoint, one forward and backward pass over the P x M Monte Carlo samples.
  Memory: that many vectors the size of the trainable parameters (small models, or LoRA).
* Gradients come from ``torch.autograd.grad``: the parameters' ``.grad``, which the optimizer
  reads, is never touched, so probing cannot leak into training.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

from frugalrl.bench.options import GradOptions
from frugalrl.bench.probe import (ESTIMATORS, RUN_DEFAULTS, Group, Probe, Samples, check_groups, describe_run, figure,
                                  load_probes, mean, plot_by_group, train_probed, trajectory)
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
    ``mc_floor`` the Monte Carlo floor's one-draw estimate, ``mc_norm`` ||g_MC||^2; and
    ``true_norm`` g_A . g_B.
    """

    def __init__(self, cfg: Config, opts: GradOptions, tokenizer, rows: list[dict], reward_fn):
        super().__init__(cfg, opts, tokenizer, rows, reward_fn)
        self.signs = torch.Generator().manual_seed(cfg.seed)  # the floor's random signs, apart from the run's RNG
        self.mc_err: dict[tuple[str, int], list[float]] = {}
        self.true_dot: dict[tuple[str, int], list[float]] = {}
        self.true_sq: dict[tuple[str, int], list[float]] = {}
        self.mc_floor: dict[int, list[float]] = {}
        self.mc_norm: dict[int, list[float]] = {}
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
        self.mc_norm.setdefault(G, []).append(_dot(g_mc, g_mc))
        for name, grad in grads.items():
            g = grad if name == ORACLE else grad + g_mc  # g = (g - g_MC) + g_MC
            if name != ORACLE:
                self.mc_err.setdefault((name, G), []).append(_dot(grad, grad))
            self.true_dot.setdefault((name, G), []).append(_dot(g, g_true))
            self.true_sq.setdefault((name, G), []).append(_dot(g, g))

    def mc_mse(self, name: str, G: int) -> float | None:
        """E||g - g_V||^2: the gradient error the baseline adds; None where there is no baseline."""
        errs = self.mc_err.get((name, G))
        return None if not errs else mean(errs) - mean(self.mc_floor[G])

    def mc_relative(self, name: str, G: int) -> float | None:
        """mc_mse / E||g_V||^2; None where there is no baseline or that norm's estimate is not positive."""
        mse, norm = self.mc_mse(name, G), self.v_norm(G)
        return None if mse is None or norm <= 0 else mse / norm

    def v_norm(self, G: int) -> float:
        """E||g_V||^2, the squared norm of the gradient with V(x) as baseline."""
        return mean(self.mc_norm[G]) - mean(self.mc_floor[G])

    def true_relative(self, name: str, G: int) -> float | None:
        """min over c of E||c g - grad J||^2 / ||grad J||^2; None where there is no such gradient
        or the estimate of E||g||^2 or of ||grad J||^2 is not positive."""
        dots = self.true_dot.get((name, G))
        if not dots:
            return None
        sq = mean(self.true_sq[(name, G)]) - (mean(self.mc_floor[G]) if name == ORACLE else 0.0)
        norm = mean(self.true_norm)
        return 1.0 - mean(dots) ** 2 / (sq * norm) if sq > 0 and norm > 0 else None


def _dot(a: Tensor, b: Tensor) -> float:
    return torch.dot(a.double(), b.double()).item()


# summary key prefix: (GradProbe measure, estimator it is divided by, what the page calls the ratio)
_HEADLINES = {
    "grad_mse_ratio_kae_vs_grpo": ("mc_mse", "grpo", "kae / grpo, gradient error from the baseline"),
    "grad_total_mse_ratio_kae_vs_grpo": ("true_relative", "grpo", "kae / grpo, whole error at the best step size"),
    "grad_total_mse_ratio_kae_vs_grpo_scaled": (
        "true_relative", GRPO_SCALED, "kae / GRPO as trained (grpo_scaled), whole error at the best step size"),
}


def _ratios(measure, against: str, groups: list[int]) -> dict[int, float]:
    """kae / ``against`` of ``measure(name, G)`` at G = 2 and 4, where both exist."""
    return {G: measure("kae", G) / measure(against, G) for G in (2, 4) if G in groups and measure(against, G)}


def run(cfg: Config, opts: GradOptions, command: str, console: Console) -> dict:
    """Train as ``cfg`` says while probing; write grad.md and grad.png; merge the kae / grpo
    gradient-MSE ratios at G = 2 and 4 (``_HEADLINES``) into summary.json and return them."""
    check_groups(opts)
    t0 = time.perf_counter()
    task, rows, reference, tokenizer = load_probes(cfg, opts, console)
    del reference  # train() loads its own copy of the starting model
    probe = GradProbe(cfg, opts, tokenizer, rows, task.reward_fn)
    result = train_probed(cfg, opts, console, probe)
    wall = time.perf_counter() - t0

    groups = sorted(set(opts.groups))
    ratios = {key: _ratios(getattr(probe, measure), against, groups)
              for key, (measure, against, _) in _HEADLINES.items()}
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    with figure(results_dir / "grad.png", 2) as (left, right):
        plot_by_group(left, {name: [(G, probe.mc_relative(name, G)) for G in groups] for name in _ROWS_MC}, groups,
                      "||g - g_V||^2 / ||g_V||^2", f"error from the baseline ({cfg.algo.estimator} run, "
                      f"{len(probe.checkpoints)} checkpoints x {opts.probes} probes)")
        plot_by_group(right, {name: [(G, probe.true_relative(name, G)) for G in groups] for name in _ROWS_TRUE},
                      groups, "min_c ||c g - grad J||^2 / ||grad J||^2", "whole error, at the best step size",
                      yscale="linear")
    header = ["estimator (baseline)", *(f"G={G}" for G in groups)]
    mc_table = table(header, [[f"{name} ({what})", *(fmt(probe.mc_relative(name, G)) for G in groups)]
                              for name, what in _ROWS_MC.items()]
                     + [["E‖g_V‖² (the denominator)", *(fmt(probe.v_norm(G)) for G in groups)],
                        ["Monte Carlo floor (subtracted)", *(fmt(mean(probe.mc_floor[G])) for G in groups)]])
    true_table = table(header, [[f"{name} ({what})", *(fmt(probe.true_relative(name, G)) for G in groups)]
                                for name, what in _ROWS_TRUE.items()])
    ratio_lines = {key: f"{label}: " + (", ".join(f"G={G}: {fmt(r, 3)}" for G, r in ratios[key].items()) or "n/a")
                   for key, (_, _, label) in _HEADLINES.items()}
    sections = [
        f"Policy-gradient error of each estimator on the probe samples of {describe_run(cfg, opts, probe, result)}. "
        "Each gradient is (1/N) Σ (r − b) ∇log π (seq-mean-token-sum) with the estimator's own baseline b, so "
        "that estimators differ by their baselines only: GRPO's std division and REINFORCE++'s whitening "
        "rescale rather than centre; GRPO as trained is one extra row. Protocol: `src/frugalrl/bench/grad.py`.",
        "**The error the baseline adds**: MSE against the gradient with V_MC(x) as baseline on the same samples, "
        "relative to E‖g_V‖², the Monte Carlo noise floor subtracted:\n\n" + mc_table,
        ratio_lines["grad_mse_ratio_kae_vs_grpo"] + ".",
        "**The whole error, at the best step size**: min over c of E‖c·g − ∇J‖² / ‖∇J‖² = 1 − (E g·∇J)² / "
        "(E‖g‖² ‖∇J‖²), ∇J the true gradient, estimated from the Monte Carlo samples in two halves (‖∇J‖² ≈ "
        f"{fmt(mean(probe.true_norm))}). Sampling noise and bias are in it, the gradient's length is not: a "
        "plain MSE would favour any shrunk gradient, and GRPO's group mean gives exactly (G − 1)/G times RLOO's "
        "gradient, REINFORCE++'s batch mean (N − 1)/N times REINFORCE's (so those rows agree here):\n\n"
        + true_table,
        "; ".join(ratio_lines[key] for key in ("grad_total_mse_ratio_kae_vs_grpo",
                                               "grad_total_mse_ratio_kae_vs_grpo_scaled")) + ".",
        trajectory(probe),
        f"Bench wall time: {wall:.0f} s ({torch.get_num_threads()} torch threads).",
    ]
    summary = {f"{key}_g{G}": r for key, per_g in ratios.items() for G, r in per_g.items()}
    return publish(results_dir, "grad", "Grad bench: policy-gradient error per estimator", command, sections, summary,
                   console)
