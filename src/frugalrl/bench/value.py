"""Value bench: how close each estimator's baseline comes to a prompt's true value V(x).

Protocol of ``frugalrl bench value``, along one real training run probed as ``probe.py``
describes (the first ``bench.probes`` held-out prompts; every step, G fresh samples of each,
for every G in ``bench.groups``; KAE's history fed as ``bench.kae_preset`` trains, and, as an
upper bound, every probe at every step; every ``bench.every`` steps, a checkpoint: V_MC(x)
from ``bench.mc_samples`` samples, and each estimator's baseline for that step's G samples):

* MSE = mean over checkpoints, probes and samples of (baseline - V_MC(x))^2, minus the Monte
  Carlo estimate's own variance (mean over probes of s^2(x) / M, s^2 the sample variance of its
  M rewards): a baseline's samples are independent of the Monte Carlo ones, so
  E[(b - V_MC)^2] = E[(b - V)^2] + Var(V_MC).
* The headline, KAE's MSE over GRPO's at G = 2 and 4, is KAE as its preset trains (``kae``, with
  the preset's ``algo.kae_prior``); ``kae_every_step`` gives the upper bound, and ``kae_<prior>``
  the scheduled KAE with each prior of ``bench.kae_priors`` (summary keys
  ``value_mse_ratio_kae_<prior>_vs_grpo_gG``). Each ratio has a 95 % bootstrap interval over the
  probes (``stats.ratio_ci``, the two estimators' errors paired by probe: per probe, its MSE
  over checkpoints and samples less its Monte Carlo variance).
* A*-PO apart, since its baseline targets something else: V*_ref(x), ``optimal_value`` of
  ``algo.vstar_n`` samples of the starting model at temperature 1 (``algo.astar_beta1``), the
  reference policy's soft-max value. Its MSE is reported against its own target (V*_ref from
  ``bench.mc_samples`` samples) and against the current policy's V(x).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from frugalrl.advantages import optimal_value
from frugalrl.bench.options import ValueOptions
from frugalrl.bench.probe import (EVERY_STEP, RUN_DEFAULTS, Probe, check_groups, describe_run, figure, load_probes,
                                  mean, plot_by_group, prior_inputs, ratio_line, ratio_summary, sample, train_probed,
                                  trajectory)
from frugalrl.bench.report import fmt, publish, table
from frugalrl.config import Config
from frugalrl.vstar import TEMPERATURE as VSTAR_TEMPERATURE

TRAIN_DEFAULTS = [*RUN_DEFAULTS, "output_dir=runs/bench-value"]


def _plot(probe: Probe, groups: list[int], astar: float, path: Path, title: str) -> None:
    with figure(path, 1) as (ax,):
        ax.axhline(max(astar, 1e-5), ls="--", color="grey", label="astar: V*_ref vs V(x) (no G)")
        plot_by_group(ax, {name: [(G, probe.mse(name, G)) for G in groups] for name in probe.described}, groups,
                      "MSE of baseline vs V(x)", title)


def run(cfg: Config, opts: ValueOptions, command: str, console: Console) -> dict:
    """Train as ``cfg`` says while probing; write value.md and value.png; merge the kae/grpo MSE
    ratios at G = 2 and 4 into summary.json and return them."""
    check_groups(opts)
    task, rows, reference, tokenizer = load_probes(cfg, opts, console)
    ro = cfg.rollout
    vstar_sampling = dict(temperature=VSTAR_TEMPERATURE, top_p=1.0, max_new_tokens=ro.max_new_tokens)
    v_star, v_star_target = (
        optimal_value(sample(reference, tokenizer, rows, task.reward_fn, n, **vstar_sampling).rewards,
                      cfg.algo.astar_beta1) for n in (cfg.algo.vstar_n, opts.mc_samples))
    inputs = prior_inputs(opts, task, rows, reference, tokenizer)
    del reference  # train() loads its own copy of the starting model
    probe = Probe(cfg, opts, tokenizer, rows, task.reward_fn, len(task.train_rows), **inputs)
    result = train_probed(cfg, opts, console, probe)

    groups = sorted(set(opts.groups))
    noise = probe.noise().mean().item()
    astar_vs_v = mean([((v_star - v) ** 2).mean().item() for v in probe.values]) - noise
    astar_vs_target = ((v_star - v_star_target) ** 2).mean().item()
    priors = {f"kae_{kind}": kind for kind in opts.kae_priors}
    ratios = {name: {G: r for G in (2, 4) if G in groups and (r := probe.mse_ratio(name, "grpo", G))}
              for name in ("kae", EVERY_STEP, *priors)}
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{cfg.algo.estimator} run, {len(probe.checkpoints)} checkpoints x {opts.probes} probes, "
             f"V(x) from {opts.mc_samples} samples")
    _plot(probe, groups, astar_vs_v, results_dir / "value.png", title)
    mse_rows = [[f"{name} ({what})", *(fmt(probe.mse(name, G)) for G in groups)]
                for name, what in probe.described.items()]
    sections = [
        f"Baseline MSE against the Monte Carlo value V(x) of {describe_run(cfg, opts, probe, result)}; its own "
        f"variance ({noise:.2g}) is subtracted. KAE's history: {probe.schedule()}. "
        "Protocol: `src/frugalrl/bench/value.py`.",
        table(["estimator (baseline)", *(f"G={G}" for G in groups)], mse_rows),
        "kae / grpo MSE ratio, KAE as its preset trains (95 % interval, probes resampled): "
        + ratio_line(ratios["kae"]) + ".",
        "Upper bound, every probe at every step (best case for KAE: a prompt in every batch of the run), "
        f"{EVERY_STEP} / grpo: " + ratio_line(ratios[EVERY_STEP]) + ".",
        *(f"{name} / grpo, the scheduled KAE with algo.kae_prior={kind}"
          + (f" (kappa fitted to the run's visits, {probe.rates.strength(kind):.3g} at the end)" if kind != "none"
             else "")
          + ": " + ratio_line(ratios[name]) + "." for name, kind in priors.items()),
        "A*-PO's baseline is V*_ref(x), the starting model's soft-max value (beta1 = "
        f"{cfg.algo.astar_beta1:g}, temperature {VSTAR_TEMPERATURE:g}) from algo.vstar_n = {cfg.algo.vstar_n} "
        "samples, a different target than V(x):\n\n"
        + table(["astar baseline V*_ref against", "MSE"],
                [[f"its own target: V*_ref from {opts.mc_samples} samples", fmt(astar_vs_target)],
                 ["the current policy's V(x) (as above)", fmt(astar_vs_v)]]),
        trajectory(probe),
        f"Torch threads: {torch.get_num_threads()}.",
    ]
    summary = {**ratio_summary("value_mse_ratio_kae_vs_grpo", ratios["kae"]),
               **ratio_summary("value_mse_ratio_kae_vs_grpo", ratios[EVERY_STEP], "_every_step"),
               **{key: value for name in priors
                  for key, value in ratio_summary(f"value_mse_ratio_{name}_vs_grpo", ratios[name]).items()}}
    return publish(results_dir, "value", "Value bench: baseline MSE against V(x)", command, sections, summary,
                   console)
