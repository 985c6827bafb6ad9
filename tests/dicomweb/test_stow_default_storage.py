"""STOW-RS under the settings of ``make run``: relative ``storage`` and ``models``, the
repository root as the working directory. Parts spool under ``storage/tmp/stow``, the
instances land where C-STORE puts them, and every path the database keeps is relative."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.db.models import Instance
from tests.dicom.helpers import finished_job
from tests.dicomweb.conftest import StowNode, encoded
from tests.support.synthetic import make_ct_series

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_stow_with_make_run_defaults(
    make_stow_node: Callable[..., StowNode],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "lungnode"
    shutil.copytree(ROOT / "models", root / "models")
    monkeypatch.chdir(root)
    stow_node = make_stow_node(
        analyse=True,
        storage_dir="storage",
        models_dir="models",
        model="lung-ct-demo",
        min_series_slices=5,
    )
    assert stow_node.settings.storage_dir == root / "storage"
    series = make_ct_series(6, rows=64, columns=64)
    response = stow_node.stow(encoded(series), study=str(series[0].StudyInstanceUID))
    assert response.status_code == 200, response.text
    job = finished_job(stow_node.node)
    assert job.state == "done", job.reason
    with stow_node.node.sessions() as session:
        paths = list(session.scalars(select(Instance.path)))
    assert len(paths) == 6
    assert all(not Path(path).is_absolute() for path in paths), paths
    assert all((root / "storage" / path).is_file() for path in paths)
    assert (root / "storage" / "tmp" / "stow").is_dir()
    assert stow_node.leftovers() == []
