"""``lungnode serve`` killed in the middle of a series, then restarted.

The promise of the SCP is that 0x0000 means durable: a file that parses and
a database row, whatever happens to the process afterwards. A series cut by a
crash is finished when the sender resends what was not acknowledged, and is
analysed once, complete. A stop by signal is clean and quick.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import SENDER_AE, Databases, query
from tests.dicom.helpers import associate, close_dropped, free_port, process_alive, wait_until
from tests.support.synthetic import make_ct_series

LUNGNODE = Path(sys.executable).with_name("lungnode")
N_SLICES = 150
KILL_AFTER = 60
QUIET_SECONDS = 3.0


@dataclass
class Server:
    """One ``lungnode serve`` process and where it listens and logs."""

    process: subprocess.Popen[bytes]
    dicom_port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def serve(tmp_path: Path, databases: Databases) -> Iterator[Callable[..., Server]]:
    """Start ``lungnode serve`` on a storage folder; every process is gone afterwards."""
    servers: list[Server] = []

    def _start(storage: Path, dicom_port: int | None = None, processes: int = 1) -> Server:
        port = dicom_port or free_port()
        env = {
            **os.environ,
            "LUNGNODE_CONFIG": str(tmp_path / "no-config.toml"),
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_STORAGE_DIR": str(storage),
            "LUNGNODE_DICOM_HOST": "127.0.0.1",
            "LUNGNODE_DICOM_PORT": str(port),
            "LUNGNODE_HTTP_PORT": str(free_port()),
            "LUNGNODE_PEERS": f"scu={SENDER_AE}@127.0.0.1:11119",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_SERIES_QUIET_SECONDS": str(QUIET_SECONDS),
            "LUNGNODE_SERIES_GRACE_SECONDS": "0.5",
            "LUNGNODE_SERIES_CHECK_INTERVAL": "0.1",
            # No analysis workers: a completed series' job stays queued, for the test to see.
            "LUNGNODE_WORKERS": "0",
            "LUNGNODE_INGEST_PROCESSES": str(processes),
            **databases.env(storage),
        }
        log = tmp_path / f"serve-{len(servers)}.log"
        with log.open("wb") as stream:
            process = subprocess.Popen(
                [str(LUNGNODE), "serve"],
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
        server = Server(process, port, log)
        servers.append(server)
        ready = wait_until(
            lambda: process.poll() is not None or _port_open(port), timeout=60, step=0.1
        )
        assert ready and process.poll() is None, f"serve did not start:\n{server.log_text()}"
        assoc = associate(port)
        assert assoc.is_established, server.log_text()
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        return server

    yield _start
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
        server.process.wait(timeout=30)


def _store_context(datasets: list[Dataset]) -> list[tuple[str, str]]:
    return [(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)]


@pytest.mark.slow
def test_acknowledged_instances_survive_sigkill(
    serve: Callable[..., Server], tmp_path: Path, databases: Databases
) -> None:
    storage = tmp_path / "storage"
    database = databases.url(storage)
    datasets = make_ct_series(N_SLICES, rows=256, columns=256)
    series_uid = str(datasets[0].SeriesInstanceUID)
    study_uid = str(datasets[0].StudyInstanceUID)
    server = serve(storage)

    acknowledged: list[str] = []
    assoc = associate(server.dicom_port, _store_context(datasets))
    assert assoc.is_established
    for ds in datasets:
        response = assoc.send_c_store(ds)
        if "Status" not in response:
            break  # the association died with the server
        assert response.Status == 0x0000
        acknowledged.append(str(ds.SOPInstanceUID))
        if len(acknowledged) == KILL_AFTER:
            os.kill(server.process.pid, signal.SIGKILL)
    close_dropped(assoc)
    assert server.process.wait(timeout=10) == -signal.SIGKILL
    # Nothing was acknowledged after the kill: a dead node answers nobody.
    assert len(acknowledged) == KILL_AFTER

    # Acknowledged means on disk, complete, where its UIDs say.
    for sop_uid in acknowledged:
        path = storage / "incoming" / study_uid / series_uid / f"{sop_uid}.dcm"
        assert path.is_file(), f"acknowledged {sop_uid} is not on disk"
        stored = pydicom.dcmread(path)
        assert stored.SOPInstanceUID == sop_uid
        assert len(stored.PixelData) == 256 * 256 * 2

    # Down for longer than the quiet timer: a sender cannot resend meanwhile, so
    # coming back must not complete the cut series with what it has.
    time.sleep(QUIET_SECONDS + 0.5)
    server = serve(storage, dicom_port=server.dicom_port)
    recorded = {
        str(uid)
        for (uid,) in query(
            database,
            "SELECT instance.sop_instance_uid FROM instance "
            "JOIN series ON series.id = instance.series_id "
            "WHERE series.series_instance_uid = :uid",
            uid=series_uid,
        )
    }
    assert set(acknowledged) <= recorded
    outcomes = {str(outcome) for (outcome,) in query(database, "SELECT outcome FROM association")}
    assert outcomes == {"interrupted"}, "the association cut by the kill is not closed"

    # The sender resends what it had no answer for; the node finishes the series.
    remaining = [ds for ds in datasets if str(ds.SOPInstanceUID) not in set(acknowledged)]
    assoc = associate(server.dicom_port, _store_context(remaining))
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in remaining]
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(remaining)

    def jobs() -> list[tuple[object, ...]]:
        return query(
            database,
            "SELECT job.state, job.instance_count, job.version FROM job "
            "JOIN series ON series.id = job.series_id "
            "WHERE series.series_instance_uid = :uid",
            uid=series_uid,
        )

    assert wait_until(lambda: bool(jobs()), timeout=QUIET_SECONDS + 15), server.log_text()
    time.sleep(1.0)  # a second, spurious completion would show up here
    assert jobs() == [("queued", N_SLICES, 1)], server.log_text()
    count = query(
        database,
        "SELECT COUNT(*) FROM instance JOIN series ON series.id = instance.series_id "
        "WHERE series.series_instance_uid = :uid",
        uid=series_uid,
    )
    assert count == [(N_SLICES,)]
    assert len(list((storage / "incoming" / study_uid / series_uid).glob("*.dcm"))) == N_SLICES


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_serve_cleanly(
    serve: Callable[..., Server], tmp_path: Path, stop_signal: signal.Signals
) -> None:
    server = serve(tmp_path / "storage")
    started = time.monotonic()
    server.process.send_signal(stop_signal)
    assert server.process.wait(timeout=10) == 0, server.log_text()
    assert time.monotonic() - started < 5.0
    log = server.log_text()
    assert f"received {stop_signal.name}" in log
    assert "DICOM SCP stopped" in log
    assert not _port_open(server.dicom_port)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.mark.slow
def test_sigkill_with_two_ingest_processes_leaves_no_worker_and_loses_nothing(
    serve: Callable[..., Server], tmp_path: Path, databases: Databases
) -> None:
    """The node and one worker each run an association; the node is killed.

    The worker stops receiving (its association is aborted) and exits; every
    instance either process acknowledged is on disk and, after a restart on
    the same port, in the database.
    """
    storage = tmp_path / "storage"
    datasets = make_ct_series(40, rows=128, columns=128)
    server = serve(storage, processes=2)
    children = _children(server.process.pid)
    workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(workers) == 1, children

    # Two associations open at once: the least busy process takes each, so one
    # runs in the node and one in the worker.
    first = associate(server.dicom_port, _store_context(datasets))
    second = associate(server.dicom_port, _store_context(datasets))
    assert first.is_established and second.is_established
    acknowledged: list[str] = []
    for k, ds in enumerate(datasets[:20]):
        assoc = first if k % 2 == 0 else second
        assert assoc.send_c_store(ds).Status == 0x0000
        acknowledged.append(str(ds.SOPInstanceUID))
    os.kill(server.process.pid, signal.SIGKILL)
    assert server.process.wait(timeout=10) == -signal.SIGKILL
    # The worker notices that the node is gone and exits by itself, as does
    # multiprocessing's resource tracker.
    assert wait_until(lambda: not any(map(process_alive, children)), timeout=15), server.log_text()
    # Both associations are gone: the node's with it, the worker's aborted.
    for assoc in (first, second):
        for ds in datasets[20:22]:
            if assoc.is_established:
                response = assoc.send_c_store(ds)
                assert "Status" not in response, "a process answered after the node was killed"
        close_dropped(assoc)

    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    for sop_uid in acknowledged:
        path = storage / "incoming" / study_uid / series_uid / f"{sop_uid}.dcm"
        assert path.is_file(), f"acknowledged {sop_uid} is not on disk"

    # Nothing holds the port: the node comes back on it, and knows every instance.
    server = serve(storage, dicom_port=server.dicom_port, processes=2)
    recorded = {
        str(uid)
        for (uid,) in query(databases.url(storage), "SELECT sop_instance_uid FROM instance")
    }
    assert set(acknowledged) <= recorded
