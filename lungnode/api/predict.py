"""``POST /predict`` and ``POST /batch-predict``: ad-hoc analysis of single images.

Each image goes through the same analysis engine as a DICOM series
(``pipeline.analyze``). The model loads on the first prediction, not at
import. A prediction is a ``Prediction`` row (source ``upload``) owned by the
caller, with its Grad-CAM overlays as PNGs under
``<storage_dir>/heatmaps/<prediction_id>/<n>.png``. The row keeps the paths
relative to ``storage_dir`` and the model's whole identity, as it was when the
prediction was made: the answer, the history and the report all read it there.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from apiflask import APIBlueprint
from flask import request
from marshmallow import ValidationError
from werkzeug.datastructures import FileStorage

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.errors import APIError
from lungnode.api.schemas import (
    BatchIn,
    BatchJSONIn,
    BatchOut,
    PredictIn,
    PredictionOut,
    PredictJSONIn,
)
from lungnode.api.uploads import StoredUpload, find_upload, remove_tree, store_upload
from lungnode.db.models import AuditEvent, BatchPrediction, Prediction, Role, utcnow
from lungnode.errors import BundleError, NotCTError

if TYPE_CHECKING:
    from lungnode.domain import HUVolume

logger = logging.getLogger(__name__)

predict_blueprint = APIBlueprint("predict", __name__, tag="predictions")

_PREDICT_ERRORS = {
    400: "Malformed request",
    404: "Unknown file_id",
    413: "File too large",
    415: "Not a PNG, JPEG or DICOM image",
    429: "Rate limited",
    503: "Model unavailable",
}


#: Smallest rows and columns analysed; smaller pictures are no CT slice (and the
#: heatmap legend would not fit).
MIN_SIDE = 32


def _decode(upload: StoredUpload) -> HUVolume:
    """The upload as a HU volume: a picture is read in the lung window, DICOM keeps its HU.

    DICOM must be a CT image in HU, by the rule every route applies
    (``dicom.modality``); anything else answers 422 ``not_ct`` before decoding.
    """
    try:
        if upload.kind == "DICOM":
            from lungnode.dicom.decode import load_image
            from lungnode.dicom.modality import require_ct_file

            try:
                require_ct_file(upload.path, name="")
            except NotCTError as exc:
                raise APIError(422, "not_ct", str(exc), {"modality": exc.modality}) from exc
            volume = load_image(upload.path)
        else:
            from lungnode.pipeline.analyze import load_picture

            volume = load_picture(upload.path)
    except ValueError as exc:  # DecodeError is a ValueError
        raise APIError(422, "unreadable_image", f"the image cannot be decoded: {exc}") from exc
    rows, columns = volume.hu.shape[1:]
    if min(rows, columns) < MIN_SIDE:
        raise APIError(
            422,
            "image_too_small",
            f"the image is {columns}x{rows} pixels; at least {MIN_SIDE}x{MIN_SIDE} is analysed",
        )
    return volume


def model_fields(prediction: Prediction) -> dict[str, Any]:
    """The model's identity as the row recorded it; ``synthetic`` None: not recorded."""
    return {
        "name": prediction.model_name,
        "version": prediction.model_version,
        "sha256": prediction.model_sha256,
        "synthetic": prediction.model_synthetic,
        "trained_on": prediction.model_trained_on,
        "intended_use": prediction.model_intended_use,
    }


