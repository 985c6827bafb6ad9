"""Ad-hoc prediction of one uploaded image, for whichever process runs it.

``POST /predict`` and the synchronous ``/batch-predict`` run it in the API's
process; with ``queue = "celery"`` a worker runs the items of a batch
(``pipeline.batches``). Both get the same rows and files: a ``Prediction``
(source ``upload``) owned by the caller, its Grad-CAM overlays as
``<storage_dir>/heatmaps/<prediction_id>/<n>.png``, paths kept relative to
``storage_dir``, and the model's whole identity as it was when the prediction
was made. Nothing here knows HTTP: a refused image raises
:class:`~lungnode.errors.ImageRefused`, which the API answers with 422 and a
batch item keeps as its error.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import Settings
from lungnode.db.models import AuditEvent, Prediction, utcnow
from lungnode.db.session import write_transaction
from lungnode.errors import ImageRefused, NotCTError

if TYPE_CHECKING:  # TensorFlow: loaded only by whoever loads the bundle
    from lungnode.domain import HUVolume
    from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger(__name__)

#: Smallest rows and columns analysed; smaller pictures are no CT slice (and the
#: heatmap legend would not fit).
MIN_SIDE = 32


@dataclass(frozen=True)
class StoredUpload:
    """An image the API has accepted and stored under ``<storage_dir>/uploads``."""

    file_id: str
    path: Path
    kind: str  # PNG, JPEG or DICOM
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None


@dataclass(frozen=True)
class RecordedPrediction:
    """What was written, for the answer and the metrics."""

    prediction_id: int
    verdict: str
    heatmaps: int
    processing_time: float
    timings_s: dict[str, float] = field(default_factory=dict)


#: Called in the transaction that writes the prediction, after its row has an id;
#: raising rolls the prediction back (a batch item no longer ours).
OnRecord = Callable[[Session, Prediction], None]


def decode_upload(upload: StoredUpload) -> HUVolume:
    """The upload as a HU volume: a picture is read in the lung window, DICOM keeps its HU.

    DICOM must be a CT image in HU, by the rule every route applies
    (``dicom.modality``); anything else is refused (``not_ct``) before decoding.
    """
    try:
        if upload.kind == "DICOM":
            from lungnode.dicom.decode import load_image
            from lungnode.dicom.modality import require_ct_file

            try:
                require_ct_file(upload.path, name="")
            except NotCTError as exc:
                raise ImageRefused("not_ct", str(exc), {"modality": exc.modality}) from exc
            volume = load_image(upload.path)
        else:
            from lungnode.pipeline.analyze import load_picture

            volume = load_picture(upload.path)
    except ValueError as exc:  # DecodeError is a ValueError
        raise ImageRefused("unreadable_image", f"the image cannot be decoded: {exc}") from exc
    rows, columns = volume.hu.shape[1:]
    if min(rows, columns) < MIN_SIDE:
        raise ImageRefused(
            "image_too_small",
            f"the image is {columns}x{rows} pixels; at least {MIN_SIDE}x{MIN_SIDE} is analysed",
        )
    return volume


def predict_upload(
    upload: StoredUpload,
    bundle: ModelBundle,
    settings: Settings,
    sessions: sessionmaker[Session],
    user_id: int | None,
    batch_id: int | None = None,
    on_record: OnRecord | None = None,
    *,
    volume: HUVolume | None = None,
) -> RecordedPrediction:
    """Analyse one stored upload; keep its Prediction row and heatmaps.

    ``volume``: the upload already decoded by ``decode_upload`` (else it is decoded
    here). Raises ``ImageRefused`` for an image that is not analysed. Whatever
    ``on_record`` raises leaves nothing behind: no row, no heatmap.
    """
    from lungnode.imaging.heatmap import overlay, save_png
    from lungnode.pipeline.analyze import analyze_volume

    started = time.perf_counter()
    if volume is None:
        volume = decode_upload(upload)
    result = analyze_volume(volume, bundle, with_heatmaps=True)
    if not result.analysed:
        raise ImageRefused("not_analysed", result.not_analysed_reason or "not analysed")
    identity = result.model
    with write_transaction(sessions) as session:
        prediction = Prediction(
            user_id=user_id,
            batch_id=batch_id,
            source="upload",
            study_instance_uid=upload.study_instance_uid,
            series_instance_uid=upload.series_instance_uid,
            image_path=settings.stored_path(upload.path),
            prediction_class=result.verdict,
            confidence_score=result.confidence,
            all_scores={label: float(score) for label, score in result.class_scores.items()},
            model_name=identity.name,
            model_version=identity.version,
            model_sha256=identity.sha256,
            model_synthetic=identity.synthetic,
            model_intended_use=identity.intended_use,
            model_trained_on=identity.trained_on,
            timestamp=utcnow(),
        )
        session.add(prediction)
        session.flush()
        directory = settings.storage_dir / "heatmaps" / str(prediction.id)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for n, (index, heatmap) in enumerate(
                zip(result.key_slices, result.heatmaps, strict=True)
            ):
                save_png(directory / f"{n}.png", overlay(volume.hu[index], heatmap))
            prediction.heatmap_path = settings.stored_path(directory)
            prediction.processing_time = time.perf_counter() - started
            session.add(
                AuditEvent(
                    actor=str(user_id),
                    action="prediction.create",
                    target=str(prediction.id),
                    details={"source": "upload", "batch_id": batch_id},
                )
            )
            if on_record is not None:
                on_record(session, prediction)
            session.flush()
        except BaseException:
            # Before the rollback: on SQLite the id is free again once it is rolled
            # back, and the next prediction's heatmaps may then go to this folder.
            shutil.rmtree(directory, ignore_errors=True)
            raise
        recorded = RecordedPrediction(
            prediction.id,
            result.verdict_text(),
            len(result.heatmaps),
            prediction.processing_time,
            dict(result.timings_s),
        )
    logger.info(
        "prediction %d: %s in %.3f s",
        recorded.prediction_id,
        recorded.verdict,
        recorded.processing_time,
    )
    return recorded
