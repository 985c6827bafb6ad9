"""pynetdicom reactors with event-driven waits (lungnode.dicom.reactor), over real associations."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.dul import DULServiceProvider
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Association
from lungnode.dicom import reactor
from tests.dicom.helpers import associate, store_all, wait_until
from tests.support.synthetic import make_ct_series


def _database_sockets() -> set[str]:
    """``socket:[inode]`` of this machine's TCP connections to PostgreSQL (port 5432):
    the pool may open one more under load, as it may open SQLite's files."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[2].endswith(":1538"):  # the remote port, in hex
                sockets.add(f"socket:[{fields[9]}]")
    return sockets


def _open_fds() -> int:
    """Pipes and sockets this process holds, less its database connections (those come
    and go with the pool, as SQLite's files do)."""
    database = _database_sockets()
    return sum(1 for t in _fd_targets() if t.startswith(("pipe:", "socket:")) and t not in database)


def _fd_targets() -> list[str]:
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass  # the directory listing's own descriptor
    return sorted(targets)


def test_installed_once_and_only_the_sleeps_change(node: Node) -> None:
    assert reactor.install() and reactor.install()  # the node installed it; idempotent
    for module in (pynetdicom.dul, pynetdicom.association):
        patched = module.time  # type: ignore[attr-defined]
        assert patched is not time and patched.sleep is not time.sleep
        assert patched.monotonic is time.monotonic and patched.time is time.time
    # Wrapped once, not once per install() call: the wrapper wraps pynetdicom's own.
    wrapper = DULServiceProvider.run_reactor
    assert wrapper.__name__ == "run_reactor_with_wake_pipe"
    (cell,) = wrapper.__closure__ or ()
    assert cell.cell_contents.__name__ == "run_reactor"


def test_outside_the_reactors_sleep_is_a_plain_sleep() -> None:
    reactor.install()
    for module in (pynetdicom.dul, pynetdicom.association):
        sleep = module.time.sleep  # type: ignore[attr-defined]
        started = time.monotonic()
        sleep(0.05)  # the main thread is neither a DUL nor an association thread
        assert time.monotonic() - started >= 0.05


def test_many_associations_leave_no_descriptor_or_thread_behind(node: Node) -> None:
    port = node.scp.port
    # Warm up: the first association opens the database and the storage tree.
    assert store_all(port, make_ct_series(1, rows=16, columns=16)) == [0]
    time.sleep(0.5)  # its threads wind down
    fds, threads = _open_fds(), threading.active_count()
    for _ in range(20):
        assert store_all(port, make_ct_series(2, rows=16, columns=16)) == [0, 0]
        assoc = associate(port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.abort()  # an abort as well as releases
    assert wait_until(lambda: threading.active_count() <= threads, timeout=10)
    assert wait_until(lambda: _open_fds() <= fds, timeout=10), (
        _open_fds(),
        fds,
        _fd_targets(),
        [t.name for t in threading.enumerate()],
    )
    # A released association is recorded as released, however quickly the peer
    # closes after our A-RELEASE-RP (the completion rules depend on it).
    with node.sessions() as session:
        outcomes = session.scalars(select(Association.outcome)).all()
    assert outcomes == ["released"] * 21


def test_an_idle_association_still_answers_and_releases(node: Node) -> None:
    assoc = associate(node.scp.port)
    time.sleep(0.3)  # both reactors wait with nothing to do
    assert assoc.send_c_echo().Status == 0x0000
    # Idle longer than _IDLE_AFTER_S: the node's threads now wait up to _IDLE_WAIT_S,
    # and what arrives must still wake them.
    time.sleep(2 * reactor._IDLE_AFTER_S)
    assert assoc.send_c_echo().Status == 0x0000
    time.sleep(2 * reactor._IDLE_AFTER_S)
    started = time.monotonic()
    assoc.release()
    assert assoc.is_released
    assert time.monotonic() - started < 5


def test_idle_associations_cost_the_receiving_process_little_cpu(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """Idle associations once woke their two threads every millisecond: 32 of them
    took about 0.85 CPU-seconds a second. The worker process's CPU time is its own
    (this process also holds the requesting side of every association)."""
    node = start_node(make_settings(ingest_processes=2, max_associations=32), serve_http=False)
    workers = node.ingest_workers
    assert workers is not None
    (pid,) = workers.pids
    held = [associate(node.scp.port) for _ in range(16)]
    try:
        assert all(assoc.is_established for assoc in held)
        assert workers.handed_over()["ingest-1"] >= 6
        time.sleep(2 * reactor._IDLE_AFTER_S)
        before = _cpu_seconds(pid)
        time.sleep(3.0)
        per_second = (_cpu_seconds(pid) - before) / 3.0
        # About 0.2 s/s for 8 associations polling at 1 ms; about 0.03 now.
        assert per_second < 0.1, per_second
    finally:
        for assoc in held:
            assoc.release()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
