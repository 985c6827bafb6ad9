"""Results arrive in the PACS exactly once, whatever kills the node.

``lungnode serve`` runs as a subprocess with the bundled model and Orthanc as
its peer. It is killed with SIGKILL while a job runs, and again while results
wait to be sent; after each restart every result reaches Orthanc, and the
number of instances in the study is exactly the source plus one set of results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Databases, execute, require_tool
from tests.dicom.helpers import wait_until
from tests.pacs import ORTHANC_AE, Orthanc, free_port
from tests.serve import ServedNode
from tests.support.synthetic import make_ct_series, write_series

N_SLICES = 12


@pytest.fixture
def setup(
    tmp_path: Path, databases: Databases, serve_node: Callable[..., ServedNode]
) -> Iterator[tuple[Orthanc, ServedNode]]:
    orthanc_port = free_port()
    node = serve_node(
        storage=tmp_path / "storage",
        databases=databases,
        peers=f"orthanc={ORTHANC_AE}@127.0.0.1:{orthanc_port}",
        series_quiet_seconds="3",
        delivery_retry_base_seconds="0.5",
        delivery_retry_cap_seconds="2",
        delivery_check_interval="0.2",
        delivery_timeout="10",
    )
    orthanc = Orthanc(
        require_tool("Orthanc"),
        tmp_path / "orthanc",
        {"lungnode": ["LUNGNODE", "127.0.0.1", node.dicom_port]},
        dicom_port=orthanc_port,
    )
    orthanc.start()
    yield orthanc, node
    node.stop()
    orthanc.stop()


def _study_instances(orthanc: Orthanc, study: str) -> list[str]:
    return [i["ID"] for i in orthanc.get(f"/studies/{study}/instances")]


@pytest.mark.slow
def test_kill_during_job_and_during_sending(
    setup: tuple[Orthanc, ServedNode], tmp_path: Path
) -> None:
    orthanc, node = setup
    for path in write_series(make_ct_series(N_SLICES, rows=128, columns=128), tmp_path / "src"):
        orthanc.upload(path)
    (study,) = orthanc.get("/studies")
    node.start()
    orthanc.post("/modalities/lungnode/store", study)

    # 1. Killed while the job runs (loading the model, analysing or writing).
    running = wait_until(
        lambda: node.query("SELECT state FROM job") == [("running",)],
        timeout=60,
        step=0.05,
    )
    assert running, node.logs()
    node.kill()
    assert node.query("SELECT state FROM job") == [("running",)]

    # 2. Back up with the PACS down: the job re-runs, its results wait in the outbox.
    orthanc.stop()
    node.start()
    waiting = wait_until(
        lambda: (
            bool(node.query("SELECT id FROM delivery WHERE attempts >= 1"))
            and node.query("SELECT state FROM job") == [("done",)]
        ),
        timeout=120,
        step=0.2,
    )
    assert waiting, node.logs()
    results = node.query("SELECT COUNT(*) FROM delivery")[0][0]
    assert isinstance(results, int) and results >= 3  # SC (1-4), PDF, SR
    node.kill()  # killed while every result is still to be sent

    # 3. The PACS and the node come back: everything arrives, once.
    orthanc.start()
    node.start()
    delivered = wait_until(
        lambda: node.query("SELECT DISTINCT state FROM delivery") == [("done",)],
        timeout=120,
        step=0.2,
    )
    assert delivered, node.logs()
    assert len(_study_instances(orthanc, study)) == N_SLICES + results
    jobs = node.query("SELECT state, version FROM job")
    assert jobs == [("done", 1)], jobs

    # 4. Sending everything again (as after a crash before recording) changes nothing.
    node.stop()
    execute(node.database, "UPDATE delivery SET state = 'pending', next_attempt_at = '2000-01-01'")
    node.start()
    assert wait_until(
        lambda: node.query("SELECT DISTINCT state FROM delivery") == [("done",)],
        timeout=60,
        step=0.2,
    ), node.logs()
    assert len(_study_instances(orthanc, study)) == N_SLICES + results
