"""``lungnode serve`` killed in the middle of a series, then restarted.

The promise of the SCP is that 0x0000 means durable: a file that parses and
a database row, whatever happens to the process afterwards. A series cut by a
crash is finished when the sender resends what was not acknowledged, and is
analysed once, complete. A stop by signal is clean and quick.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.conftest import Databases
from tests.dicom.helpers import (
    associate,
    close_dropped,
    process_alive,
    store_or_none,
    wait_until,
)
from tests.serve import ServedNode, port_open
from tests.support.synthetic import make_ct_series

N_SLICES = 150
KILL_AFTER = 60
QUIET_SECONDS = 3.0


@pytest.fixture
def make_node(
    serve_node: Callable[..., ServedNode], tmp_path: Path, databases: Databases
) -> Callable[..., ServedNode]:
    """A node on ``tmp_path/storage`` whose completed series' jobs stay queued."""

    def _make(processes: int = 1) -> ServedNode:
        return serve_node(
            storage=tmp_path / "storage",
            databases=databases,
            series_quiet_seconds=str(QUIET_SECONDS),
            # No analysis workers: a completed series' job stays queued, for the test to see.
            workers="0",
            ingest_processes=str(processes),
        )

    return _make


def _start(node: ServedNode) -> None:
    """Start the node and check that it answers C-ECHO."""
    node.start(timeout=60)
    assoc = associate(node.dicom_port)
    assert assoc.is_established, node.log_text()
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def _store_context(datasets: list[Dataset]) -> list[tuple[str, str]]:
    return [(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)]


@pytest.mark.slow
def test_acknowledged_instances_survive_sigkill(
    make_node: Callable[..., ServedNode], tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    datasets = make_ct_series(N_SLICES, rows=256, columns=256)
    series_uid = str(datasets[0].SeriesInstanceUID)
    study_uid = str(datasets[0].StudyInstanceUID)
    server = make_node()
    _start(server)

    acknowledged: list[str] = []
    assoc = associate(server.dicom_port, _store_context(datasets))
    assert assoc.is_established
    for ds in datasets:
        response = store_or_none(assoc, ds)
        if response is None:
            break  # the association died with the server
        assert response.Status == 0x0000
        acknowledged.append(str(ds.SOPInstanceUID))
        if len(acknowledged) == KILL_AFTER:
            server.kill()
    close_dropped(assoc)
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
    _start(server)
    recorded = {
        str(uid)
        for (uid,) in server.query(
            "SELECT instance.sop_instance_uid FROM instance "
            "JOIN series ON series.id = instance.series_id "
            "WHERE series.series_instance_uid = :uid",
            uid=series_uid,
        )
    }
    assert set(acknowledged) <= recorded
    outcomes = {str(outcome) for (outcome,) in server.query("SELECT outcome FROM association")}
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
        return server.query(
            "SELECT job.state, job.instance_count, job.version FROM job "
            "JOIN series ON series.id = job.series_id "
            "WHERE series.series_instance_uid = :uid",
            uid=series_uid,
        )

    assert wait_until(lambda: bool(jobs()), timeout=QUIET_SECONDS + 15), server.log_text()
    time.sleep(1.0)  # a second, spurious completion would show up here
    assert jobs() == [("queued", N_SLICES, 1)], server.log_text()
    count = server.query(
        "SELECT COUNT(*) FROM instance JOIN series ON series.id = instance.series_id "
        "WHERE series.series_instance_uid = :uid",
        uid=series_uid,
    )
    assert count == [(N_SLICES,)]
    assert len(list((storage / "incoming" / study_uid / series_uid).glob("*.dcm"))) == N_SLICES


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_serve_cleanly(
    make_node: Callable[..., ServedNode], stop_signal: signal.Signals
) -> None:
    server = make_node()
    _start(server)
    started = time.monotonic()
    server.signal(stop_signal)
    assert server.wait(timeout=10) == 0, server.log_text()
    assert time.monotonic() - started < 5.0
    log = server.log_text()
    assert f"received {stop_signal.name}" in log
    assert "DICOM SCP stopped" in log
    assert not port_open(server.dicom_port)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.mark.slow
def test_sigkill_with_two_ingest_processes_leaves_no_worker_and_loses_nothing(
    make_node: Callable[..., ServedNode], tmp_path: Path
) -> None:
    """The node and one worker each run an association; the node is killed.

    The worker stops receiving (its association is aborted) and exits; every
    instance either process acknowledged is on disk and, after a restart on
    the same port, in the database.
    """
    storage = tmp_path / "storage"
    datasets = make_ct_series(40, rows=128, columns=128)
    server = make_node(processes=2)
    _start(server)
    children = _children(server.pid)
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
    server.kill(whole_group=False)  # the worker is left to notice by itself
    # The worker notices that the node is gone and exits by itself, as does
    # multiprocessing's resource tracker.
    assert wait_until(lambda: not any(map(process_alive, children)), timeout=15), server.log_text()
    # Both associations are gone: the node's with it, the worker's aborted.
    for assoc in (first, second):
        for ds in datasets[20:22]:
            response = store_or_none(assoc, ds)
            assert response is None, "a process answered after the node was killed"
        close_dropped(assoc)

    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    for sop_uid in acknowledged:
        path = storage / "incoming" / study_uid / series_uid / f"{sop_uid}.dcm"
        assert path.is_file(), f"acknowledged {sop_uid} is not on disk"

    # Nothing holds the port: the node comes back on it, and knows every instance.
    _start(server)
    recorded = {str(uid) for (uid,) in server.query("SELECT sop_instance_uid FROM instance")}
    assert set(acknowledged) <= recorded
