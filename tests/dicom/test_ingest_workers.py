"""Several receiving processes (``ingest_processes``), over real associations.

The node accepts every connection and hands some to a worker process; what
the worker stores must be exactly what the node would have stored, and the
completion timer must hear of the worker's associations.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest
from pydicom import Dataset
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Association, Instance, Job, Series
from lungnode.series.assembler import RULE_ASSOCIATION_RELEASED
from tests.dicom.helpers import associate, process_alive, row_count, store_all, wait_until
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

    # Each process records a release once the sender has it (after its A-RELEASE-RP).
    def outcomes() -> list[str | None]:
        with node.sessions() as session:
            return [a.outcome for a in session.scalars(select(Association))]

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


def test_the_node_receives_alone_when_a_worker_dies(
    two_process_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    import signal

    node = two_process_node
    assert node.ingest_workers is not None
    (pid,) = node.ingest_workers.pids
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: "stopped unexpectedly" in caplog.text, timeout=10)
    for _ in range(3):  # every connection now goes to the node itself
        assert store_all(node.scp.port, make_ct_series(2, rows=16, columns=16)) == [0, 0]
    assert row_count(node, Instance) == 6


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


def associate_and_release(port: int) -> bool:
    assoc = associate(port)
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established
