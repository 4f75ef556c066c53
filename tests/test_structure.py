"""The package's structure stays as docs/architecture.md describes it: no import cycle, no module over ~400 lines without a
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


#: libraries of the harness (runner, data, video, plots, analysis) that `import keeplora_hf` must not load
HARNESS_LIBRARIES = ("matplotlib", "datasets", "av", "tensorboard", "sklearn", "evaluate", "pandas", "torchvision")
#: standard-library modules that exist on POSIX only: importing one at module level breaks `import keeplora_hf` on Windows
POSIX_ONLY = ("fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "posix", "crypt", "syslog", "readline")
#: the harness around the tuner, which the tuner never imports
HARNESS_PACKAGES = ("data", "models", "continual", "hub", "analysis", "recipes", "demo", "cli")


def test_importing_the_package_loads_the_tuner_not_the_harness():
    """Beyond what `import peft, transformers` already loads (torchvision and fcntl come with them here)."""
    script = (
        "import sys\n"
        "import peft, transformers\n"
        "before = set(sys.modules)\n"
        "import keeplora_hf\n"
        "from keeplora_hf import KeepLoRAConfig, begin_task, end_task, KeepLoRACallback, export_lora\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        f"print(sorted(new & set({HARNESS_LIBRARIES + POSIX_ONLY!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", f"import keeplora_hf loaded {result.stdout.strip()}"


def test_no_posix_only_module_is_imported_at_module_level():
    import ast

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in POSIX_ONLY]
    assert not found, found


def test_the_tuner_imports_nothing_of_the_harness():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from import_cycles import imports, module_names
    finally:
        sys.path.remove(str(REPO / "tools"))
    modules = module_names(PACKAGE)
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    seen, todo = set(), [m for m in modules if m.startswith("keeplora_hf.tuner")]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [m for m in graph[name] if m != "keeplora_hf"]  # the root package is initialised first anyway
    harness = sorted(m for m in seen if m.split(".")[1:2] and m.split(".")[1] in HARNESS_PACKAGES)
    assert not harness, f"the tuner's import closure reaches the harness: {harness}"
