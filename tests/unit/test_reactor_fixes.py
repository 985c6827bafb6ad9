"""Fixes of ``dicom.reactor`` that need no node: the reactor checkpoint is a barrier
(a send never loses its response to the association's own thread), reads are
acknowledged at once, a socket another thread closed is closed quietly, a peer
without a Maximum Length gets the default PDU size, and an N-EVENT-REPORT served
on its own thread does not undo a pause."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from lungnode.dicom import reactor
from lungnode.dicom.commitment import STORAGE_COMMITMENT_INSTANCE as PUSH_MODEL_INSTANCE
from lungnode.dicom.commitment import STORAGE_COMMITMENT_PUSH_MODEL as PUSH_MODEL
from tests.dicom.helpers import wait_until
from tests.ports import free_port


def _association() -> Any:
    assert reactor.install()
    assoc: Any = Association(AE(), mode="requestor")
    assert isinstance(assoc._reactor_checkpoint, reactor.Checkpoint)
    return assoc


def _take_on_association_thread(assoc: Any) -> object:
    """What ``get_msg(block=False)`` returns on the association's own thread."""
    taken: list[object] = []
    assoc.run = lambda: taken.append(assoc.dimse.get_msg(block=False))
    assoc.start()
    assoc.join(5)
    return taken[0]


def test_the_association_thread_takes_nothing_while_a_send_holds_the_checkpoint() -> None:
    response = (1, "C-STORE-RSP")
    running = _association()
    running.dimse.msg_queue.put(response)
    assert _take_on_association_thread(running) == response  # not paused: it serves

    paused = _association()
    paused.dimse.msg_queue.put(response)
    paused._reactor_checkpoint.clear()  # a send pauses the reactor
    assert _take_on_association_thread(paused) == (None, None)
    assert paused.dimse.get_msg(block=True) == response  # the send gets its response


def test_a_pause_waits_for_a_take_under_way() -> None:
    checkpoint = _association()._reactor_checkpoint
    cleared = threading.Event()
    with checkpoint.taking:  # the association's thread is taking a message

        def pause() -> None:
            checkpoint.clear()
            cleared.set()

        pauser = threading.Thread(target=pause)
        pauser.start()
        time.sleep(0.2)
        assert not cleared.is_set()
    pauser.join(5)
    assert cleared.is_set() and not checkpoint.is_set()


def test_the_node_acknowledges_what_it_reads_at_once_and_sends_without_nagle() -> None:
    """A DCMTK peer leaves Nagle on: its response waited ~40 ms for our delayed ACK."""
    import socket

    from pynetdicom.transport import AddressInformation, AssociationSocket

    assoc = _association()
    transport = AssociationSocket(assoc, address=AddressInformation("127.0.0.1", 0))
    created = transport.socket
    assert created is not None
    try:
        assert created.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        created.close()

    class Recording:
        """The accepted socket, noting the options set on it."""

        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock
            self.options: list[tuple[int, int, int]] = []

        def recv(self, size: int) -> bytes:
            return self.sock.recv(size)

        def setsockopt(self, level: int, option: int, value: int) -> None:
            self.options.append((level, option, value))
            self.sock.setsockopt(level, option, value)

    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        accepted, _address = server.accept()
        try:
            recording = Recording(accepted)
            transport.socket = recording  # type: ignore[assignment]
            peer.sendall(b"\x04\x00\x00\x00\x00\x02ok")
            assert bytes(transport.recv(8)) == b"\x04\x00\x00\x00\x00\x02ok"
            # Acknowledged at once after the read, not after the delayed-ACK timer.
            assert recording.options == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]
        finally:
            accepted.close()
            peer.close()


def test_closing_a_socket_the_other_thread_closed_is_quiet() -> None:
    """Both of an association's threads may close its transport (found by the long
    network fuzz run: the second close raised in the DUL thread)."""
    from pynetdicom.transport import AddressInformation, AssociationSocket

    transport = AssociationSocket(_association(), address=AddressInformation("127.0.0.1", 0))
    first = transport.socket
    assert first is not None
    first.close()
    transport.socket = None  # what the first close of a connected transport leaves
    transport._shutdown_socket()  # the other thread's close, after the first
    transport.close()


def test_a_peer_that_sent_no_maximum_length_gets_the_default_pdu_size() -> None:
    """Its responses failed to encode (found by the long raw-PDU fuzz run)."""
    from pynetdicom._globals import DEFAULT_MAX_LENGTH
    from pynetdicom.pdu_primitives import MaximumLengthNotification

    assert reactor.install()
    assoc: Any = Association(AE(), mode="acceptor")
    assoc.requestor._user_info = [
        item
        for item in assoc.requestor._user_info
        if not isinstance(item, MaximumLengthNotification)
    ]
    assert assoc.requestor.maximum_length is None
    assert assoc.dimse.maximum_pdu_size == DEFAULT_MAX_LENGTH


def _waiting_at_checkpoint(assoc: Any) -> bool:
    """The association's thread is blocked in its reactor's checkpoint wait."""
    frame = sys._current_frames().get(assoc.ident)
    if frame is None or frame.f_code.co_name != "wait":
        return False
    while frame is not None and frame.f_code.co_filename == threading.__file__:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_name == "_run_reactor"


def test_a_report_served_on_its_own_thread_does_not_undo_a_pause() -> None:
    """pynetdicom serves an N-EVENT-REPORT on a thread of its own, which lowered the
    paused flag when it was done: a pause made meanwhile was undone, and the release
    that waited for it never ended (CI: a commitment report on the requesting
    association, then the node's release of it)."""
    assert reactor.install()
    serving = threading.Event()
    done_serving = threading.Event()
    side_threads: list[threading.Thread] = []

    def on_report(event: evt.Event) -> tuple[int, None]:
        side_threads.append(threading.current_thread())
        serving.set()
        done_serving.wait(10)
        return 0x0000, None

    def report_soon(event: evt.Event) -> None:
        def report() -> None:
            time.sleep(0.2)  # once the requestor's reactor runs
            information = Dataset()
            information.TransactionUID = generate_uid()
            information.ReferencedSOPSequence = []
            event.assoc.send_n_event_report(information, 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)

        threading.Thread(target=report, daemon=True).start()

    peer = AE(ae_title="REPORTER")
    peer.add_supported_context(PUSH_MODEL)
    port = free_port()
    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_ESTABLISHED, report_soon)]
    )
    try:
        requestor = AE(ae_title="NODE")
        requestor.add_requested_context(PUSH_MODEL)
        assoc: Any = requestor.associate(
            "127.0.0.1",
            port,
            ae_title="REPORTER",
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )
        assert assoc.is_established
        assert serving.wait(10)  # the report is being served on its own thread
        assert side_threads[0] is not assoc

        assoc._reactor_checkpoint.clear()  # a send or release pauses the reactor
        assert wait_until(lambda: _waiting_at_checkpoint(assoc), timeout=5)
        done_serving.set()
        side_threads[0].join(5)  # the side thread has answered and is done

        assert assoc._is_paused  # still paused: a waiting send or release goes on
        assoc._reactor_checkpoint.set()
        assoc.release()
        assert assoc.is_released
    finally:
        done_serving.set()
        server.shutdown()
