"""``POST /upload``, the upload store, and the cleanup of old uploads.

An upload is kept as ``<storage_dir>/uploads/<uuid>.<ext>``: the name is a
fresh UUID and the extension comes from the content, so a client's file name
never becomes a path. The content decides what the file is: PIL must open it
as PNG or JPEG, or pydicom must read it as DICOM with pixel data. Anything
else answers 415 and leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import IO, Any

from apiflask import APIBlueprint
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import FileStorage

from lungnode.api import context
from lungnode.api.auth import roles
from lungnode.api.errors import APIError
from lungnode.api.schemas import UploadIn, UploadOut
from lungnode.config import Settings
from lungnode.db.models import BatchItem, BatchItemState, Prediction, Role
from lungnode.pipeline.upload_prediction import StoredUpload

logger = logging.getLogger(__name__)

uploads_blueprint = APIBlueprint("uploads", __name__, tag="predictions")

#: Content kind -> stored extension.
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "DICOM": "dcm"}
_FILE_ID = re.compile(r"^[0-9a-f]{32}$")
#: Pictures larger than this many pixels are refused (decompression bombs).
MAX_PIXELS = 64 * 2**20
_NEITHER = "the file is neither a PNG or JPEG image nor a readable DICOM file"


def _sniff_picture(path: Path) -> str | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                kind = image.format
                width, height = image.size
                image.verify()
    except Exception:  # PIL raises many types for a bad file
        return None
    if kind not in ("PNG", "JPEG") or width * height > MAX_PIXELS:
        return None
    return kind


def _sniff_dicom(path: Path) -> tuple[str | None, str | None] | str:
    """The Study and Series Instance UIDs of a DICOM image (None where not a valid
    UID, PS3.5 9.1), or why the file is not a DICOM image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=False, force=False)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return _NEITHER
    except Exception:  # a damaged file can surface any error from the parser
        return _NEITHER
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        sop_class = _sop_class_name(dataset)
        return f"the DICOM file ({sop_class}) has no pixel data: it is not an image"
    # Recorded on the prediction; a value that is no UID (too long for the column,
    # or no digits and dots) is not recorded rather than failing the prediction.
    return (_uid(dataset, "StudyInstanceUID"), _uid(dataset, "SeriesInstanceUID"))


def _uid(dataset: Any, keyword: str) -> str | None:
    from lungnode.dicom.intake import is_valid_uid

    try:
        value = str(dataset.get(keyword) or "")
    except Exception:  # a raw value that does not decode
        return None
    return value if is_valid_uid(value) else None


def _sop_class_name(dataset: Any) -> str:
    from pydicom.uid import UID

    try:
        meta = getattr(dataset, "file_meta", None)
        uid = dataset.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    except Exception:
        uid = None
    return UID(str(uid)).name if uid else "no SOP Class UID"


def _copy_limited(stream: IO[bytes], target: Path, limit: int) -> None:
    written = 0
    with target.open("wb") as out:
        while block := stream.read(1 << 16):
            written += len(block)
            if written > limit:
                raise APIError(
                    413,
                    "payload_too_large",
                    f"the file is larger than {limit // 2**20} MB",
                    {"max_bytes": limit},
                )
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


def store_upload(file: FileStorage) -> StoredUpload:
    """Validate an uploaded file by content and keep it under a fresh UUID."""
    settings = context.settings()
    directory = context.uploads_dir()
    directory.mkdir(parents=True, exist_ok=True)
    file_id = uuid.uuid4().hex
    partial = directory / f".{file_id}.part"
    try:
        _copy_limited(file.stream, partial, settings.max_upload_mb * 2**20)
        study = series = None
        kind = _sniff_picture(partial)
        if kind is None:
            uids = _sniff_dicom(partial)
            if isinstance(uids, str):
                raise APIError(
                    415,
                    "unsupported_media_type",
                    uids,
                    {"accepted": ["png", "jpg", "jpeg", "dcm"]},
                )
            kind, (study, series) = "DICOM", uids
        path = directory / f"{file_id}.{EXTENSIONS[kind]}"
        partial.rename(path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("upload %s stored (%s)", file_id, kind)
    return StoredUpload(file_id, path, kind, study, series)


def find_upload(file_id: str) -> StoredUpload:
    """The stored upload with this id; 404 when there is none (or the id is malformed)."""
    if not _FILE_ID.match(file_id):
        raise APIError(404, "not_found", "no upload with this file_id")
    for kind, extension in EXTENSIONS.items():
        path = context.uploads_dir() / f"{file_id}.{extension}"
        if path.is_file():
            uids = _sniff_dicom(path) if kind == "DICOM" else None
            study, series = uids if isinstance(uids, tuple) else (None, None)
            return StoredUpload(file_id, path, kind, study, series)
    raise APIError(404, "not_found", "no upload with this file_id")


@uploads_blueprint.post("/upload")
@roles(Role.ADMIN, Role.RADIOLOGIST)
@uploads_blueprint.input(UploadIn, location="files")
@uploads_blueprint.output(UploadOut, status_code=201)
@uploads_blueprint.doc(
    responses={413: "File too large", 415: "Not a PNG, JPEG or DICOM image", 429: "Rate limited"}
)
def upload(files_data: dict[str, Any]) -> dict[str, Any]:
    """Keep one image (form field ``file``) for a later ``/predict``."""
    stored = store_upload(files_data["file"])
    return {"file_id": stored.file_id, "message": f"{stored.kind} image stored"}


def delete_stale_uploads(
    settings: Settings, sessions: sessionmaker[Session], now: float | None = None
) -> list[Path]:
    """Delete uploads older than ``upload_retention_hours`` that no prediction refers
    to, and that no batch item still waits to predict.

    Also removes interrupted partial uploads of that age. Returns what was deleted.
    """
    directory = settings.storage_dir / "uploads"
    if not directory.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - settings.upload_retention_hours * 3600
    unfinished = (BatchItemState.PENDING.value, BatchItemState.RUNNING.value)
    with sessions() as session:
        kept = {
            Path(p).name
            for p in session.scalars(
                select(Prediction.image_path).where(Prediction.image_path.is_not(None))
            )
            if p
        } | {
            Path(p).name
            for p in session.scalars(
                select(BatchItem.image_path).where(BatchItem.state.in_(unfinished))
            )
            if p
        }
    deleted: list[Path] = []
    for path in directory.iterdir():
        if path.name in kept or not path.is_file():
            continue
        try:
            if path.stat().st_mtime >= cutoff:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        deleted.append(path)
    if deleted:
        logger.info("cleanup: deleted %d old upload(s)", len(deleted))
    return deleted


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
