"""The loop a radiologist sees: Orthanc routes a study to lungnode, and the
Secondary Capture heatmaps, the Parametric Map, the PDF report, the SR
(Comprehensive 3D) and the Key Object Selection come back into the same study
in Orthanc, each valid, and Orthanc commits them (Storage Commitment). Uses the
bundled demo model."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Delivery, Job, Prediction
from tests.conftest import require_tool
from tests.pacs import ORTHANC_AE, Orthanc, free_port
from tests.support.synthetic import make_ct_series, write_series

SC = "1.2.840.10008.5.1.4.1.1.7"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture
def lungnode_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, lungnode_port: int) -> Iterator[Orthanc]:
    server = Orthanc(
        require_tool("Orthanc"),
        tmp_path / "orthanc",
        {"lungnode": ["LUNGNODE", "127.0.0.1", lungnode_port]},
    )
    server.start()
    yield server
    server.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_results_come_back_into_the_same_study(
    orthanc: Orthanc,
    lungnode_port: int,
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tmp_path: Path,
) -> None:
    settings = make_settings(
        dicom_port=lungnode_port,
        peers=f"orthanc={ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}",
        model="lung-ct-demo",
        delivery_retry_base_seconds=0.5,
        commit_peers="orthanc",
    )
    node = start_node(settings, analyse=True, serve_http=False)
    source = write_series(make_ct_series(16, rows=256, columns=256), tmp_path / "source")
    for path in source:
        orthanc.upload(path)
    (study,) = orthanc.get("/studies")
    study_uid = orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
    # What an auto-routing rule does: Orthanc C-STOREs the study to lungnode.
    orthanc.post("/modalities/lungnode/store", study)

    def results_arrived() -> bool:
        with node.sessions() as session:
            failed = session.scalars(select(Job).where(Job.state == "failed")).first()
            assert failed is None, f"job failed: {failed.reason if failed else ''}"
        # CT + SC + PM + PDF + SR + KOS
        return len(orthanc.get(f"/studies/{study}/series")) >= 6

    wait_until(results_arrived, timeout=240, what="results in Orthanc")

    def all_committed() -> bool:
        with node.sessions() as session:
            states = {d.state for d in session.scalars(select(Delivery))}
        return bool(states) and states <= {"committed", "dead"}

    wait_until(all_committed, timeout=120, what="Orthanc's storage commitment reports")
    classes: dict[str, int] = {}
    files = []
    for series in orthanc.get(f"/studies/{study}/series"):
        for instance in orthanc.get(f"/series/{series['ID']}/instances"):
            target = tmp_path / "back" / f"{instance['ID']}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(
                f"{orthanc.url}/instances/{instance['ID']}/file", timeout=30
            ) as response:
                target.write_bytes(response.read())
            dataset = dcmread(target)
            assert dataset.StudyInstanceUID == study_uid
            classes[str(dataset.SOPClassUID)] = classes.get(str(dataset.SOPClassUID), 0) + 1
            if str(dataset.SOPClassUID) != "1.2.840.10008.5.1.4.1.1.2":
                files.append(target)
    assert classes["1.2.840.10008.5.1.4.1.1.2"] == 16
    assert classes[PDF] == 1 and classes[COMPREHENSIVE_3D_SR] == 1
    assert classes[PARAMETRIC_MAP] == 1 and classes[KEY_OBJECT_SELECTION] == 1
    assert 1 <= classes[SC] <= 4
    dciodvfy = require_tool("dciodvfy")
    for path in files:
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in report.stderr.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
    with node.sessions() as session:
        assert [j.state for j in session.scalars(select(Job))] == ["done"]
        # Orthanc confirmed every object by Storage Commitment (N-EVENT-REPORT).
        deliveries = list(session.scalars(select(Delivery)))
        assert {d.state for d in deliveries} == {"committed"}, [d.last_error for d in deliveries]
        assert all(d.commit_transaction_uid for d in deliveries)
        prediction = session.scalars(select(Prediction)).one()
        assert prediction.source == "dicom" and prediction.model_name == "lung-ct-demo"
        assert prediction.study_instance_uid == study_uid
