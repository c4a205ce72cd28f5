"""The phases of a training step, marked for ``torch.profiler`` (``frugalrl bench profile`` reads them).

Each phase is a ``record_function`` range named ``frugalrl.<phase>``; the ranges do not nest, so
their times add up to the step's less what lies outside every phase. Outside a profiler a range
costs about a microsecond, a few dozen of them a step.
"""

from __future__ import annotations

from torch.profiler import record_function

__all__ = ["PHASES", "phase"]

# step order: sampling, scoring, advantages, then the update's no-grad passes (old and reference
# log-probs), the training forward with the loss, its backward, gradient clipping and the step
PHASES = ("generate", "reward", "advantages", "constants", "forward", "backward", "optimizer")


def phase(name: str) -> record_function:
    """The profiler range of phase ``name`` (one of ``PHASES``), a context manager."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; phases: {PHASES}")
    return record_function(f"frugalrl.{name}")
