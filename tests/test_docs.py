"""The README's configuration reference and the example config match the config classes."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from trio_chat._config import Config

ROOT = Path(__file__).resolve().parent.parent


def _config_keys() -> set[str]:
    return {
        f"{section.name}.{field.name}"
        for section in attrs.fields(Config)
        for field in attrs.fields(section.type)
    }


def test_readme_documents_every_config_key_and_no_other():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", table, re.MULTILINE))
    assert documented == _config_keys()


def test_example_config_mentions_every_key():
    text = (ROOT / "config" / "trio-chat.toml").read_text()
    sections = re.split(r"^\[([a-z]+)\]$", text, flags=re.MULTILINE)[1:]
    mentioned = {
        f"{name}.{key}"
        for name, body in zip(sections[::2], sections[1::2], strict=True)
        for key in re.findall(r"^#? ?([a-z_]+) =", body, re.MULTILINE)
    }
    assert mentioned == _config_keys()
