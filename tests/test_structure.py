"""The package's structure stays as the README describes it: no import cycle, no module over ~400 lines without a
reason at its top."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "keeplora_hf"
MAX_LINES = 400


def test_no_import_cycle_between_modules():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "import_cycles.py"), str(PACKAGE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 cycle(s)" in result.stdout


def test_import_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import x\n")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "import_cycles.py"), str(package)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "pkg.a" in result.stdout and "pkg.b" in result.stdout


def test_modules_stay_small_or_say_why():
    long = [
        f"{path.relative_to(REPO)} ({lines} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_LINES and "over 400 lines because" not in path.read_text()[:2000]
    ]
    assert not long, f"modules over {MAX_LINES} lines without 'over 400 lines because ...' at their top: {long}"
