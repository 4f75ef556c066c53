"""mkdocs hook: the field table of `KeepLoRAConfig`, generated from the dataclass itself.

A line `<!-- keeplora-config-fields -->` in a page becomes a markdown table with one row per field that
`KeepLoRAConfig` declares itself (the keys of `KeepLoRAConfig.__annotations__`, in declaration order): the field,
its default and its `help` metadata. The inherited `LoraConfig` fields are not listed (docs/config.md says which of
them apply). Nothing here is written by hand, so the table cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import re

PLACEHOLDER = "<!-- keeplora-config-fields -->"


def format_default(field: dataclasses.Field) -> str:
    """The default as Python spells it, strings in double quotes (`"auto"`, `0.6`, `False`)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def _escape(text: str) -> str:
    """Markdown-escape a help string outside its `code spans`, and keep it on one table row."""
    text = " ".join(text.split())
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = re.sub(r"([\\*_|\[\]])", r"\\\1", parts[i]).replace("<", "&lt;")
    return "`".join(parts)


def config_fields() -> list[tuple[str, str, str]]:
    """(field, default, help) of every field `KeepLoRAConfig` declares itself, in declaration order."""
    from keeplora_hf import KeepLoRAConfig

    own = KeepLoRAConfig.__annotations__
    return [
        (field.name, format_default(field), field.metadata.get("help", ""))
        for field in dataclasses.fields(KeepLoRAConfig)
        if field.name in own
    ]


def config_table() -> str:
    lines = ["| field | default | help |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | `{default}` | {_escape(help_text)} |" for name, default, help_text in config_fields()]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, config_table())