def predict_upload(
    upload: StoredUpload, user_id: int, batch_id: int | None = None
) -> dict[str, Any]:
    """Analyse one stored upload, keep the Prediction row and heatmaps, return the answer."""
    from lungnode.imaging.heatmap import overlay, save_png
    from lungnode.pipeline.analyze import analyze_volume

    try:
        bundle = context.model_bundle()
    except BundleError as exc:
        source = context.model_source()
        if source is not None and source.status()["state"] == "warming":
            raise APIError(
                503, "model_warming", "the model is still warming up; retry in a few seconds"
            ) from exc
        logger.error("model bundle unusable: %s", exc)
        raise APIError(503, "model_unavailable", "the model bundle cannot be loaded") from exc
    started = time.perf_counter()
    volume = _decode(upload)
    result = analyze_volume(volume, bundle, with_heatmaps=True)
    if not result.analysed:
        raise APIError(422, "not_analysed", result.not_analysed_reason or "not analysed")
    identity = result.model
    with context.writing() as session:
        prediction = Prediction(
            user_id=user_id,
            batch_id=batch_id,
            source="upload",
            study_instance_uid=upload.study_instance_uid,
            series_instance_uid=upload.series_instance_uid,
            image_path=context.stored_path(upload.path),
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
        directory = context.heatmaps_dir() / str(prediction.id)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for n, (index, heatmap) in enumerate(
                zip(result.key_slices, result.heatmaps, strict=True)
            ):
                save_png(directory / f"{n}.png", overlay(volume.hu[index], heatmap))
        except Exception:
            remove_tree(directory)
            raise
        prediction.heatmap_path = context.stored_path(directory)
        prediction.processing_time = time.perf_counter() - started
        session.add(
            AuditEvent(
                actor=str(user_id),
                action="prediction.create",
                target=str(prediction.id),
                details={"source": "upload", "batch_id": batch_id},
            )
        )
        answer = prediction_answer(prediction, len(result.heatmaps))
    context.metrics().observe_analysis(result.timings_s, answer["processing_time"])
    logger.info(
        "prediction %d: %s in %.3f s",
        answer["prediction_id"],
        result.verdict_text(),
        answer["processing_time"],
    )
    return answer


def prediction_answer(prediction: Prediction, heatmaps: int) -> dict[str, Any]:
    urls = [f"/api/v1/heatmaps/{prediction.id}/{n}.png" for n in range(heatmaps)]
    return {
        "prediction_id": prediction.id,
        "prediction": prediction.prediction_class or "",
        "confidence": prediction.confidence_score,
        "confidence_scores": prediction.all_scores or {},
        "heatmap_url": urls[0] if urls else None,
        "heatmap_urls": urls,
        "report_url": f"/api/v1/download/{prediction.id}",
        "model": model_fields(prediction),
        "processing_time": prediction.processing_time or 0.0,
    }


def _json_body(schema: Any) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = schema.load(request.get_json())
    except ValidationError as exc:
        raise APIError(
            422,
            "validation_error",
            "the request does not match the schema",
            {"json": exc.messages},
        ) from exc
    return loaded


@predict_blueprint.post("/predict")
@roles(Role.ADMIN, Role.RADIOLOGIST)
@predict_blueprint.input(PredictIn, location="form_and_files")
@predict_blueprint.output(PredictionOut, status_code=201)
@predict_blueprint.doc(responses=_PREDICT_ERRORS)
def predict(form_and_files_data: dict[str, Any]) -> dict[str, Any]:
    """Classify one image: a file (multipart), or the file_id of an upload (JSON or form).

    Answers the verdict, all class scores, the heatmap URLs and the model's identity.
    """
    data = _json_body(PredictJSONIn()) if request.is_json else form_and_files_data
    file: FileStorage | None = data.get("file")
    if file is not None and data.get("file_id"):
        raise APIError(422, "validation_error", "give either file or file_id, not both")
    if file is not None:
        upload = store_upload(file)
    elif data.get("file_id"):
        upload = find_upload(data["file_id"])
    else:
        raise APIError(422, "validation_error", "give a file (multipart) or a file_id")
    return predict_upload(upload, the_user().id)


@predict_blueprint.post("/batch-predict")
@roles(Role.ADMIN, Role.RADIOLOGIST)
@predict_blueprint.input(BatchIn, location="form_and_files")
@predict_blueprint.output(BatchOut, status_code=201)
@predict_blueprint.doc(responses=_PREDICT_ERRORS)
def batch_predict(form_and_files_data: dict[str, Any]) -> dict[str, Any]:
    """Classify up to max_batch_size images: file fields (multipart) or file_ids.

    One bad item does not fail the batch: each item has its result or its error.
    """
    data = _json_body(BatchJSONIn()) if request.is_json else form_and_files_data
    files: list[FileStorage] = list(data.get("file") or [])
    file_ids: list[str] = list(data.get("file_ids") or [])
    limit = context.settings().max_batch_size
    count = len(files) + len(file_ids)
    if count == 0 or count > limit:
        raise APIError(
            422,
            "validation_error",
            f"give between 1 and {limit} files or file_ids",
            {"given": count, "max_batch_size": limit},
        )
    user = the_user()
    name = data.get("batch_name") or f"batch {utcnow():%Y-%m-%d %H:%M:%S}"
    with context.writing() as session:
        batch = BatchPrediction(user_id=user.id, batch_name=name, status="running")
        session.add(batch)
        session.flush()
        batch_id = batch.id
    items: list[dict[str, Any]] = []
    sources: list[FileStorage | str] = [*files, *file_ids]
    for index, source in enumerate(sources):
        file_id = source if isinstance(source, str) else None
        try:
            upload = find_upload(source) if isinstance(source, str) else store_upload(source)
            file_id = upload.file_id
            result = predict_upload(upload, user.id, batch_id)
        except APIError as exc:
            if exc.status == 503:
                raise
            error = {"code": exc.code, "message": exc.message, "details": exc.details}
            items.append({"index": index, "file_id": file_id, "ok": False, "error": error})
        else:
            items.append({"index": index, "file_id": file_id, "ok": True, "result": result})
    succeeded = sum(1 for item in items if item["ok"])
    status = "done" if succeeded == len(items) else "partial" if succeeded else "failed"
    with context.writing() as session:
        row = session.get(BatchPrediction, batch_id)
        if row is not None:
            row.status = status
    logger.info("batch %d: %d of %d predicted", batch_id, succeeded, len(items))
    return {"batch_id": batch_id, "batch_name": name, "status": status, "items": items}
