"""``POST /predict``: ad-hoc analysis of one image (``api.batches`` has the batches).

Each image goes through the same analysis engine as a DICOM series
(``pipeline.analyze``), by way of ``pipeline.upload_prediction``, which the
workers run too for the items of a queued batch. The model loads on the first
prediction, not at import. A prediction is a ``Prediction`` row (source
``upload``) owned by the caller, with its Grad-CAM overlays as PNGs under
``<storage_dir>/heatmaps/<prediction_id>/<n>.png``. The row keeps the paths
relative to ``storage_dir`` and the model's whole identity, as it was when the
prediction was made: the answer, the history and the report all read it there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from apiflask import APIBlueprint
from flask import request
from marshmallow import ValidationError
from werkzeug.datastructures import FileStorage

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.errors import APIError
from lungnode.api.schemas import PredictIn, PredictionOut, PredictJSONIn
from lungnode.api.uploads import find_upload, store_upload
from lungnode.db.models import Prediction, Role
from lungnode.errors import BundleError, ImageRefused
from lungnode.pipeline import upload_prediction
from lungnode.pipeline.upload_prediction import StoredUpload

if TYPE_CHECKING:
    from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger(__name__)

predict_blueprint = APIBlueprint("predict", __name__, tag="predictions")

PREDICT_ERRORS = {
    400: "Malformed request",
    404: "Unknown file_id",
    413: "File too large",
    415: "Not a PNG, JPEG or DICOM image",
    429: "Rate limited",
    503: "Model unavailable",
}


def model_bundle() -> ModelBundle:
    """The model, or 503: still warming (retry), or unusable."""
    try:
        return context.model_bundle()
    except BundleError as exc:
        source = context.model_source()
        if source is not None and source.status()["state"] == "warming":
            raise APIError(
                503, "model_warming", "the model is still warming up; retry in a few seconds"
            ) from exc
        logger.error("model bundle unusable: %s", exc)
        raise APIError(503, "model_unavailable", "the model bundle cannot be loaded") from exc


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


def predict_upload(upload: StoredUpload, user_id: int) -> dict[str, Any]:
    """Analyse one stored upload, keep the Prediction row and heatmaps, return the answer.

    The image is judged and decoded first: an image that is not analysed (not CT,
    unreadable, too small) answers 422 at once, without waiting for a warming model.
    """
    try:
        volume = upload_prediction.decode_upload(upload)
    except ImageRefused as exc:
        raise APIError(422, exc.code, exc.message, exc.details) from exc
    bundle = model_bundle()
    try:
        recorded = upload_prediction.predict_upload(
            upload, bundle, context.settings(), context.sessions(), user_id, volume=volume
        )
    except ImageRefused as exc:
        raise APIError(422, exc.code, exc.message, exc.details) from exc
    context.metrics().observe_analysis(recorded.timings_s, recorded.processing_time)
    with context.reading() as session:
        prediction = session.get(Prediction, recorded.prediction_id)
        if prediction is None:  # deleted in the meantime by someone who guessed its id
            raise APIError(404, "not_found", f"prediction {recorded.prediction_id} was deleted")
        return prediction_answer(prediction, recorded.heatmaps)


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


def json_body(schema: Any) -> dict[str, Any]:
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
@predict_blueprint.doc(responses=PREDICT_ERRORS)
def predict(form_and_files_data: dict[str, Any]) -> dict[str, Any]:
    """Classify one image: a file (multipart), or the file_id of an upload (JSON or form).

    Answers the verdict, all class scores, the heatmap URLs and the model's identity.
    """
    data = json_body(PredictJSONIn()) if request.is_json else form_and_files_data
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
