"""pynetdicom's reactor threads, woken by events instead of fixed sleeps.

Every pynetdicom association runs two polling loops. The DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever it finds nothing to do, and the
association thread sleeps 1 ms before each look for a decoded DIMSE message.
On a C-STORE that means up to three such sleeps per instance: before the
request's PDUs are read, before the handler is called, and before the
response goes out. At a few milliseconds per instance that is a fifth of the
time of a single association (``scripts/bench_ingest.py``). Shorter sleeps
win that back on one association but burn the CPU that several associations
need, so the sleeps become waits that end early on the event they wait for:

- the DUL thread waits for its socket to become readable or for a primitive
  to be queued for sending (the queueing thread writes to a pipe the DUL
  thread watches), at most ``_run_loop_delay`` as before;
- the association thread waits on its DIMSE message queue, at most 1 ms as
  before.

Only those two sleeps change, and only in those threads. While a thread has
seen an event in the last ``_IDLE_AFTER_S`` its upper bound stays
pynetdicom's (1 ms). After that it waits up to ``_IDLE_WAIT_S`` (50 ms): an
idle association otherwise costs its two threads a thousand wake-ups a
second each, and 32 idle associations took most of a core in the receiving
process (``scripts/measure_association_memory.py``). What an idle thread
must still see at once wakes it: a DUL thread its socket, a queued primitive
and a stop (``stop_dul``); an acceptor's association thread a DIMSE message,
and anything its DUL thread was woken for (a release or abort request
arrives on the socket).

A requestor's association thread (the node's SCU, sending results) keeps
pynetdicom's plain 1 ms sleep. Its caller's ``send_*`` pauses it through a
checkpoint and a flag that are not one atomic step: a reactor loop that passed
the checkpoint just before the pause can still take the response off the
queue ("unexpected C-STORE service message"), and the send then waits out its
DIMSE timeout. Woken by the arrival of each response, the loop ran in step
with the sends and met that window every few hundred stores under load;
sleeping on its own clock it meets it as rarely as pynetdicom does.

Besides the waits, nine fixes:

- When a DUL thread ends, whoever waits for a primitive
  from it is told at once (an empty primitive, as when the wait times out). An
  acceptor waits up to the ACSE timeout for the peer's A-ASSOCIATE-RQ, and
  pynetdicom tells it nothing when the connection closes or the DUL aborts first
  (PS3.8 9.2, AA-5 and AA-1 in Sta2 have no indication): every connection that
  closed, or sent something else, before its A-ASSOCIATE-RQ held one of the node's
  ``max_associations`` for ``network_timeout`` (60 s), long after it was gone.

- When the peer breaks the protocol while its association request is being
  answered (a P-DATA before our A-ASSOCIATE-AC, say), the DUL aborts, and our
  answer then reaches a state machine that has no transition for it: pynetdicom
  raised InvalidEventError out of the DUL thread, a traceback for every such
  peer. That one is logged as a warning now; and any other exception out of the
  DUL's loop on a peer's data (a DIMSE command set without Command Data Set Type
  raised AttributeError while decoding) aborts the association, as pynetdicom's
  own guard does for the errors it catches, instead of ending the thread.

- A requestor's socket whose connection failed (the peer is down) was left
  open until garbage-collected: pynetdicom's shutdown of the unconnected
  socket raised, and skipped its close. It is closed now.

- A send on an association could lose its response to the association's own
  thread. pynetdicom pauses that thread for a send with a checkpoint (an Event
  the send clears) and a flag the thread raises before it waits, which are not one
  atomic step: a thread that had just passed the checkpoint could still take the
  response off the DIMSE queue ("Received unexpected C-STORE service message"),
  and the send then waited out its DIMSE timeout. The long fuzz and disk drills
  met it about once in a few thousand stores, on the test's sender and so on the
  node's own sending of results as well. The checkpoint is a barrier now: the
  association's thread takes a message only under the checkpoint's lock and while
  it is set, and clearing it waits for a take under way to end.

- Every C-STORE the node sent waited about 40 ms for its response, whatever its
  size: most of the 60 ms each of a job's objects took to reach Orthanc or DCMTK.
  A DCMTK peer leaves Nagle's algorithm on by default and writes a PDU in two
  pieces, so the second waits until the first is acknowledged, and Linux delays
  that ACK by 40 ms. The node now acknowledges at once what it reads (TCP_QUICKACK
  after each read from an association's socket), and its own sockets are created
  with TCP_NODELAY, so that the same never happens the other way round.

- A send or release could wait forever for a pause that had already happened.
  Each of them pauses the association's thread by clearing the checkpoint and
  then waits for the thread's ``_is_paused`` flag. pynetdicom serves an
  N-EVENT-REPORT request on a thread of its own, which also sets that flag while
  it serves and clears it afterwards; when it cleared the flag after the paused
  association's thread had raised it, the release waited for good (once in about
  ten Storage Commitment reports on the requesting association, in CI). Only the
  association's own thread and ``kill()`` move the flag now: the side thread's
  writes are ignored (:class:`_PausedFlag`).

- A peer whose association request lacks the Maximum Length item (mandatory,
  PS3.7 D.3.3.1) was accepted, and then every response to it failed to encode
  (its maximum PDU length None), logged at ERROR, and the peer got no answer (the
  long raw-PDU fuzz run). Such a peer is now sent PDUs of pynetdicom's default
  maximum (16382 bytes), which every implementation receives.

- An association request that pynetdicom itself fails on (a presentation
  context without an abstract syntax raised TypeError in the negotiation) ended
  the association's thread with the DUL thread and the connection left open; it
  is aborted instead.

- A requestor could take the peer's A-ASSOCIATE-RJ for a failed connection and
  report the association aborted, not rejected. pynetdicom's requesting thread
  waits for the connection attempt to end and then checks that the socket is
  connected; a peer that answers at once (the node's lean receiver rejecting over
  its association limit) can be read, and the transport closed on its rejection
  (PS3.8 9.2, AE-4), by the DUL thread before that check. The check then saw a
  closed socket and aborted: once in a few hundred rejections on a busy machine,
  in CI, and in the API's health probe. A rejection already received is now
  taken as the answer it is (:func:`_taking_early_rejections`).

Installed once per process by :func:`install`; against a pynetdicom whose
internals differ from what this expects, it installs nothing and logs why,
and pynetdicom keeps its own behaviour.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pynetdicom.association as association_module
import pynetdicom.dul as dul_module
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom._globals import DEFAULT_MAX_LENGTH
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket

logger = logging.getLogger(__name__)

#: The association reactor's per-loop sleep in pynetdicom (association.py).
_ASSOCIATION_SLEEP_S = 0.001

#: Seconds without an event after which a reactor thread counts as idle.
_IDLE_AFTER_S = 0.5

#: The longest wait of an idle reactor thread (module docstring).
_IDLE_WAIT_S = 0.05

_lock = threading.Lock()
_installed = False


def install() -> bool:
    """Patch pynetdicom's two reactor sleeps (module docstring); idempotent.

    Returns True when the waits are in place, False when this pynetdicom does
    not look as expected (nothing is changed then).
    """
    global _installed
    with _lock:
        if _installed:
            return True
        expected = (
            getattr(association_module, "time", None) is time
            and getattr(dul_module, "time", None) is time
            and callable(getattr(DULServiceProvider, "run_reactor", None))
            and callable(getattr(DULServiceProvider, "send_pdu", None))
            and callable(getattr(DULServiceProvider, "stop_dul", None))
            and callable(getattr(Association, "run_reactor", None))
            and callable(getattr(DIMSEServiceProvider, "get_msg", None))
            and isinstance(getattr(DIMSEServiceProvider, "maximum_pdu_size", None), property)
            and callable(getattr(AssociationSocket, "_shutdown_socket", None))
            and callable(getattr(AssociationSocket, "_create_socket", None))
            and callable(getattr(ACSE, "_negotiate_as_requestor", None))
            and callable(getattr(Association, "abort", None))
            and callable(getattr(Association, "_serve_request", None))
            and not hasattr(Association, "_is_paused")  # an attribute of each instance
        )
        if not expected:
            logger.warning("reactor waits not installed: unexpected pynetdicom internals")
            return False
        patches: dict[tuple[object, str], object] = {
            (Association, "__init__"): _with_checkpoint(Association.__init__),
            (Association, "_is_paused"): _PausedFlag(Association._serve_request.__code__),
            (DIMSEServiceProvider, "get_msg"): _gated(DIMSEServiceProvider.get_msg),
            (DULServiceProvider, "run_reactor"): _with_wake_pipe(DULServiceProvider.run_reactor),
            (Association, "run_reactor"): _aborting_on_error(Association.run_reactor),
            (DULServiceProvider, "send_pdu"): _waking(DULServiceProvider.send_pdu),
            (DULServiceProvider, "stop_dul"): _waking_first(DULServiceProvider.stop_dul),
            (AssociationSocket, "_shutdown_socket"): _shutdown_and_close,
            (AssociationSocket, "_create_socket"): _without_nagle(AssociationSocket._create_socket),
            (AssociationSocket, "recv"): _acking(AssociationSocket.recv),
            (DIMSEServiceProvider, "maximum_pdu_size"): property(_peer_maximum_pdu_size),
            (ACSE, "_negotiate_as_requestor"): _taking_early_rejections(
                ACSE._negotiate_as_requestor
            ),
            (dul_module, "time"): _time_with_sleep(_dul_sleep),
            (association_module, "time"): _time_with_sleep(_association_sleep),
        }
        for (owner, name), replacement in patches.items():
            setattr(owner, name, replacement)
        _quiet_logging_handlers()
        _installed = True
        logger.debug("pynetdicom reactor waits installed")
        return True


def _quiet_logging_handlers() -> None:
    """Unbind pynetdicom's logging handlers when their messages would be dropped.

    By default every association binds handlers that describe each PDU and DIMSE
    message at INFO and DEBUG: they build the text whatever the log level, and
    the C-STORE one copies the whole received data set to see whether it is
    empty. With pynetdicom's logger below INFO (the node keeps it at WARNING)
    nothing of that is ever written: about a tenth of a received instance's CPU.
    A pynetdicom logger set to INFO or DEBUG (for a session of debugging) keeps
    them, as before.
    """
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"


def _time_with_sleep(sleep: Callable[[float], None]) -> types.ModuleType:
    """The ``time`` module as the patched module sees it: everything as is but ``sleep``."""
    module = types.ModuleType("time", time.__doc__)
    for name in dir(time):
        if not name.startswith("__"):
            setattr(module, name, getattr(time, name))
    module.sleep = sleep  # type: ignore[attr-defined]
    return module


class _WakePipe:
    """A pipe that other threads write to so that one DUL thread wakes up.

    Writing and closing take the same lock: once closed, a descriptor number
    may be reused by any file the process opens next, and a late write must
    never land there.
    """

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write_fd, b"\0")
            except OSError:
                pass  # full: the thread has wake-ups pending anyway

    def drain(self) -> None:
        """Called by the woken thread only."""
        try:
            while os.read(self.read_fd, 512):
                pass
        except OSError:
            pass  # empty (EAGAIN)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.read_fd)
            os.close(self._write_fd)


def _with_wake_pipe(run_reactor: Callable[[Any], None]) -> Callable[[Any], None]:
    def run_reactor_with_wake_pipe(dul: Any) -> None:
        pipe = _WakePipe()
        dul._lungnode_wake = pipe
        dul._lungnode_event_at = time.monotonic()
        try:
            run_reactor(dul)
        except InvalidEventError as exc:
            if dul.state_machine.current_state != "Sta13":
                raise
            # Aborted already (Sta13, awaiting the close): what the association thread
            # does meanwhile (accept or reject the request) has nothing left to do. A
            # peer that sends P-DATA before our A-ASSOCIATE-AC gets here (module doc).
            logger.warning("association aborted on a protocol error of the peer: %s", exc)
        except Exception as exc:
            # pynetdicom failed on the peer's data outside its own guard (module doc):
            # abort as that guard does; the association thread sees the DUL gone.
            logger.warning("association aborted: the peer's data could not be handled: %r", exc)
            _send_abort(dul)
        finally:
            dul._lungnode_wake = None
            pipe.close()
            # Nothing comes after this: end a wait for the A-ASSOCIATE-RQ (module doc).
            # A primitive queued before (an A-ABORT, an A-RELEASE) is still read first.
            dul.to_user_queue.put(None)

    return run_reactor_with_wake_pipe


class Checkpoint(threading.Event):
    """pynetdicom's reactor checkpoint as a barrier (module docstring).

    ``clear()`` (a send pausing the association's thread) returns only once no
    message is being taken by that thread; afterwards it takes none until ``set()``.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Held by the association's thread while it takes a message.
        self.taking = threading.Lock()

    def clear(self) -> None:
        super().clear()
        with self.taking:  # a take under way ends before the pause holds
            pass


class _PausedFlag:
    """``Association._is_paused``, deaf to pynetdicom's N-EVENT-REPORT side thread.

    pynetdicom's ``_serve_request`` raises the flag before a service class runs and
    lowers it afterwards, so that a send made from the handler (on the association's
    own thread) need not wait for a pause. For an N-EVENT-REPORT it runs on a thread
    of its own while the association's thread goes on, and its lowering can undo
    that thread's pause (module docstring). Those two writes, from that code on any
    other thread, are dropped; every other write (the association's thread, and
    ``kill()`` from wherever it is called) is kept.
    """

    def __init__(self, serve_request: types.CodeType) -> None:
        self._serve_request = serve_request

    def __get__(self, assoc: Any, owner: type | None = None) -> Any:
        if assoc is None:
            return self
        return assoc.__dict__.get("_is_paused", False)

    def __set__(self, assoc: Any, paused: bool) -> None:
        if (
            threading.current_thread() is not assoc
            and sys._getframe(1).f_code is self._serve_request
        ):
            return
        assoc.__dict__["_is_paused"] = paused


def _with_checkpoint(init: Callable[..., None]) -> Callable[..., None]:
    def init_with_checkpoint(assoc: Any, *args: Any, **kwargs: Any) -> None:
        init(assoc, *args, **kwargs)
        checkpoint = Checkpoint()
        checkpoint.set()
        assoc._reactor_checkpoint = checkpoint

    return init_with_checkpoint


def _gated(get_msg: Callable[..., Any]) -> Callable[..., Any]:
    def get_msg_unless_paused(dimse: Any, block: bool = False) -> Any:
        assoc = getattr(dimse, "_assoc", None)
        checkpoint = getattr(assoc, "_reactor_checkpoint", None)
        # Only the association's own thread is paused; a send takes its response.
        if block or threading.current_thread() is not assoc:
            return get_msg(dimse, block)
        if not isinstance(checkpoint, Checkpoint):
            return get_msg(dimse, block)
        with checkpoint.taking:
            if not checkpoint.is_set():
                return None, None
            return get_msg(dimse, block)

    return get_msg_unless_paused


def _without_nagle(create: Callable[..., socket.socket]) -> Callable[..., socket.socket]:
    def create_without_nagle(transport: Any, address: Any) -> socket.socket:
        sock = create(transport, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return create_without_nagle


def _acking(recv: Callable[[Any, int], bytearray]) -> Callable[[Any, int], bytearray]:
    def recv_and_ack(transport: Any, nr_bytes: int) -> bytearray:
        data = recv(transport, nr_bytes)
        quick_ack(transport.socket)
        return data

    return recv_and_ack


def quick_ack(sock: Any) -> None:
    """Send the ACK of what was read now, not after the delayed-ACK timer (Linux): a
    peer that leaves Nagle on holds the rest of a PDU until it comes (module docstring)."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)
    except (OSError, ValueError):  # closed meanwhile, or not TCP
        pass


def _peer_maximum_pdu_size(dimse: Any) -> int:
    """The peer's maximum PDU length; pynetdicom's default when it sent none."""
    assoc = dimse.assoc
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    length = peer.maximum_length
    return DEFAULT_MAX_LENGTH if length is None else int(length)


def _send_abort(dul: Any) -> None:
    """An A-ABORT (service provider, reason not specified, PS3.8 9.3.8) to the peer."""
    abort = A_ABORT_RQ()
    abort.source = 0x02
    abort.reason_diagnostic = 0x00
    try:
        dul.socket.send(abort.encode())
    except Exception:  # the connection is gone: nothing to tell
        logger.debug("A-ABORT not sent", exc_info=True)
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False


def _aborting_on_error(run_reactor: Callable[[Any], None]) -> Callable[[Any], None]:
    def run_reactor_aborting_on_error(assoc: Any) -> None:
        try:
            run_reactor(assoc)
        except Exception as exc:
            # A request pynetdicom cannot negotiate (module doc): abort it, free the DUL
            # thread and the connection, rather than let the thread die with them held.
            logger.warning("association aborted: its request could not be handled: %r", exc)
            try:
                assoc.abort()
            finally:
                transport = getattr(assoc.dul, "socket", None)
                sock = getattr(transport, "socket", None)
                server = getattr(assoc, "_server", None)
                if server is not None and sock is not None:
                    server.shutdown_request(sock)

    return run_reactor_aborting_on_error


def _taking_early_rejections(negotiate: Callable[[Any], None]) -> Callable[[Any], None]:
    """pynetdicom's requestor negotiation, reading a rejection that came before its
    connection check (module docstring).

    The only thing that negotiation does when the check fails is ``assoc.abort()``;
    during it, that abort first looks at what the DUL has queued for the requestor.
    An A-ASSOCIATE-RJ there means the connection was made and answered: the
    association is rejected, as pynetdicom's negotiation would have found it had it
    looked a moment sooner. Otherwise (the connection failed, or an ACSE timeout)
    it aborts as before.
    """

    def negotiate_as_requestor(acse: Any) -> None:
        assoc = acse.assoc

        def abort_unless_rejected(block: bool = True) -> None:
            rejected = _queued_rejection(assoc.dul)
            if rejected is None:
                Association.abort(assoc, block)
                return
            _reject(assoc, rejected)

        assoc.abort = abort_unless_rejected
        try:
            negotiate(acse)
        finally:
            del assoc.abort  # pynetdicom's own again

    return negotiate_as_requestor


def _queued_rejection(dul: Any) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE-RJ primitive first in the DUL's queue for its user, taken off it."""
    queue = dul.to_user_queue
    with queue.mutex:
        first = queue.queue[0] if queue.queue else None
    if not isinstance(first, A_ASSOCIATE) or first.result not in (0x01, 0x02):
        return None
    return queue.get_nowait()  # type: ignore[no-any-return]


def _reject(assoc: Any, rsp: A_ASSOCIATE) -> None:
    """What pynetdicom's requestor does on an A-ASSOCIATE-RJ (acse.py)."""
    assoc.acceptor.primitive = rsp
    logger.debug("association rejected: %s, %s, %s", rsp.result_str, rsp.source_str, rsp.reason_str)
    assoc.is_rejected = True
    assoc.is_established = False
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.dul.kill_dul()


def _shutdown_and_close(transport: Any) -> None:
    """pynetdicom's ``_shutdown_socket``, closing the socket even when the shutdown fails.

    A connection that was never made (the peer is down) cannot be shut down: the
    OSError skipped the close, and every failed attempt left a socket open until
    the garbage collector found it (module doc).
    """
    sock = transport.socket
    if sock is None:  # closed already, by the association's other thread (long fuzz run)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected
    finally:
        sock.close()


def _waking(send_pdu: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def send_pdu_and_wake(dul: Any, primitive: Any) -> None:
        send_pdu(dul, primitive)
        pipe = getattr(dul, "_lungnode_wake", None)
        if pipe is not None:
            pipe.wake()

    return send_pdu_and_wake


def _waking_first(stop_dul: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def wake_and_stop_dul(dul: Any) -> bool:
        # Woken, the DUL thread counts as busy again and sees the stop within 1 ms.
        pipe = getattr(dul, "_lungnode_wake", None)
        if pipe is not None:
            pipe.wake()
        return stop_dul(dul)

    return wake_and_stop_dul


def _bound(thread: Any, seconds: float) -> float:
    """``seconds`` while ``thread`` has seen an event lately, else the idle wait."""
    now = time.monotonic()
    event_at = getattr(thread, "_lungnode_event_at", None)
    if event_at is None:
        thread._lungnode_event_at = event_at = now  # its first wait: busy until shown idle
    if now - event_at < _IDLE_AFTER_S:
        return seconds
    return max(seconds, _IDLE_WAIT_S)


def _dul_sleep(seconds: float) -> None:
    """In a DUL thread: wait for the socket or a queued primitive (module docstring)."""
    dul = threading.current_thread()
    wake = getattr(dul, "_lungnode_wake", None)
    transport = getattr(dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if not isinstance(dul, DULServiceProvider) or wake is None or sock is None:
        time.sleep(seconds)
        return
    if not dul.to_provider_queue.empty():
        return
    try:
        readable, _, _ = select.select([sock, wake.read_fd], [], [], _bound(dul, seconds))
    except (OSError, ValueError):  # the socket closed under us: let pynetdicom see it
        time.sleep(seconds)
        return
    if wake.read_fd in readable:
        wake.drain()
    if readable:
        dul._lungnode_event_at = time.monotonic()  # type: ignore[attr-defined]
        _wake_association(dul.assoc)


def _wake_association(assoc: Any) -> None:
    """Whatever woke a DUL thread may concern its association thread: wake that too."""
    messages = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if messages is None:
        return
    assoc._lungnode_event_at = time.monotonic()
    with messages.not_empty:
        messages.not_empty.notify_all()


def _association_sleep(seconds: float) -> None:
    """In an association thread's reactor: wait for a DIMSE message (module docstring)."""
    assoc = threading.current_thread()
    if (
        seconds != _ASSOCIATION_SLEEP_S
        or not isinstance(assoc, Association)
        or not assoc.is_acceptor  # a requestor sleeps on its own clock (module doc)
    ):
        time.sleep(seconds)
        return
    bound = _bound(assoc, seconds)
    messages = assoc.dimse.msg_queue
    # not_empty shares the queue's mutex, so look at the deque itself
    # (qsize() would take that mutex a second time).
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(bound)
        if messages.queue:
            assoc._lungnode_event_at = time.monotonic()  # type: ignore[attr-defined]
            # Queue.put wakes one waiter only. A send_*() of this association waits
            # for its response in get_msg() on this same condition (pynetdicom pauses
            # this reactor first, but its pause can race): pass on the wake-up this
            # wait may have taken, or that thread sleeps until its DIMSE timeout.
            messages.not_empty.notify()
