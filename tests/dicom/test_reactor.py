"""pynetdicom reactors with event-driven waits (lungnode.dicom.reactor), over real associations."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul
import pytest
from pynetdicom import AE, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Association
from lungnode.dicom import reactor
from tests.conftest import SENDER_AE
from tests.dicom.helpers import associate, capture_stream, free_port, store_all, wait_until
from tests.support.synthetic import make_ct_series, write_series


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


def test_a_connection_gone_before_its_association_request_frees_its_slot(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    """Found by the fuzzing drill: a connection that closed before sending an
    A-ASSOCIATE-RQ (a TCP probe; or one that sent garbage, which the node aborts)
    held an association slot for the whole network timeout (60 s), so that
    ``max_associations`` such connections locked every peer out for that long."""
    node = start_node(make_settings(max_associations=2), serve_http=False)
    assert node.settings.network_timeout >= 60
    for first_bytes in (b"", b"\x00" * 10, b"\x01\x00\x00\x00\x00\x40partial"):
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as probe:
            probe.sendall(first_bytes)
            time.sleep(0.3)  # the node has taken it up as an association
    assert wait_until(lambda: not node.scp.ae.active_associations, timeout=5)
    assoc = associate(node.scp.port)
    assert assoc.is_established, "refused: the slots are still held"
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_peer_that_does_not_wait_for_the_accept_is_aborted_quietly(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzzing drill: a peer that sends its P-DATA before our
    A-ASSOCIATE-AC is aborted (PS3.8 Sta3, Evt10); our accept then reached a state
    machine with no transition for it, and pynetdicom's InvalidEventError ended the
    DUL thread with a traceback, once for every such peer."""
    (path,) = write_series(make_ct_series(1, rows=16, columns=16), tmp_path)
    stream = capture_stream(node.scp.port, path)
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as peer:
            peer.sendall(stream)  # everything at once, without waiting for the accept
            peer.shutdown(socket.SHUT_WR)
            while peer.recv(65536):
                pass  # until the node closes
    assert wait_until(lambda: not node.scp.ae.active_associations, timeout=10)
    assert died == []
    assoc = associate(node.scp.port)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_request_pynetdicom_fails_on_is_aborted_and_frees_its_threads(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzzing drill: an A-ASSOCIATE-RQ whose presentation context item
    lost its abstract syntax (one flipped bit in the item's sub-item type) made
    pynetdicom raise TypeError in the acceptor's thread, which died and left the DUL
    thread and the connection open for as long as the peer kept it."""
    (path,) = write_series(make_ct_series(1, rows=16, columns=16), tmp_path)
    stream = capture_stream(node.scp.port, path)
    request = bytearray(stream[: 6 + int.from_bytes(stream[2:6], "big")])
    # The first presentation context item (0x20), its abstract syntax sub-item (0x30).
    abstract = request.index(b"\x30\x00", request.index(b"\x20\x00", 74))
    request[abstract] ^= 0x20  # 0x30 -> 0x10, an item type no context has
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    threads = threading.active_count()
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as peer:
        peer.sendall(bytes(request))  # and keeps the connection open
        answer = peer.recv(65536)
        assert answer[:1] == b"\x07", answer[:16]  # A-ABORT
        assert wait_until(lambda: threading.active_count() <= threads, timeout=10), [
            t.name for t in threading.enumerate()
        ]
    assert wait_until(lambda: not node.scp.ae.active_associations, timeout=10)
    assert died == []


def test_a_command_set_pynetdicom_fails_on_aborts_the_association(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzzing drill: a C-ECHO command set without Command Data Set Type
    made pynetdicom raise AttributeError while decoding it, in the DUL thread, which
    died with a traceback instead of aborting the association."""
    from pydicom import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    (path,) = write_series(make_ct_series(1, rows=16, columns=16), tmp_path)
    stream = capture_stream(node.scp.port, path)
    request = stream[: 6 + int.from_bytes(stream[2:6], "big")]
    command = Dataset()
    command.AffectedSOPClassUID = "1.2.840.10008.1.1"
    command.CommandField = 0x0030  # C-ECHO-RQ
    command.MessageID = 1  # and no CommandDataSetType
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, command)
    # One PDV: context 1 (Verification, the first proposed), a last command fragment.
    pdv = (2 + len(encoded.getvalue())).to_bytes(4, "big") + b"\x01\x03" + encoded.getvalue()
    p_data = b"\x04\x00" + len(pdv).to_bytes(4, "big") + pdv
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=10) as peer:
        peer.sendall(request)
        assert peer.recv(65536)[:1] == b"\x02"  # A-ASSOCIATE-AC
        peer.sendall(p_data)
        assert peer.recv(65536)[:1] == b"\x07"  # A-ABORT
    assert wait_until(lambda: not node.scp.ae.active_associations, timeout=10)
    assert died == []


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
    # An acceptor: a requestor's reactor sleeps on its own clock (next test).
    association = pynetdicom.association.Association(AE(), "acceptor")
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


