"""docs/ stays true to the code: hooks, profile fields, CLI options, links, TOML blocks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from sora_export.core import hookspecs, profiles
from sora_export.core.cli import export_parser
from sora_export.core.engine import STAGES

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROOT = DOCS.parent


def _doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_every_hook_is_documented_with_its_docstring_terms() -> None:
    text = _doc("hooks.md")
    hooks = [n for n in dir(hookspecs) if n.startswith("sora_export_")]
    assert hooks
    for name in hooks:
        assert f"## `{name}(" in text, f"docs/hooks.md lacks a section for {name}"
        first_result = "firstresult=True" in _source_of(name)
        section = text.split(f"## `{name}(")[1].split("\n## ")[0]
        assert ("First result wins" in section) == first_result, name


def _source_of(hook: str) -> str:
    source = Path(hookspecs.__file__).read_text()
    before = source.split(f"def {hook}(")[0]
    return before.rsplit("\n\n", 1)[-1]


def test_every_profile_field_is_documented() -> None:
    text = _doc("profiles.md")
    for field in profiles._TOP_FIELDS:
        assert any(f in text for f in (f"`{field}`", f"[{field}", f"[[{field}]]")), field
    for field in profiles._SHAPE_FIELDS:
        assert f"`{field}`" in text, field


def test_every_cli_option_is_documented() -> None:
    text = _doc("cli.md")
    for action in export_parser()._actions:
        for option in action.option_strings:
            if option in ("-h", "--help"):
                continue
            stem = option.split("/")[0]
            assert stem in text, f"docs/cli.md does not mention {option}"
    for stage in STAGES:
        assert stage in text


@pytest.mark.parametrize("path", [*sorted(DOCS.glob("*.md")), ROOT / "README.md"], ids=str)
def test_relative_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.md")), ids=str)
def test_toml_blocks_parse(path: Path) -> None:
    for block in re.findall(r"```toml\n(.*?)```", path.read_text(), flags=re.S):
        tomllib.loads(block)


def test_profile_doc_embeds_the_real_iphone15pro() -> None:
    block = re.findall(r"```toml\n(.*?)```", _doc("profiles.md"), flags=re.S)[0]
    shipped = (ROOT / "plugins" / "profiles" / "iphone15pro.toml").read_text()
    assert tomllib.loads(block) == tomllib.loads(shipped)


def test_readme_commands_match_ci() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:12] if line.startswith("    ")]
    assert any("sora-export --plugins" in c for c in commands)
    test_command = next(c for c in commands if "pytest" in c)
    pytest_part = test_command.split("&&")[-1].strip()
    assert pytest_part in (ROOT / ".ci" / "run").read_text()
