"""Fixes of ``dicom.reactor`` that need no node: the reactor checkpoint is a barrier
(a send never loses its response to the association's own thread), reads are
acknowledged at once, and a socket another thread closed is closed quietly."""

from __future__ import annotations

import threading
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

from lungnode.dicom import reactor


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
