"""A series the model cannot judge still gets an answer: a PDF and an SR saying why."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest
from pydicom import dcmread
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Delivery, Prediction
from tests.conftest import require_tool
from tests.dicom.helpers import finished_job, store_all
from tests.support.synthetic import make_ct_series


@pytest.mark.slow
def test_too_few_slices_is_answered_not_analysed(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    settings = make_settings(min_series_slices=5, model="lung-ct-demo")
    node = start_node(settings, analyse=True, serve_http=False)
    assert store_all(node.scp.port, make_ct_series(3, rows=64, columns=64)) == [0, 0, 0]
    job = finished_job(node)
    assert job.state == "done", job.reason
    assert job.details is not None and job.details["analysed"] is False
    assert "only 3 slice(s)" in job.details["not_analysed_reason"]
    with node.sessions() as session:
        prediction = session.scalars(select(Prediction)).one()
        deliveries = list(session.scalars(select(Delivery)))
    assert prediction.prediction_class is None and prediction.report_path
    # Only the PDF and the SR: no heatmaps without an analysis. They go back to the sender.
    objects = [dcmread(settings.resolve_stored(d.path)) for d in deliveries]
    assert sorted(str(ds.Modality) for ds in objects) == ["DOC", "SR"]
    assert {d.destination for d in deliveries} == {"scu"}
    sr = next(ds for ds in objects if ds.Modality == "SR")
    texts = [str(item.value) for item in sr.iterall() if item.keyword == "TextValue"]
    assert any("3 slice(s)" in text for text in texts), texts
    pdftotext = shutil.which("pdftotext") or require_tool("pdftotext")
    text = subprocess.run(
        [pdftotext, str(settings.resolve_stored(prediction.report_path)), "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "3 slice(s)" in text and "For Research Use Only" in text
