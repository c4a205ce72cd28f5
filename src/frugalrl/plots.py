"""PNG plots: one run's reward and evaluation accuracy against step and wall time, and its pass-rate
calibration; several runs side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from frugalrl.allocation import calibration_gap, reliability  # noqa: E402


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so that noisy per-step rewards read as a trend."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw_reliability(ax, runs: dict[str, list[dict]]) -> None:
    """A reliability diagram on ``ax``: per run (label -> its metrics rows), the realised share of
    all-equal groups against their predicted chance, one point a bin (area: its groups), and the
    diagonal a calibrated prediction follows; the legend gives each run's calibration gap."""
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    for i, (label, rows) in enumerate(runs.items()):
        bins = reliability(rows)
        if bins:
            predicted, realised, groups = zip(*bins)
            size = [20 + 200 * n / max(groups) for n in groups]
            ax.plot(predicted, realised, "-", color=f"C{i % 10}", lw=1)
            ax.scatter(predicted, realised, s=size, color=f"C{i % 10}", alpha=0.7,
                       label=f"{label} (gap {calibration_gap(rows):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted chance that a group's rewards are all equal")
    ax.set_ylabel("realised share of all-equal groups")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def plot_run(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels (x = step, x = training wall seconds), each with the sampled reward
    (moving average), the held-out greedy accuracy and the share of groups whose rewards were
    all equal (moving average); and a third, the reliability diagram of the all-equal
    predictions (``draw_reliability``). ``records`` are metrics.jsonl rows."""
    steps = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    calibrated = any(k.startswith("all_equal_bin") for r in steps for k in r)
    fig, axes = plt.subplots(1, 2 + calibrated, figsize=(11 + 4.5 * calibrated, 4))
    axes[1].sharey(axes[0])
    window = max(1, len(steps) // 20)
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "wall_s", "training wall time (s)")):
        ax.plot([r[key] for r in steps], _smooth([r["reward_mean"] for r in steps], window),
                label=f"sampled reward (mean of {window} steps)", color="tab:blue")
        ax.plot([r[key] for r in evals], [r["eval_accuracy"] for r in evals], "o-",
                label="held-out greedy accuracy", color="tab:orange")
        equal = [r for r in steps if "all_equal_realised" in r]
        if equal:  # what the rollout allocation acts on: groups that teach nothing under group baselines
            ax.plot([r[key] for r in equal], _smooth([r["all_equal_realised"] for r in equal], window), "--",
                    label="share of all-equal groups", color="tab:grey", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward / accuracy")
    axes[0].legend(loc="best", fontsize=8)
    if calibrated:
        draw_reliability(axes[2], {"this run": steps})
        axes[2].set_title("pass-rate calibration", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(curves: list[dict], path: str | Path, xlabel: str, title: str = "") -> Path:
    """Several runs on shared axes: held-out greedy accuracy (left) and sampled reward (right,
    moving average), one colour a run. ``curves``: one ``{"label": str, "accuracy": (xs, ys),
    "reward": (xs, ys)}`` a run, ``xs`` in the units ``xlabel`` names."""
    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.25 * len(curves)), sharex=True)
    for i, curve in enumerate(curves):
        color = f"C{i % 10}"
        acc_ax.plot(*curve["accuracy"], "o-", color=color, markersize=3, label=curve["label"])
        xs, ys = curve["reward"]
        reward_ax.plot(xs, _smooth(list(ys), max(1, len(ys) // 20)), color=color, label=curve["label"])
    acc_ax.set_ylabel("held-out greedy accuracy")
    reward_ax.set_ylabel("sampled reward (moving average, 1/20 of the run)")
    for ax in (acc_ax, reward_ax):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    # one legend under both panels: labels name several options and would cover the curves
    fig.legend(*acc_ax.get_legend_handles_labels(), loc="lower center", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.5, 0.04 + 0.045 * len(curves)), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
