"""Files the API serves are found whatever the working directory, and wherever the
storage is mounted: ``storage_dir`` is made absolute when the settings load, and
the database keeps paths relative to it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.api import create_app
from lungnode.config import Settings
from lungnode.db.models import Prediction
from lungnode.db.session import make_engine
from tests.api.conftest import API, png_bytes, upload_form
from tests.conftest import Databases


def _predict(api: API) -> int:
    response = api.client.post(
        "/api/v1/predict",
        data=upload_form(png_bytes(64)),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    return int(response.json["prediction_id"])


def _serves_files(api: API, prediction_id: int) -> bytes:
    """GET the heatmap and the report: both 200. Returns the report."""
    headers = api.headers("radiologist")
    with api.client.get(f"/api/v1/heatmaps/{prediction_id}/0.png", headers=headers) as heatmap:
        assert heatmap.status_code == 200, heatmap.json
        assert heatmap.data.startswith(b"\x89PNG")
    with api.client.get(f"/api/v1/download/{prediction_id}", headers=headers) as report:
        assert report.status_code == 200, report.json
        assert report.data.startswith(b"%PDF")
        return bytes(report.data)


def test_relative_storage_from_another_working_directory(
    make_api: Callable[..., API],
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As under ``make run``: ``storage_dir = "storage"``, relative to the working directory."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    api = make_api(model=str(tiny_bundle), storage_dir=Path("storage"))
    assert api.settings.storage_dir == workdir / "storage"
    prediction_id = _predict(api)
    _serves_files(api, prediction_id)
    assert (workdir / "storage" / "reports" / f"{prediction_id}.pdf").is_file()
    assert (workdir / "storage" / "heatmaps" / str(prediction_id) / "0.png").is_file()
    # A later change of directory changes nothing: the storage was resolved at load.
    monkeypatch.chdir(tmp_path)
    _serves_files(api, prediction_id)


def test_database_keeps_paths_relative_and_storage_can_move(
    make_api: Callable[..., API],
    make_settings: Callable[..., Settings],
    tiny_bundle: Path,
    tmp_path: Path,
    databases: Databases,
) -> None:
    """A shared volume mounted at another path (another host, scaled mode) still serves."""
    first = make_api(model=str(tiny_bundle), storage_dir=tmp_path / "volume")
    prediction_id = _predict(first)
    report = _serves_files(first, prediction_id)
    with first.app.extensions["lungnode"]["sessions"]() as session:
        row = session.scalars(select(Prediction)).one()
        stored = [row.image_path, row.heatmap_path, row.report_path]
    assert all(value and not Path(value).is_absolute() for value in stored), stored
    assert row.report_path == f"reports/{prediction_id}.pdf"
    assert row.heatmap_path == f"heatmaps/{prediction_id}"
    first.app.extensions["lungnode"]["engine"].dispose()

    shutil.move(tmp_path / "volume", tmp_path / "mounted-elsewhere")
    databases.moved(tmp_path / "volume", tmp_path / "mounted-elsewhere")
    # Another node on the same volume (and database), mounted at another path.
    settings = make_settings(model=str(tiny_bundle), storage_dir=tmp_path / "mounted-elsewhere")
    engine = make_engine(settings.effective_database_url)
    try:
        app = create_app(settings, engine=engine)
        moved = API(app, settings, app.test_client(), first.users)
        # The report is served from the moved volume, not rebuilt.
        assert _serves_files(moved, prediction_id) == report
    finally:
        engine.dispose()


def test_rows_with_absolute_paths_still_serve(
    make_api: Callable[..., API], tiny_bundle: Path
) -> None:
    """Rows written before paths were kept relative hold absolute ones: they keep working."""
    api = make_api(model=str(tiny_bundle))
    prediction_id = _predict(api)
    _serves_files(api, prediction_id)
    storage = api.settings.storage_dir
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        row = session.get(Prediction, prediction_id)
        assert row is not None
        row.heatmap_path = str(storage / "heatmaps" / str(prediction_id))
        row.report_path = str(storage / "reports" / f"{prediction_id}.pdf")
        row.image_path = str(storage / row.image_path)  # type: ignore[operator]
    _serves_files(api, prediction_id)
    response = api.client.delete(
        f"/api/v1/history/{prediction_id}", headers=api.headers("radiologist")
    )
    assert response.status_code == 204
    assert not any((storage / "uploads").iterdir())
    assert not (storage / "heatmaps" / str(prediction_id)).exists()
    assert not (storage / "reports" / f"{prediction_id}.pdf").exists()
