"""A late instance reopens an analysed series: version 2 names version 1, which it replaces."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

import pytest
from pydicom import dcmread
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Job, Prediction
from tests.conftest import require_tool
from tests.dicom.helpers import finished_job, store_all
from tests.support.synthetic import make_ct_series


def _done_jobs(node: Node, count: int, timeout: float = 180) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        with node.sessions() as session:
            jobs = list(session.scalars(select(Job).order_by(Job.version)))
        if len(jobs) == count and all(job.state in ("done", "failed") for job in jobs):
            return jobs
        assert time.monotonic() < deadline, [(j.version, j.state) for j in jobs]
        time.sleep(0.1)


@pytest.mark.slow
def test_version_two_references_version_one(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    settings = make_settings(model="lung-ct-demo")
    node = start_node(settings, analyse=True, serve_http=False)
    datasets = make_ct_series(6, rows=64, columns=64)
    assert store_all(node.scp.port, datasets) == [0] * 6
    assert finished_job(node).state == "done"
    late = make_ct_series(
        1,
        rows=64,
        columns=64,
        study_uid=str(datasets[0].StudyInstanceUID),
        series_uid=str(datasets[0].SeriesInstanceUID),
        first_instance_number=7,
    )
    late[0].ImagePositionPatient = [
        *[float(v) for v in datasets[-1].ImagePositionPatient[:2]],
        float(datasets[-1].ImagePositionPatient[2]) + 1.25,
    ]
    late[0].ImagesInAcquisition = 7
    assert store_all(node.scp.port, late) == [0]

    first, second = _done_jobs(node, 2)
    assert (first.version, first.state, second.version, second.state) == (1, "done", 2, "done")
    assert first.details is not None and second.details is not None
    assert second.details["supersedes_version"] == 1
    (old_sr,) = [o for o in first.details["outputs"] if o["kind"] == "sr"]
    (new_sr,) = [o for o in second.details["outputs"] if o["kind"] == "sr"]
    assert new_sr["sop_instance_uid"] != old_sr["sop_instance_uid"]

    path = (
        settings.storage_dir
        / "results"
        / str(datasets[0].StudyInstanceUID)
        / new_sr["series_instance_uid"]
        / f"{new_sr['sop_instance_uid']}.dcm"
    )
    sr = dcmread(path)
    (study,) = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == datasets[0].StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old_sr["series_instance_uid"]
    (item,) = series.ReferencedSOPSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (
        old_sr["sop_class_uid"],
        old_sr["sop_instance_uid"],
    )
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any(t.startswith("Replaces analysis version 1 of ") for t in texts), texts

    with node.sessions() as session:
        prediction = session.scalars(select(Prediction).where(Prediction.job_id == second.id)).one()
    pdftotext = shutil.which("pdftotext") or require_tool("pdftotext")
    text = subprocess.run(
        [pdftotext, str(settings.resolve_stored(prediction.report_path)), "-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Analysis version 2." in text and "Replaces analysis version 1" in text
