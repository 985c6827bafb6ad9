"""Results arrive in the PACS exactly once, whatever kills the node.

``lungnode serve`` runs as a subprocess with the bundled model and Orthanc as
its peer. It is killed with SIGKILL while a job runs, and again while results
wait to be sent; after each restart every result reaches Orthanc, and the
number of instances in the study is exactly the source plus one set of results.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Databases, execute, query, require_tool
from tests.dicom.helpers import wait_until
from tests.pacs import ORTHANC_AE, Orthanc, free_port
from tests.support.synthetic import make_ct_series, write_series

ROOT = Path(__file__).resolve().parents[2]
LUNGNODE = Path(sys.executable).with_name("lungnode")
N_SLICES = 12


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Node:
    def __init__(
        self, tmp_path: Path, orthanc: Orthanc, dicom_port: int, databases: Databases
    ) -> None:
        self.tmp_path = tmp_path
        self.storage = tmp_path / "storage"
        self.database = databases.url(self.storage)
        self.dicom_port = dicom_port
        self.process: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "LUNGNODE_CONFIG": str(tmp_path / "no-config.toml"),
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_STORAGE_DIR": str(self.storage),
            "LUNGNODE_DICOM_HOST": "127.0.0.1",
            "LUNGNODE_DICOM_PORT": str(dicom_port),
            "LUNGNODE_HTTP_PORT": str(free_port()),
            "LUNGNODE_PEERS": f"orthanc={ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_SERIES_QUIET_SECONDS": "3",
            "LUNGNODE_SERIES_GRACE_SECONDS": "0.5",
            "LUNGNODE_SERIES_CHECK_INTERVAL": "0.1",
            "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
            "LUNGNODE_DELIVERY_RETRY_BASE_SECONDS": "0.5",
            "LUNGNODE_DELIVERY_RETRY_CAP_SECONDS": "2",
            "LUNGNODE_DELIVERY_CHECK_INTERVAL": "0.2",
            "LUNGNODE_DELIVERY_TIMEOUT": "10",
            **databases.env(self.storage),
        }
        self.runs = 0

    def start(self) -> None:
        log = self.tmp_path / f"serve-{self.runs}.log"
        self.runs += 1
        with log.open("wb") as stream:
            self.process = subprocess.Popen(
                [str(LUNGNODE), "serve"],
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.tmp_path,
            )
        assert wait_until(lambda: _port_open(self.dicom_port), timeout=90, step=0.2), log.read_text(
            errors="replace"
        )

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        """Rows of the node's database; none before it is migrated."""
        return query(self.database, sql)

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("serve-*.log"))
        )


@pytest.fixture
def setup(tmp_path: Path, databases: Databases) -> Iterator[tuple[Orthanc, Node]]:
    port = free_port()
    orthanc = Orthanc(
        require_tool("Orthanc"), tmp_path / "orthanc", {"lungnode": ["LUNGNODE", "127.0.0.1", port]}
    )
    orthanc.start()
    node = Node(tmp_path, orthanc, port, databases)
    yield orthanc, node
    node.stop()
    orthanc.stop()


def _study_instances(orthanc: Orthanc, study: str) -> list[str]:
    return [i["ID"] for i in orthanc.get(f"/studies/{study}/instances")]


@pytest.mark.slow
def test_kill_during_job_and_during_sending(setup: tuple[Orthanc, Node], tmp_path: Path) -> None:
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
