"""Results out by STOW-RS: a node that receives a CT series by C-STORE sends every
result object (Secondary Capture heatmaps, the Parametric Map, the PDF report, the
SR and the Key Object Selection) to a DICOMweb destination, Orthanc's DICOMweb
plugin, into the source study there; every delivery ends ``done``. Uses the bundled
demo model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Delivery, Job
from tests.conftest import require_tool
from tests.dicom.helpers import store_all
from tests.pacs import Orthanc
from tests.support.synthetic import make_ct_series, write_series

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(require_tool("Orthanc"), tmp_path / "orthanc", {}, dicomweb_servers={})
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
def test_results_go_to_a_dicomweb_destination_in_the_source_study(
    orthanc: Orthanc,
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tmp_path: Path,
) -> None:
    settings = make_settings(
        dicomweb_peers=f"archive={orthanc.dicomweb_url};max_instances=3",
        result_destinations="archive",
        model="lung-ct-demo",
        delivery_retry_base_seconds=0.5,
    )
    node = start_node(settings, analyse=True, serve_http=False)
    series = make_ct_series(16, rows=256, columns=256)
    study_uid = str(series[0].StudyInstanceUID)
    # The PACS holds the study already; the modality sends it to the node too.
    for path in write_series(series, tmp_path / "source"):
        orthanc.upload(path)
    assert store_all(node.scp.port, series) == [0] * 16

    def all_delivered() -> bool:
        with node.sessions() as session:
            failed = session.scalars(select(Job).where(Job.state == "failed")).first()
            assert failed is None, f"job failed: {failed.reason if failed else ''}"
            states = [d.state for d in session.scalars(select(Delivery))]
        assert "dead" not in states
        return bool(states) and set(states) == {"done"}

    wait_until(all_delivered, timeout=300, what="every result delivered by STOW-RS")
    with node.sessions() as session:
        deliveries = list(session.scalars(select(Delivery)))
    assert {(d.destination, d.last_status, d.last_error) for d in deliveries} == {
        ("archive", 200, None)
    }
    # Each result object is in Orthanc, in the source study, with its SOP class.
    in_study = orthanc.study_objects(study_uid)
    assert {d.sop_instance_uid: d.sop_class_uid for d in deliveries}.items() <= in_study.items()
    classes = list(in_study.values())
    assert classes.count(CT) == 16
    assert classes.count(PDF) == classes.count(COMPREHENSIVE_3D_SR) == 1
    assert classes.count(PARAMETRIC_MAP) == classes.count(KEY_OBJECT_SELECTION) == 1
    assert 1 <= classes.count(SC) <= 4
    assert len(in_study) == 16 + len(deliveries)
    assert len(orthanc.get("/studies")) == 1
