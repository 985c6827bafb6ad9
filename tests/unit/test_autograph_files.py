"""Autograph's files removed at a fast exit (lungnode.app.autograph_files)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lungnode.app.autograph_files import MODULE_PREFIX, remove_autograph_files


@pytest.fixture
def imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """Two modules imported from files as autograph imports its own, and one other;
    the real autograph modules of this test process (TensorFlow loaded by other
    tests) are out of sight meanwhile, so that their files stay."""
    for name in [n for n in sys.modules if n.startswith(MODULE_PREFIX)]:
        monkeypatch.delitem(sys.modules, name)
    paths = {}
    for name in (f"{MODULE_PREFIX}abc", f"{MODULE_PREFIX}def", "ordinary_module_xyz"):
        path = tmp_path / f"{name}.py"
        path.write_text("VALUE = 1\n")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
        paths[name] = path
    yield paths
    for name in paths:
        sys.modules.pop(name, None)


def test_only_autograph_files_are_removed(imported: dict[str, Path]) -> None:
    assert remove_autograph_files() == 2
    assert {name for name, path in imported.items() if path.exists()} == {"ordinary_module_xyz"}
    assert remove_autograph_files() == 0  # already gone: nothing to do, no error
