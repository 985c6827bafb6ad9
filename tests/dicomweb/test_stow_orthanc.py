"""Into the node, by a real peer: Orthanc's DICOMweb plugin sends a CT study to
lungnode by STOW-RS (HTTP Basic as a ``sender`` user), and the node stores,
completes and analyses it with the bundled demo model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from lungnode.db.models import Association, Prediction
from tests.conftest import require_tool
from tests.dicom.helpers import finished_job
from tests.dicomweb.conftest import PASSWORD, StowNode, instance_rows
from tests.pacs import Orthanc
from tests.support.synthetic import make_ct_series, write_series


@pytest.mark.slow
@pytest.mark.orthanc
def test_orthanc_sends_a_study_by_stow_and_the_node_analyses_it(
    make_stow_node: Callable[..., StowNode], tmp_path: Path
) -> None:
    executable = require_tool("Orthanc")
    stow_node = make_stow_node(analyse=True, model="lung-ct-demo")
    orthanc = Orthanc(
        executable,
        tmp_path / "orthanc",
        {},
        dicomweb_servers={
            "lungnode": {
                "Url": f"{stow_node.url}/dicomweb/",
                "Username": "sender",
                "Password": PASSWORD,
            }
        },
    )
    orthanc.start()
    try:
        series = make_ct_series(16, rows=256, columns=256)
        for path in write_series(series, tmp_path / "source"):
            orthanc.upload(path)
        (study,) = orthanc.get("/studies")
        orthanc.post("/dicom-web/servers/lungnode/stow", {"Resources": [study]})
    finally:
        orthanc.stop()

    job = finished_job(stow_node.node, timeout=240)
    assert job.state == "done", job.reason
    assert {uid for uid, _ in instance_rows(stow_node.node)} == {
        str(ds.SOPInstanceUID) for ds in series
    }
    with stow_node.node.sessions() as session:
        prediction = session.scalars(select(Prediction)).one()
        assert prediction.series_instance_uid == str(series[0].SeriesInstanceUID)
        senders = session.scalars(select(Association)).all()
        assert {(row.calling_ae, row.outcome) for row in senders} == {("STOW-RS", "released")}
    assert stow_node.leftovers() == []
