"""The README's configuration reference and the example config match the config classes."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from trio_chat._config import Config, RoomOptions, load_config

ROOT = Path(__file__).resolve().parent.parent


def _config_keys() -> set[str]:
    """Every ``section.key``, and ``rooms.<key>`` for the keys of a ``[[rooms]]`` table."""
    sections = [
        (section.name, section.type) for section in attrs.fields(Config) if section.name != "rooms"
    ]
    return {
        f"{name}.{field.name}"
        for name, cls in [*sections, ("rooms", RoomOptions)]
        for field in attrs.fields(cls)
    }


def test_readme_documents_every_config_key_and_no_other():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", table, re.MULTILINE))
    assert documented == _config_keys()


def test_example_config_mentions_every_key():
    # (the example's [[rooms]] table is commented out: it would apply to rooms)
    text = (ROOT / "config" / "trio-chat.toml").read_text().replace("# [[rooms]]", "[[rooms]]")
    sections = re.split(r"^\[\[?([a-z]+)\]\]?$", text, flags=re.MULTILINE)[1:]
    mentioned = {
        f"{name}.{key}"
        for name, body in zip(sections[::2], sections[1::2], strict=True)
        for key in re.findall(r"^#? ?([a-z_]+) =", body, re.MULTILINE)
    }
    assert mentioned == _config_keys()


def _readme_tree() -> set[str]:
    """Every path the README's package tree names, relative to the repository."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### The package: one folder per layer", 1)[1].split("```", 2)[1]
    paths: set[str] = set()
    folders: list[str] = []  # the folder open at each depth
    for line in block.splitlines()[1:]:
        match = re.match(r"^((?:[│ ]   )*)[├└]── (\S+)", line)
        if match is None:  # a comment line or a blank one
            continue
        depth = len(match.group(1)) // 4
        name = match.group(2)
        del folders[depth:]
        prefix = "/".join(["trio_chat", *folders])
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
            paths.add(f"{prefix}/{name.rstrip('/')}")
            continue
        paths.add(f"{prefix}/{name}")
        # more leaf modules on the same row
        rest = line[match.end() :].split("  ")
        paths.update(f"{prefix}/{extra.strip()}" for extra in rest if extra.strip().endswith(".py"))
    return paths


def test_readme_package_tree_matches_the_package():
    """The README's tree names every module and folder of trio_chat/ (static files aside), and
    nothing that is not there."""
    package = ROOT / "trio_chat"
    actual = {
        str(path.relative_to(ROOT))
        for path in package.rglob("*")
        if "__pycache__" not in path.parts
        and path.name != "py.typed"
        and not (path.name == "__init__.py" and path.parent != package)
        and "static" not in path.parent.parts
    }
    assert _readme_tree() == actual


def test_the_shipped_config_files_load():
    for name in ("trio-chat.toml", "demo.toml"):
        load_config(ROOT / "config" / name, env={})
    demo = load_config(ROOT / "config" / "demo.toml", env={})
    assert [(t.match, t.presence_events) for t in demo.rooms][-1] == ("*", True)
