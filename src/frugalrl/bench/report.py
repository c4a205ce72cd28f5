"""What every bench writes: a markdown page headed by its exact command, the commit it ran on,
the date and its wall time (``start`` starts the clock, ``publish`` reads it), and summary.json.

``bench/results/summary.json`` is one flat JSON object shared by all benches; each bench merges
its own keys into it, so running one bench never erases another's numbers.
``run_child`` runs a measured run in a process of its own, so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# (perf_counter time, source_commit) when the running bench started (``start``); None before the first
_started: tuple[float, str] | None = None


def command_line(bench: str, config_path: str | None, overrides: list[str]) -> str:
    """The shell command that reruns ``bench`` with these options, quoted for copy and paste."""
    words = ["frugalrl", "bench", bench, *(["--config", config_path] if config_path else []), *overrides]
    return " ".join(shlex.quote(w) for w in words)


def fmt(value: float | None, digits: int = 4) -> str:
    """A table cell: ``n/a`` for None, else the value to ``digits`` significant digits."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (numeric columns right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def page(title: str, command: str, sections: list[str]) -> str:
    """A results page: the title, the command in a code block, then the sections."""
    return "\n\n".join([f"# {title}", f"```\n{command}\n```", *sections]) + "\n"


def start(results_dir: str | Path) -> None:
    """Start the bench's clock and note the commit it runs on (``bench.run`` does, just before the
    bench; ``results_dir``, its results directory): ``publish`` puts both on the page. The commit
    is read now, as the code was when the bench started, not as it is when it ends."""
    global _started
    _started = (time.perf_counter(), source_commit(results_dir))


def duration(seconds: float) -> str:
    """``seconds`` for a reader: "329 s", or "2472 s (41 min)" from two minutes on."""
    return f"{seconds:.0f} s" + (f" ({seconds / 60:.0f} min)" if seconds >= 120 else "")


def source_commit(exclude: str | Path | None = None) -> str:
    """The short commit of the git checkout frugalrl runs from, plus " (with uncommitted changes)"
    when a tracked file differs from it; "unknown" when this module is not a tracked file of a
    git checkout (an installed wheel) or git is missing.

    ``exclude``: a directory whose changes do not count, the bench's results directory: benches
    run one after another rewrite tracked pages and summary.json there, which says nothing of
    the code they ran. ``--no-optional-locks``: reading the status must not take the index lock
    from a git command running beside the bench.
    """
    here = Path(__file__).resolve()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(here.parent), *args], capture_output=True,
                              text=True, timeout=60)

    try:
        if git("ls-files", "--error-unmatch", here.name).returncode != 0:
            return "unknown"
        top, head = Path(git("rev-parse", "--show-toplevel").stdout.strip()), git("rev-parse", "--short", "HEAD")
        pathspec = [":/"]
        if exclude is not None and Path(exclude).resolve().is_relative_to(top):
            pathspec.append(f":(top,exclude){Path(exclude).resolve().relative_to(top)}")
        status = git("status", "--porcelain", "--untracked-files=no", "--", *pathspec)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0 or status.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if status.stdout.strip() else "")


def provenance(results_dir: str | Path) -> str:
    """The page's line under the command: the commit it ran on, when it finished (UTC) and the
    bench's wall time since ``start``; without ``start``, today's commit and no wall time."""
    finished = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if _started is None:
        commit = source_commit(results_dir)
        wall = "n/a (the bench was not started by `frugalrl bench`, which starts its clock)"
    else:
        commit, wall = _started[1], duration(time.perf_counter() - _started[0])
    return f"Commit {commit}; finished {finished}; bench wall time {wall}."


def publish(results_dir: str | Path, name: str, title: str, command: str, sections: list[str],
             summary: dict[str, float | None], console) -> dict[str, float | None]:
    """What every bench does last: write ``NAME.md`` (``page``; under its command, ``provenance``),
    merge ``summary`` into summary.json (None as null: measured, with no number, so a stale one
    is not left standing), print one line saying so; returns ``summary``."""
    (Path(results_dir) / f"{name}.md").write_text(page(title, command, [provenance(results_dir), *sections]))
    merge_summary(results_dir, summary)
    console.print(f"{name} bench: {', '.join(f'{k}={fmt(v, 3)}' for k, v in summary.items())}; "
                  f"results in {results_dir}/{name}.md")
    return summary


def merge_summary(results_dir: str | Path, values: dict[str, float | None]) -> Path:
    """Merge ``values`` into ``results_dir/summary.json`` (created when missing); atomic write."""
    path = Path(results_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def run_child(module: str, args: list[str], log: str | Path) -> tuple[float, float]:
    """Run ``python -m MODULE ARGS`` (this interpreter) to completion with its output in ``log``:
    (wall seconds, peak RSS in MB of that process alone). A failed run raises RuntimeError with
    the end of its log.

    The peak is the child's own high-water mark (VmHWM), which it writes as it exits (``measured``).
    ``os.wait4``'s ru_maxrss would not do: Linux starts it from the parent's RSS at the fork and
    keeps it across exec, so every child smaller than the bench's own process read as big as it
    (measured: four runs of two programs all at 747.40 MB).
    """
    log = Path(log)
    peak_file = log.with_name(log.name + ".peak_mb")
    peak_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "frugalrl.bench.measured", str(peak_file), module, *args],
                              stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"`python -m {module} {' '.join(args)}` failed with exit code {proc.returncode} "
                           f"(log {log}):\n{tail}")
    return seconds, float(peak_file.read_text())
