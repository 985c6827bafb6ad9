"""pynetdicom reactors with event-driven waits (lungnode.dicom.reactor), over real associations."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.dul import DULServiceProvider
from sqlalchemy import select

from lungnode.app.node import Node
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
    time.sleep(0.3)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released


def test_a_wake_up_the_reactor_takes_is_passed_on_to_a_waiting_send() -> None:
    """A response queued while both the association's reactor and a ``send_*()`` wait
    on its message queue reaches the ``send_*()`` at once.

    ``Queue.put`` wakes one waiter. The reactor's wait took that wake-up and kept it,
    and the ``send_c_store`` waiting in ``get_msg`` slept until its DIMSE timeout:
    about one C-STORE in a few hundred, over one association in the node's own
    process (the disk-full drill's long variant and the outbox), stalled for the
    whole timeout and the association was aborted. pynetdicom pauses the reactor
    during a ``send_*()``, but its pause can race, which is when both wait.
    """
    from pynetdicom import AE

    reactor.install()
    association = pynetdicom.association.Association(AE(), "requestor")
    messages = association.dimse.msg_queue
    stop = threading.Event()

    def reactor_loop() -> None:  # the association thread's sleep, back to back
        while not stop.is_set():
            pynetdicom.association.time.sleep(0.001)  # type: ignore[attr-defined]

    association.run = reactor_loop  # type: ignore[method-assign]
    association.daemon = True
    association.start()
    waiters = messages.not_empty._waiters  # type: ignore[attr-defined]
    latencies: list[float] = []

    def send(got: list[object]) -> None:  # send_c_store's wait for its response
        got.append(messages.get(timeout=3))

    try:
        for number in range(20):
            got: list[object] = []
            assert wait_until(lambda: len(waiters) >= 1, timeout=1, step=0)  # the reactor
            before = len(waiters)
            threading.Thread(target=send, args=(got,)).start()
            # The send waits (behind the reactor's wait), and the response comes at once.
            wait_until(lambda b=before: len(waiters) > b, timeout=0.5, step=0)
            put_at = time.monotonic()
            messages.put((1, f"response {number}"))
            assert wait_until(lambda g=got: bool(g), timeout=5, step=0.001)
            latencies.append(time.monotonic() - put_at)
    finally:
        stop.set()
        association.join(timeout=5)
    assert max(latencies) < 1.0, latencies
