"""``GET /download/<prediction_id>``: the PDF report, built on demand when missing.

The report is kept as ``<storage_dir>/reports/<prediction_id>.pdf`` and its
path recorded on the prediction (relative to ``storage_dir``), so a second
download does not rebuild it. A DICOM job's report is the one the job wrote.

The model's identity comes from the prediction row, recorded when the
prediction was made, never from the bundle on disk today: a bundle changed or
removed since must not change what the report says about the model. A row from
before the identity was recorded (``model_synthetic`` NULL) gets the demo-model
notice and says that the identity was not recorded: a report never claims a
model is not synthetic without knowing it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from apiflask import APIBlueprint
from flask import Response, send_file

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.history import get_visible, heatmap_files
from lungnode.db.models import Prediction
from lungnode.dicom.intake import write_atomically

if TYPE_CHECKING:  # domain brings numpy: imported when a report is built
    from lungnode.domain import ModelIdentity

logger = logging.getLogger(__name__)

reports_blueprint = APIBlueprint("reports", __name__, tag="history")

#: What a report says in place of a model identity the row does not hold.
IDENTITY_NOT_RECORDED = "Model identity not recorded for this prediction"


def recorded_identity(prediction: Prediction) -> ModelIdentity:
    """The model identity the prediction row recorded when it was made.

    Unknown (a row from before the identity was kept) reads as synthetic: the
    report then carries the not-for-diagnostic-use notice, and says why.
    """
    from lungnode.domain import ModelIdentity

    if prediction.model_synthetic is None:
        return ModelIdentity(
            name=prediction.model_name or "unknown",
            version=prediction.model_version or "unknown",
            sha256=prediction.model_sha256 or "",
            intended_use=f"{IDENTITY_NOT_RECORDED}; treat it as not for diagnostic use.",
            synthetic=True,
            trained_on="not recorded",
        )
    return ModelIdentity(
        name=prediction.model_name or "unknown",
        version=prediction.model_version or "unknown",
        sha256=prediction.model_sha256 or "",
        intended_use=prediction.model_intended_use or "",
        synthetic=prediction.model_synthetic,
        trained_on=prediction.model_trained_on or "",
    )


def build_prediction_report(prediction: Prediction) -> bytes:
    """The PDF for a stored prediction, through the report generator (``report.pdf``)."""
    import numpy as np

    from lungnode.domain import AnalysisResult
    from lungnode.report.pdf import KeyImage, ReportInput, StudyFacts, build_report

    scores = {k: float(v) for k, v in (prediction.all_scores or {}).items()}
    result = AnalysisResult(
        verdict=prediction.prediction_class or "",
        confidence=float(prediction.confidence_score or 0.0),
        class_scores=scores,
        slice_scores=np.zeros((0, len(scores)), dtype=np.float32),
        key_slices=[],
        key_slice_refs=[],
        model=recorded_identity(prediction),
        timings_s=(
            {"total": prediction.processing_time} if prediction.processing_time is not None else {}
        ),
        labels=tuple(scores),
    )
    facts = StudyFacts(
        study_instance_uid=prediction.study_instance_uid or "",
        series_instance_uid=prediction.series_instance_uid or "",
    )
    images = [
        KeyImage(path.read_bytes(), f"Key slice {n + 1}")
        for n, path in enumerate(heatmap_files(prediction))
    ]
    return build_report(ReportInput(result=result, facts=facts, key_images=images))


@reports_blueprint.get("/download/<int:prediction_id>")
@roles()
@reports_blueprint.doc(
    responses={  # type: ignore[arg-type]  # APIFlask accepts mixed values
        200: {"description": "PDF report", "content": {"application/pdf": {}}},
        404: "No such prediction (or not yours)",
    }
)
def download(prediction_id: int) -> Response:
    """The prediction's PDF report (verdict, scores, heatmaps, model), built if missing."""
    with context.writing() as session:
        prediction = get_visible(session, prediction_id, the_user())
        existing = context.stored_file(prediction.report_path) if prediction.report_path else None
        if existing is None or not existing.is_file():
            pdf = build_prediction_report(prediction)
            existing = context.reports_dir() / f"{prediction_id}.pdf"
            # A unique temporary name: API processes sharing the storage may build
            # the same report at once; each rename leaves a whole file.
            write_atomically(existing, pdf)
            prediction.report_path = context.stored_path(existing)
            logger.info("report for prediction %d built", prediction_id)
    return send_file(
        existing,
        mimetype="application/pdf",
        as_attachment=True,
        download_name=f"lungnode-prediction-{prediction_id}.pdf",
        max_age=0,
    )
