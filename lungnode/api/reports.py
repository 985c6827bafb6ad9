"""``GET /download/<prediction_id>``: the PDF report, built on demand when missing.

The report is kept as ``<storage_dir>/reports/<prediction_id>.pdf`` and its
path recorded on the prediction (relative to ``storage_dir``), so a second
download does not rebuild it. A DICOM job's report is the one the job wrote.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from apiflask import APIBlueprint
from flask import Response, send_file

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.history import get_visible, heatmap_files
from lungnode.db.models import Prediction

logger = logging.getLogger(__name__)

reports_blueprint = APIBlueprint("reports", __name__, tag="history")


def _identity(prediction: Prediction) -> Any:
    """The model identity for the report; the bundle's manifest adds what the row lacks."""
    from lungnode.domain import ModelIdentity

    manifest: dict[str, Any] = {}
    try:
        from lungnode.ml.bundle import read_manifest, resolve_bundle_path

        settings = context.settings()
        read = read_manifest(resolve_bundle_path(settings.model, settings.models_dir))
        if read.name == prediction.model_name and read.version == prediction.model_version:
            manifest = read.to_dict()
    except (ValueError, OSError):
        pass
    return ModelIdentity(
        name=prediction.model_name or "unknown",
        version=prediction.model_version or "unknown",
        sha256=prediction.model_sha256 or "",
        intended_use=str(manifest.get("intended_use", "")),
        synthetic=bool(manifest.get("synthetic", False)),
        trained_on=str(manifest.get("trained_on", "")),
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
        model=_identity(prediction),
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
            directory = context.reports_dir()
            directory.mkdir(parents=True, exist_ok=True)
            existing = directory / f"{prediction_id}.pdf"
            partial = existing.with_suffix(".pdf.part")
            partial.write_bytes(pdf)
            os.replace(partial, existing)
            prediction.report_path = context.stored_path(existing)
            logger.info("report for prediction %d built", prediction_id)
    return send_file(
        existing,
        mimetype="application/pdf",
        as_attachment=True,
        download_name=f"lungnode-prediction-{prediction_id}.pdf",
        max_age=0,
    )
