"""The documentation: the mkdocs site builds with --strict (no broken link or anchor), the README stays a short front
door whose links all resolve, and the config reference lists every `KeepLoRAConfig` field with its default, as
generated from the code (docs/hooks/config_table.py)."""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from keeplora_hf import KeepLoRAConfig

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_README_LINES = 250
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for this module exactly as a maintainer builds it."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}\n{result.stdout}"
    return out


def _readme_links() -> list[str]:
    text = FENCE.sub("", README.read_text(encoding="utf-8"))
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)]


def _page_html(site: Path, page: str) -> Path:
    """The HTML file mkdocs writes for `page` (a path under docs/, use_directory_urls)."""
    stem = page.removesuffix(".md")
    return site / "index.html" if stem == "index" else site / stem / "index.html"


def test_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    for page in ("guarantees", "precision", "parallel", "serving", "results", "performance", "analysis",
                 "architecture", "recipes", "config", "api", "method", "runner"):
        assert (site / page / "index.html").is_file(), page


def test_readme_is_a_short_front_door():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_every_relative_link_of_the_readme_resolves(site):
    links = _readme_links()
    assert any(link.startswith("docs/") for link in links)
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        if path and not (REPO / path).exists():
            broken.append(f"{link}: no such file")
            continue
        if not anchor:
            continue
        if not path:  # an anchor of the README itself: the site's home page is the README
            built = site / "index.html"
        elif path.startswith("docs/") and path.endswith(".md"):
            built = _page_html(site, path.removeprefix("docs/"))
        else:
            continue
        if f'id="{anchor}"' not in built.read_text(encoding="utf-8"):
            broken.append(f"{link}: no anchor #{anchor} in {built.relative_to(site)}")
    assert not broken, "\n".join(broken)


def _expected_default(field: dataclasses.Field) -> str:
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_config_page_lists_every_field_with_its_default(site):
    page = (site / "config" / "index.html").read_text(encoding="utf-8")
    rows = [html.unescape(row) for row in re.findall(r"<tr>(.*?)</tr>", page, re.DOTALL)]
    fields = {field.name: field for field in dataclasses.fields(KeepLoRAConfig)}
    own = list(KeepLoRAConfig.__annotations__)
    assert own and set(own) <= set(fields)
    missing = []
    for name in own:
        row = next((row for row in rows if f"<td><code>{name}</code></td>" in row), None)
        default = _expected_default(fields[name])
        if row is None:
            missing.append(f"{name}: no row")
        elif f"<code>{default}</code>" not in row:
            missing.append(f"{name}: default {default} not in its row")
        elif fields[name].metadata.get("help") and "<td></td>" in row:
            missing.append(f"{name}: empty help")
    assert not missing, "\n".join(missing)
    # only the fields KeepLoRAConfig declares itself: the inherited LoraConfig ones are described in prose
    assert "<td><code>use_dora</code></td>" not in page
