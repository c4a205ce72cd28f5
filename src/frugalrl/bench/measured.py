"""``python -m frugalrl.bench.measured PEAK_FILE MODULE ARGS...``: run MODULE as ``__main__``,
then write the process's own peak RSS (MB, Linux VmHWM) to PEAK_FILE (``report.run_child``).

Its own module, not report.py: the bench package imports report, and running an imported
module as ``__main__`` makes runpy warn.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(peak_file: str, module: str, *args: str) -> None:
    """Run ``module`` as ``__main__`` with ``args``; then, however it ends, write this process's
    peak RSS in MB to ``peak_file``."""
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        status = Path("/proc/self/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        Path(peak_file).write_text(f"{kib / 1024}\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
