"""POST /upload: validation by content, size limit, safe names; the cleanup of old uploads."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lungnode.api import delete_stale_uploads
from lungnode.db.session import make_engine, make_session_factory
from tests.api.conftest import API, dicom_bytes, jpeg_bytes, multipart, png_bytes, upload_form


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("kind", "extension", "filename"),
    [("png", "png", "scan.png"), ("jpeg", "jpg", "scan.jpeg"), ("dicom", "dcm", "IM0001")],
)
def test_upload_is_stored_by_content(
    api: API, tmp_path: Path, kind: str, extension: str, filename: str
) -> None:
    content = {"png": png_bytes, "jpeg": jpeg_bytes}.get(kind, lambda: dicom_bytes(tmp_path))()
    response = api.client.post(
        "/api/v1/upload",
        data=upload_form(content, filename),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    file_id = response.json["file_id"]
    assert len(file_id) == 32 and response.json["message"]
    stored = api.settings.storage_dir / "uploads" / f"{file_id}.{extension}"
    assert stored.read_bytes() == content


@pytest.mark.parametrize(
    "content",
    [
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,  # PNG signature, nothing valid after it
        b"GIF89a" + b"\x00" * 100,
        b"not an image at all",
        b"\x00" * 128 + b"DICM" + b"\x00" * 50,
    ],
)
def test_fake_image_is_415_and_leaves_nothing(api: API, content: bytes) -> None:
    response = api.client.post(
        "/api/v1/upload",
        data=upload_form(content, "fake.png"),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 415
    assert response.json["error"]["code"] == "unsupported_media_type"
    uploads = api.settings.storage_dir / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_wrong_magic_png_is_refused(api: API) -> None:
    png = bytearray(png_bytes())
    png[1:4] = b"XYZ"
    response = api.client.post(
        "/api/v1/upload",
        data=upload_form(bytes(png), "x.png"),
        headers=api.headers("admin"),
        content_type="multipart/form-data",
    )
    assert response.status_code in (400, 415)


def test_too_large_file_is_413(make_api: Callable[..., API]) -> None:
    api = make_api(max_upload_mb=1)
    big = png_bytes(size=1200)  # random pixels barely compress: well over 1 MB
    assert len(big) > 2**20
    response = api.client.post(
        "/api/v1/upload", headers=api.headers("radiologist"), **multipart(big)
    )
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"
    uploads = api.settings.storage_dir / "uploads"
    assert not any(uploads.iterdir())


def test_request_over_the_whole_limit_is_413(make_api: Callable[..., API]) -> None:
    api = make_api(max_upload_mb=1, max_batch_size=1)
    response = api.client.post(
        "/api/v1/upload", headers=api.headers("radiologist"), **multipart(b"\x00" * (3 * 2**20))
    )
    assert response.status_code == 413
    assert set(response.json["error"]) == {"code", "message", "details"}


@pytest.mark.parametrize(
    "filename",
    ["../../../evil.png", "/etc/passwd", "..\\..\\evil.png", "a/../../b.png", "\x00.png"],
)
def test_path_traversal_filename_writes_nothing_outside_storage(
    api: API, tmp_path: Path, filename: str
) -> None:
    before = _all_files(tmp_path)
    response = api.client.post(
        "/api/v1/upload",
        data=upload_form(png_bytes(), filename),
        headers=api.headers("radiologist"),
        content_type="multipart/form-data",
    )
    assert response.status_code == 201
    new = _all_files(tmp_path) - before
    uploads = (api.settings.storage_dir / "uploads").resolve()
    assert [p.resolve().parent for p in new if p.suffix == ".png"] == [uploads]
    assert all(p.resolve().is_relative_to(api.settings.storage_dir.resolve()) for p in new)
    assert not (tmp_path.parent / "evil.png").exists()


def test_upload_errors(api: API) -> None:
    radiologist = api.headers("radiologist")
    missing = api.client.post(
        "/api/v1/upload", data={}, headers=radiologist, content_type="multipart/form-data"
    )
    assert missing.status_code == 422 and "file" in missing.json["error"]["details"]["files"]
    assert api.client.post("/api/v1/upload", data=upload_form(png_bytes())).status_code == 401
    viewer = api.client.post(
        "/api/v1/upload",
        data=upload_form(png_bytes()),
        headers=api.headers("viewer"),
        content_type="multipart/form-data",
    )
    assert viewer.status_code == 403 and viewer.json["error"]["code"] == "forbidden"
    assert api.client.get("/api/v1/upload", headers=radiologist).status_code == 405


def test_cleanup_deletes_only_old_unreferenced_uploads(api: API) -> None:
    ids = []
    for seed in range(3):
        response = api.client.post(
            "/api/v1/upload",
            data=upload_form(png_bytes(seed=seed)),
            headers=api.headers("radiologist"),
            content_type="multipart/form-data",
        )
        ids.append(response.json["file_id"])
    uploads = api.settings.storage_dir / "uploads"
    old, kept_by_prediction, recent = (uploads / f"{i}.png" for i in ids)
    partial = uploads / ".deadbeef.part"
    partial.write_bytes(b"x")
    long_ago = time.time() - 48 * 3600
    for path in (old, kept_by_prediction, partial):
        os.utime(path, (long_ago, long_ago))
    api.add_predictions(1, image_path=str(kept_by_prediction))
    engine = make_engine(api.settings.effective_database_url)
    deleted = delete_stale_uploads(api.settings, make_session_factory(engine))
    engine.dispose()
    assert sorted(deleted) == sorted([old, partial])
    assert kept_by_prediction.exists() and recent.exists() and not old.exists()


def test_cleanup_without_uploads_folder(api: API) -> None:
    engine = make_engine(api.settings.effective_database_url)
    assert delete_stale_uploads(api.settings, make_session_factory(engine)) == []
    engine.dispose()


def test_upload_accepts_stream_in_chunks(api: API) -> None:
    # A body read in several chunks still arrives whole.
    content = png_bytes(size=800)
    response = api.client.post("/api/v1/upload", headers=api.headers("admin"), **multipart(content))
    stored = api.settings.storage_dir / "uploads" / f"{response.json['file_id']}.png"
    assert stored.read_bytes() == content


def test_an_upload_to_a_full_disk_is_507_and_leaves_nothing(
    make_api: Callable[..., API], tmp_path: Path
) -> None:
    """Before, a full disk answered 500 "internal server error", as a bug would."""
    from tests.support.small_disk import fill, small_disk

    with small_disk(tmp_path / "disk", 4) as disk:
        api = make_api(storage_dir=disk / "storage")
        headers = api.headers("radiologist")
        fill(disk / "filler")
        response = api.client.post(
            "/api/v1/upload",
            data=upload_form(png_bytes(256)),
            headers=headers,
            content_type="multipart/form-data",
        )
        assert response.status_code == 507, response.json
        assert response.json["error"]["code"] == "storage_full"
        assert response.headers["Retry-After"] == "60"
        assert _all_files(disk / "storage" / "uploads") == set()
        (disk / "filler").unlink()
        response = api.client.post(
            "/api/v1/upload",
            data=upload_form(png_bytes(256)),
            headers=headers,
            content_type="multipart/form-data",
        )
        assert response.status_code == 201, response.json
        api.app.extensions["lungnode"]["engine"].dispose()
