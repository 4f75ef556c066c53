"""mkdocs hook: a page made of a markdown file from outside docs/ (the README, recipes/README.md).

A line `<!-- include: PATH -->` (PATH relative to the repository root) is replaced by that file, with its relative
links rewritten for the page it lands in: a link to a page under docs/ points to that page; a link to an included
file points to the page that includes it; a link to any other repository file (a test, a benchmark result, a
folder), which the site does not hold, becomes its text, after checking that the file exists (a missing one is a
warning, so `mkdocs build --strict` fails). Anchors are kept, and mkdocs' own validation checks them.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger(f"mkdocs.plugins.{__name__}")

INCLUDE = re.compile(r"^<!--\s*include:\s*(\S+)\s*-->\s*$", re.MULTILINE)
LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)

_included_by: dict[str, str] = {}  # repository path of an included file -> src_uri of the page that includes it


def _paths(config) -> tuple[Path, Path]:
    root = Path(config["config_file_path"]).resolve().parent
    return root, Path(config["docs_dir"]).resolve()


def on_files(files, config):
    _included_by.clear()
    for file in files.documentation_pages():
        text = Path(file.abs_src_path).read_text(encoding="utf-8")
        for match in INCLUDE.finditer(text):
            _included_by[match.group(1)] = file.src_uri
    return files


def _rewrite(source: str, page_uri: str, root: Path, docs: Path, markdown: str) -> str:
    docs_prefix = docs.relative_to(root).as_posix() + "/"
    page_dir = posixpath.dirname(page_uri)

    def link(match: re.Match) -> str:
        bang, text, target = match.groups()
        if EXTERNAL.match(target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        anchor = f"#{anchor}" if anchor else ""
        if resolved in _included_by:
            return f"{bang}[{text}]({posixpath.relpath(_included_by[resolved], page_dir or '.')}{anchor})"
        if resolved.startswith(docs_prefix):
            return f"{bang}[{text}]({posixpath.relpath(resolved[len(docs_prefix):], page_dir or '.')}{anchor})"
        if not (root / resolved).exists():
            log.warning(f"{source}: link to '{target}', which does not exist")
        return text or f"`{resolved}`"

    parts = re.split(r"(^```.*?^```[^\n]*$)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(part if i % 2 else LINK.sub(link, part) for i, part in enumerate(parts))


def on_page_markdown(markdown: str, page, config, files) -> str:
    root, docs = _paths(config)

    def include(match: re.Match) -> str:
        source = match.group(1)
        path = root / source
        if not path.is_file():
            log.warning(f"{page.file.src_uri}: cannot include '{source}': no such file")
            return ""
        return _rewrite(source, page.file.src_uri, root, docs, path.read_text(encoding="utf-8"))

    return INCLUDE.sub(include, markdown)
