"""The documentation stays true to the code: every setting is documented once."""

from __future__ import annotations

from pathlib import Path

from lungnode.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_in_the_docs_and_the_commented_toml() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    toml = (ROOT / "config" / "lungnode.toml").read_text()
    for name in Settings.model_fields:
        assert f"`LUNGNODE_{name.upper()}`" in docs, f"{name} missing from docs/configuration.md"
        assert f"# {name} = " in toml, f"{name} missing from config/lungnode.toml"


def test_readme_starts_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert block[0].startswith("make run") and block[1].startswith("make test")
