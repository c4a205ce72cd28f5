"""A frugalrl command as a new user first runs it: in a process of its own (``report.run_child``),
from an empty model cache, so that its wall time includes building the embedded model and its
warm-up; then what it left behind: its metrics rows and the warm-up's ``sft_info.json``.

The ``demo`` and ``tasks`` benches are made of such runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from frugalrl.bench.report import run_child


def fresh_run(args: list[str], work_dir: Path, name: str) -> dict:
    """Run ``frugalrl ARGS`` with ``output_dir`` WORK_DIR/NAME and an empty ``model.cache_dir``
    WORK_DIR/NAME-cache (both emptied first; the log is WORK_DIR/NAME.log).

    Returns ``{"wall_s": the process's wall seconds, start-up to exit, "peak_rss_mb", "steps":
    its training metrics rows, "evals": its evaluation rows, "warmup": the sft_info.json it built
    (None when it built none)}``.
    """
    run_dir, cache = work_dir / name, work_dir / f"{name}-cache"
    for path in (run_dir, cache):
        shutil.rmtree(path, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    seconds, peak = run_child("frugalrl.cli", [*args, f"output_dir={run_dir}", f"model.cache_dir={cache}"],
                              work_dir / f"{name}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    built = sorted(cache.glob("embedded-*/sft_info.json"))
    return {"wall_s": seconds, "peak_rss_mb": peak, "steps": [r for r in rows if "reward_mean" in r],
            "evals": [r for r in rows if "eval_accuracy" in r],
            "warmup": json.loads(built[0].read_text()) if built else None}
