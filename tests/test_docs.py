"""The documentation: the generated option reference is current, the README stays short, and the
mkdocs site builds with every link resolved (`mkdocs build --strict`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from frugalrl import optionref
from frugalrl.config import field_specs

ROOT = Path(__file__).resolve().parents[1]
OPTIONS_PAGE = ROOT / "docs" / "options.md"
README_LIMIT = 8192


def test_option_reference_is_current():
    assert OPTIONS_PAGE.exists(), "docs/options.md is missing: run `python -m frugalrl.optionref`"
    assert OPTIONS_PAGE.read_text(encoding="utf-8") == optionref.markdown(), (
        "docs/options.md is out of date with the config schema: run `python -m frugalrl.optionref`")


def test_option_reference_lists_every_option():
    page = OPTIONS_PAGE.read_text(encoding="utf-8")
    missing = [s.key for s in field_specs() if f"`{s.key}`" not in page]
    assert not missing, f"docs/options.md lacks {missing}: run `python -m frugalrl.optionref`"


def test_option_reference_cli_writes_the_page(tmp_path):
    out = tmp_path / "options.md"
    assert optionref.main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == optionref.markdown()


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, (f"README.md is {size} bytes (limit {README_LIMIT}): move details into docs/ "
                                 "and keep the README to what a newcomer needs")


def test_mkdocs_builds_strict(tmp_path):
    assert importlib.util.find_spec("material") is not None, \
        "mkdocs-material is not installed: pip install -e '.[docs]' (make test installs it)"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "options" / "index.html").exists()