def test_pynetdicom_logging_handlers_are_unbound_only_when_their_output_is_dropped() -> None:
    import logging

    from pynetdicom import _config as pynetdicom_config

    pynetdicom_logger = logging.getLogger("pynetdicom")
    level, setting = pynetdicom_logger.level, pynetdicom_config.LOG_HANDLER_LEVEL
    try:
        pynetdicom_config.LOG_HANDLER_LEVEL = "standard"
        pynetdicom_logger.setLevel(logging.DEBUG)  # someone debugging the DICOM traffic
        reactor._quiet_logging_handlers()
        assert pynetdicom_config.LOG_HANDLER_LEVEL == "standard"
        pynetdicom_logger.setLevel(logging.WARNING)  # as the node runs
        reactor._quiet_logging_handlers()
        assert pynetdicom_config.LOG_HANDLER_LEVEL == "none"
    finally:
        pynetdicom_logger.setLevel(level)
        pynetdicom_config.LOG_HANDLER_LEVEL = setting


def test_a_connection_that_fails_leaves_no_socket_open() -> None:
    import gc
    import warnings

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tests.dicom.helpers import free_port

    assert reactor.install()
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            assoc = ae.associate("127.0.0.1", free_port(), ae_title="NOBODY")  # nobody listens
            assert not assoc.is_established
        del assoc
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_a_requestors_reactor_does_not_wait_on_its_message_queue() -> None:
    """A requestor's reactor must not wake with each response (reactor module doc): in
    step with its ``send_*()`` it met pynetdicom's pause race every few hundred stores."""
    from pynetdicom import AE

    reactor.install()
    association = pynetdicom.association.Association(AE(), "requestor")
    waiters = association.dimse.msg_queue.not_empty._waiters  # type: ignore[attr-defined]
    stop = threading.Event()
    seen: list[int] = []

    def reactor_loop() -> None:
        while not stop.is_set():
            pynetdicom.association.time.sleep(0.001)  # type: ignore[attr-defined]

    association.run = reactor_loop  # type: ignore[method-assign]
    association.daemon = True
    association.start()
    try:
        for _ in range(200):
            seen.append(len(waiters))
            time.sleep(0.001)
    finally:
        stop.set()
        association.join(5)
    assert max(seen) == 0


class _CheckedLate(threading.Event):
    """A requestor socket's ``_ready``: its wait returns only once the connection is
    closed again, so the requesting thread checks the socket after the DUL has read
    the answer and acted on it (the order a busy machine gives now and then)."""

    def __init__(self, transport: AssociationSocket) -> None:
        super().__init__()
        self.transport = transport

    def wait(self, timeout: float | None = None) -> bool:
        ready = super().wait(timeout)
        deadline = time.monotonic() + 5
        while self.transport._is_connected and time.monotonic() < deadline:
            time.sleep(0.001)
        return ready


def test_a_rejection_read_before_the_connection_check_is_a_rejection(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pynetdicom's requestor took an A-ASSOCIATE-RJ that its DUL had read (and closed
    the connection on) before the requesting thread checked the connection for an
    abort: once in a few hundred rejections by the lean receiver in CI."""
    node = start_node(make_settings(store_receiver="lean", max_associations=1), serve_http=False)
    held = associate(node.scp.port)
    assert held.is_established
    init = AssociationSocket.__init__

    def init_checked_late(transport: AssociationSocket, *args: object, **kwargs: object) -> None:
        init(transport, *args, **kwargs)  # type: ignore[arg-type]
        if not transport._ready.is_set():  # a requestor's: not connected yet
            transport._ready = _CheckedLate(transport)

    monkeypatch.setattr(AssociationSocket, "__init__", init_checked_late)
    events: list[str] = []
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification)
    try:
        for _ in range(3):
            over = ae.associate(
                "127.0.0.1",
                node.scp.port,
                ae_title="LUNGNODE",
                evt_handlers=[
                    (evt.EVT_REJECTED, lambda event: events.append("rejected")),
                    (evt.EVT_ABORTED, lambda event: events.append("aborted")),
                ],
            )
            assert over.is_rejected and not over.is_aborted
            primitive = over.acceptor.primitive
            assert primitive is not None
            assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 2)
    finally:
        monkeypatch.undo()
        held.release()
    assert events == ["rejected"] * 3
    # Nobody listening: still a failed connection, aborted as before.
    assert associate(free_port()).is_aborted
