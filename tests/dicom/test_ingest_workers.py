"""Several receiving processes (``ingest_processes``), over real associations.

The node accepts every connection and hands some to a worker process; what
the worker stores must be exactly what the node would have stored, and the
completion timer must hear of the worker's associations.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Association, Instance, Job, Series
from lungnode.dicom import ingest_workers
from lungnode.dicom.scp import SCPConfig
from lungnode.series.assembler import RULE_ASSOCIATION_RELEASED
from tests.dicom.helpers import (
    associate,
    close_dropped,
    process_alive,
    row_count,
    store_all,
    wait_until,
)
from tests.support.synthetic import make_ct_series


@pytest.fixture
def two_process_node(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> Node:
    # A long quiet timer: a series can only complete quickly by its senders' release.
    settings = make_settings(ingest_processes=2, series_quiet_seconds=120.0)
    return start_node(settings, serve_http=False)


def _without_declared_count(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets:
        if "ImagesInAcquisition" in ds:
            del ds.ImagesInAcquisition
    return datasets


def test_four_associations_at_once_are_stored_by_both_processes(two_process_node: Node) -> None:
    node = two_process_node
    assert node.ingest_workers is not None and len(node.ingest_workers.pids) == 1
    datasets = _without_declared_count(make_ct_series(24, rows=64, columns=64))
    statuses: list[list[int]] = [[] for _ in range(4)]
    threads = [
        threading.Thread(
            target=lambda k=k: statuses[k].extend(store_all(node.scp.port, datasets[k::4]))
        )
        for k in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [s.count(0) for s in statuses] == [6, 6, 6, 6]
    assert sum(node.ingest_workers.handed_over().values()) >= 1, "no connection reached a worker"

    # Every instance is a file and a row, whoever received it.
    assert row_count(node, Instance) == 24
    assert len(list(node.settings.incoming_dir.rglob("*.dcm"))) == 24

    def outcomes() -> list[str | None]:
        with node.sessions() as session:
            return [a.outcome for a in session.scalars(select(Association))]

    # A worker records the outcome as its association ends, maybe just after the
    # sender's release has returned.
    assert wait_until(lambda: outcomes() == ["released"] * 4, timeout=10), outcomes()

    # The worker's releases reach the completion timer: one job, by the release rule,
    # long before the quiet timer (120 s) could have completed the series.
    assert wait_until(lambda: row_count(node, Job) == 1, timeout=30)
    with node.sessions() as session:
        series = session.scalars(select(Series)).one()
        job = session.scalars(select(Job)).one()
    assert series.completion_rule == RULE_ASSOCIATION_RELEASED
    assert job.instance_count == 24


def test_workers_exit_with_the_node(
    make_settings: Callable[..., Settings],
) -> None:
    node = Node(make_settings(ingest_processes=3), serve_http=False)
    node.start()
    try:
        assert node.ingest_workers is not None
        pids = node.ingest_workers.pids
        assert len(pids) == 2 and all(process_alive(pid) for pid in pids)
        assert os.getpid() not in pids
        for _ in range(4):  # both workers take turns
            assert store_all(node.scp.port, make_ct_series(1, rows=16, columns=16)) == [0]
    finally:
        node.stop()
    assert wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=15)


def test_a_worker_that_dies_is_restarted_with_back_off(
    two_process_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ingest_workers.__name__)
    node = two_process_node
    workers = node.ingest_workers
    assert workers is not None
    (pid,) = workers.pids
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: "ingest-1 stopped unexpectedly" in caplog.text, timeout=10)
    assert "killed by SIGKILL" in caplog.text and "restarting it in 1 s" in caplog.text
    # Meanwhile the node receives alone.
    assert store_all(node.scp.port, make_ct_series(2, rows=16, columns=16)) == [0, 0]

    # A new worker takes connections again.
    assert wait_until(lambda: workers.pids not in ([], [pid]), timeout=15), caplog.text
    (new_pid,) = workers.pids
    assert process_alive(new_pid)
    before = workers.handed_over()["ingest-1"]
    assert wait_until(
        lambda: (
            store_all(node.scp.port, make_ct_series(1, rows=16, columns=16)) == [0]
            and workers.handed_over()["ingest-1"] > before
        ),
        timeout=30,
    ), caplog.text
    assert "ingest-1 restarted" in caplog.text

    # It died young: the next restart waits twice as long.
    os.kill(new_pid, signal.SIGKILL)
    assert wait_until(lambda: "restarting it in 2 s" in caplog.text, timeout=10), caplog.text


def test_a_worker_stopped_alone_by_sigterm_is_a_warning_and_restarted(
    two_process_node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit code 0 while the node runs: not a crash, but not the node's stop either."""
    monkeypatch.setattr(ingest_workers, "_STOP_GRACE_SECONDS", 0.5, raising=False)
    workers = two_process_node.ingest_workers
    assert workers is not None
    (pid,) = workers.pids
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: workers.pids not in ([], [pid]), timeout=15), caplog.text
    records = [r for r in caplog.records if r.name == ingest_workers.__name__]
    assert [r.levelname for r in records if "ingest-1 exited" in r.getMessage()] == ["WARNING"]
    assert not [r for r in records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
def test_associations_beyond_the_cap_are_rejected_as_transient(
    processes: int, make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """PS3.8 Table 9-21: rejected-transient (2), service-provider presentation (3),
    local limit exceeded (2); the cap holds across the receiving processes."""
    node = start_node(
        make_settings(ingest_processes=processes, max_associations=2), serve_http=False
    )
    held = [associate(node.scp.port) for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        refused = associate(node.scp.port)
        assert refused.is_rejected
        primitive = refused.acceptor.primitive
        assert primitive is not None
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
    finally:
        for assoc in held:
            assoc.release()
    # Capacity comes back once they are released.
    assert wait_until(lambda: associate_and_release(node.scp.port), timeout=10)


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
def test_a_connection_closed_before_its_request_frees_its_slot_at_once(
    processes: int, make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """A peer that connects and closes without an A-ASSOCIATE-RQ (a TCP port check,
    a scanner) must not hold an association slot until ``network_timeout``: pynetdicom
    left the association thread waiting for the request that long (AA-5)."""
    node = start_node(
        make_settings(ingest_processes=processes, max_associations=2, network_timeout=60.0),
        serve_http=False,
    )
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5):
            pass
    # Far sooner than the 60 s timeout, the whole cap is free again.
    assert wait_until(lambda: _all_accepted(node.scp.port, 2), timeout=10, step=0.5)


def _all_accepted(port: int, count: int) -> bool:
    """Open ``count`` associations at once: were all of them accepted?"""
    held = [associate(port) for _ in range(count)]
    try:
        return all(assoc.is_established for assoc in held)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
            else:
                close_dropped(assoc)


def associate_and_release(port: int) -> bool:
    assoc = associate(port)
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


def test_a_new_connection_goes_to_a_worker_before_the_node_when_equally_busy(
    tmp_path: Path,
) -> None:
    """The node's own interpreter also runs the jobs, the pre-scorer and the API: a
    connection goes there only when every worker is busier. (No process is started:
    the choice alone.)"""
    config = ingest_workers.WorkerConfig(
        scp=SCPConfig("LUNGNODE", "127.0.0.1", 0, None),
        database_url="sqlite://",
        incoming_dir=tmp_path,
        storage_dir=tmp_path,
        min_free_bytes=0,
        log_level="WARNING",
    )
    workers = ingest_workers.IngestWorkers(config, 2, lambda: None, lambda *_: None)
    for slot in workers._slots[1:]:
        slot.alive = True
    first, second, third = workers.choose(), workers.choose(), workers.choose()
    assert {first, second} == {1, 2} and third == 0
    assert workers.choose() in (1, 2)  # all equally busy again: a worker
    workers.local_closed()
    assert workers.choose() == 0  # the node is now the least busy
