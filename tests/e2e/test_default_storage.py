"""A DICOM series under the settings of ``make run``: relative ``storage`` and
``models``, the repository root as the working directory. Its report and
heatmaps download over HTTP, and every path the database keeps is relative."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Delivery, Instance, Prediction
from tests.dicom.helpers import finished_job, store_all
from tests.support.synthetic import make_ct_series

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "admin-password-for-tests"


@pytest.mark.slow
def test_series_results_download_with_make_run_defaults(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A copy of the repository root as far as the node reads it: the model bundles.
    root = tmp_path / "lungnode"
    shutil.copytree(ROOT / "models", root / "models")
    monkeypatch.chdir(root)
    settings = make_settings(
        storage_dir="storage",
        models_dir="models",
        model="lung-ct-demo",
        admin_password=PASSWORD,
        min_series_slices=5,
        series_quiet_seconds=2.0,
    )
    assert settings.storage_dir == root / "storage"
    node = start_node(settings, analyse=True)
    assert store_all(node.scp.port, make_ct_series(6, rows=64, columns=64)) == [0] * 6
    job = finished_job(node)
    assert job.state == "done", job.reason

    with node.sessions() as session:
        prediction = session.scalars(select(Prediction)).one()
        stored = [prediction.report_path, prediction.heatmap_path]
        stored += list(session.scalars(select(Instance.path)))
        stored += list(session.scalars(select(Delivery.path)))
    assert all(value and not Path(value).is_absolute() for value in stored), stored
    assert all((root / "storage" / value).exists() for value in stored if value)
    # The model's identity is kept on the row (the bundled model is synthetic).
    assert prediction.model_name == "lung-ct-demo" and prediction.model_synthetic is True

    base = f"http://127.0.0.1:{node.http_port}/api/v1"
    login = requests.post(
        f"{base}/auth/login", json={"username": "admin", "password": PASSWORD}, timeout=30
    )
    assert login.status_code == 200, login.text
    headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    detail = requests.get(f"{base}/history/{prediction.id}", headers=headers, timeout=30)
    assert detail.status_code == 200, detail.text
    assert detail.json()["model"]["synthetic"] is True
    urls = detail.json()["heatmap_urls"]
    assert urls
    for url in urls:
        heatmap = requests.get(
            f"http://127.0.0.1:{node.http_port}{url}", headers=headers, timeout=30
        )
        assert heatmap.status_code == 200, heatmap.text
        assert heatmap.content.startswith(b"\x89PNG")
    report = requests.get(f"{base}/download/{prediction.id}", headers=headers, timeout=60)
    assert report.status_code == 200, report.text
    # The report the job wrote, not one rebuilt on demand.
    assert report.content == (root / "storage" / str(prediction.report_path)).read_bytes()
