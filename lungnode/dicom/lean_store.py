"""The lean C-STORE receiver: one association in one thread, straight off the socket.

pynetdicom runs every association in two threads (the DUL thread reads PDUs,
the association thread assembles DIMSE messages) that hand each message over
through queues, decode every PDU into objects and copy each data set a few
times. On one association that costs more CPU per instance than the intake's
own work (docs/benchmarks.md, "DICOM ingest"). Most peers only store images
and echo, and this receiver serves exactly those associations, in the thread
that accepted the connection:

- it reads the A-ASSOCIATE-RQ itself and decides from it. When every proposed
  abstract syntax is Verification or a storage SOP class (those the node does
  not accept become rejected contexts, as pynetdicom rejects them; senders
  such as DCMTK's ``storescu`` propose a hundred), with no extended
  negotiation (role selection, user identity, SOP class extended negotiation,
  asynchronous operations window), the association is served here; anything
  else goes to pynetdicom unchanged, with the bytes read so far replayed
  (``dicom.scp_servers.Replayed``);
- negotiation follows pynetdicom's acceptor (PS3.8 7.1, PS3.7 D.3.3): the same
  calling/called AE title checks and the same association limit, counted over
  both kinds of association, with the same A-ASSOCIATE-RJ reasons; the
  presentation contexts are negotiated by pynetdicom's ``negotiate_as_acceptor``
  against the AE's own supported contexts. A request whose bytes were seen
  before (a sender proposes the same contexts every time) is neither decoded nor
  negotiated again (``_Request``); the acceptor checks run on every one;
- per instance: the P-DATA-TF PDUs are read whole, the command PDVs decoded
  (``dicom.lean_codec``), the data set fragments gathered into one buffer, then
  ``dicom.scp.store_instance`` runs the same intake as the pynetdicom handler
  (file written and fsynced, folder fsynced, row committed) and only then is
  the C-STORE-RSP sent, with the same status;
- A-RELEASE-RQ is answered and recorded as a release, A-ABORT as an abort, a
  closed connection as closed; silence longer than the network timeout and
  any protocol error abort the association (A-ABORT, as pynetdicom's DUL);
  an instance not complete when the association ends is never stored.

TLS needs nothing more: the socket it is given is the wrapped one.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPDU
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class

from lungnode.dicom import lean_codec as codec
from lungnode.dicom.lean_codec import ProtocolError
from lungnode.dicom.reactor import quick_ack

logger = logging.getLogger(__name__)

_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: An A-ASSOCIATE-RQ larger than this is left to pynetdicom (it is never this large).
_LARGEST_REQUEST = 1 << 20
#: The largest single read from the socket's buffered file (see ``_read``).
_READ_PIECE = 1 << 22
#: Seconds to wait for the peer to close after our A-RELEASE-RP (PS3.8 Sta13, ARTIM).
_CLOSE_WAIT_S = 2.0
#: Association requests remembered with their negotiation (``_Request``), and the
#: largest one remembered.
_KNOWN_REQUESTS = 64
_LARGEST_KNOWN_REQUEST = 1 << 16


class StoreHandler(Protocol):
    """Stores one received instance; returns (status, error comment or None). Never raises."""

    def __call__(
        self, encoded: bytes, requested_instance_uid: str, association: LeanAssociation
    ) -> tuple[int, str | None]: ...


class LeanAssociation:
    """What the association log and the store handler know of one lean association."""

    def __init__(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        self.sock = sock
        self.address = f"{address[0]}:{address[1]}" if len(address) >= 2 else str(address)
        self.calling_ae = ""
        self.outcome = "closed"
        #: We sent the last PDU (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT): the peer
        #: closes the connection (PS3.8 Sta13), and we let it, for a short while.
        self.awaits_close = False


@dataclass
class _Request:
    """One A-ASSOCIATE-RQ as decoded, and once accepted, what accepting it sends.

    A sender proposes the same hundred-odd presentation contexts on every
    association, and decoding them with their UIDs checked, then negotiating
    them, held the interpreter about 10 ms each time (``py-spy --gil`` during the
    four associations of ``scripts/bench_ingest.py``): as much as receiving a few
    instances. So a request is
    remembered by its bytes: the same bytes make the same decoded request, the
    same acceptor checks run on it every time, and the same A-ASSOCIATE-AC
    answers it (the AE's contexts and maximum PDU do not change while it runs).
    """

    primitive: A_ASSOCIATE
    lean: bool
    #: The A-ASSOCIATE-AC, the accepted contexts by ID, the peer's maximum PDU.
    accepted: tuple[bytes, dict[int, Any], int] | None = None


class LeanReceiver:
    """Serves storage-only associations of one AE; tells the caller when to use pynetdicom."""

    def __init__(
        self,
        ae: AE,
        store: StoreHandler,
        on_ended: Callable[[LeanAssociation], None],
        *,
        ae_title: str,
        max_associations: int,
        network_timeout: float,
    ) -> None:
        self.ae = ae
        self.store = store
        self.on_ended = on_ended
        self.ae_title = ae_title
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        self._lock = threading.Lock()
        self._active: set[LeanAssociation] = set()
        self._stopped = False
        self._requests: dict[bytes, _Request] = {}

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def stop(self) -> None:
        """Refuse new associations and cut the running ones (their instances unacknowledged)."""
        with self._lock:
            self._stopped = True
            running = list(self._active)
        for association in running:
            try:
                association.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- one connection ------------------------------------------------------------

    def serve(self, sock: socket.socket, address: tuple[Any, ...]) -> bytes | None:
        """Run the connection if it is a lean association. Returns None when it was
        served (and the socket closed), or the bytes read so far when pynetdicom must
        serve it (the socket untouched but for them)."""
        sock.settimeout(self.network_timeout)  # ARTIM, then the network timeout
        try:
            header = _read_exact(sock, 6)
            pdu_type, length = codec.pdu_header(header)
            if pdu_type != codec.A_ASSOCIATE_RQ or length > _LARGEST_REQUEST:
                return header
            body = _read_exact(sock, length)
        except (OSError, EOFError):
            _close(sock)  # closed or silent before its request: as pynetdicom, just close
            return None
        request = self._request(header + body)
        if request is None or not request.lean:
            return header + body  # pynetdicom serves it, a malformed request included
        association = LeanAssociation(sock, address)
        association.calling_ae = str(request.primitive.calling_ae_title).strip()
        with self._lock:
            stopped = self._stopped
            self._active.add(association)
        try:
            if not stopped:
                self._run(association, request)
        finally:
            with self._lock:
                self._active.discard(association)
            try:
                self.on_ended(association)
            finally:
                if association.awaits_close:
                    _await_close(sock)
                _close(sock)
        return None

    def _request(self, encoded: bytes) -> _Request | None:
        """The request these bytes are (remembered, or decoded now); None if malformed."""
        with self._lock:
            known = self._requests.get(encoded)
        if known is not None:
            return known
        try:
            pdu = AssociateRqPDU()
            pdu.decode(encoded)
            primitive = pdu.to_primitive()
        except Exception:
            return None
        request = _Request(primitive, self._is_lean(primitive))
        if len(encoded) <= _LARGEST_KNOWN_REQUEST:
            with self._lock:
                if len(self._requests) >= _KNOWN_REQUESTS:
                    self._requests.clear()
                self._requests[encoded] = request
        return request

    def _is_lean(self, primitive: A_ASSOCIATE) -> bool:
        if str(primitive.application_context_name) != _APPLICATION_CONTEXT:
            return False
        if any(
            _service_class(str(context.abstract_syntax))
            not in (StorageServiceClass, VerificationServiceClass)
            for context in primitive.presentation_context_definition_list
        ):
            return False
        user_items = primitive.user_information or []
        return all(
            isinstance(
                item,
                MaximumLengthNotification
                | ImplementationClassUIDNotification
                | ImplementationVersionNameNotification,
            )
            for item in user_items
        )

    def _rejection(self, primitive: A_ASSOCIATE) -> tuple[int, int, int] | None:
        """pynetdicom's acceptor checks, in its order (the last that fails wins)."""
        ae = self.ae
        found: tuple[int, int, int] | None = None
        allowed = [title.strip() for title in ae.require_calling_aet]
        if ae.require_calling_aet and primitive.calling_ae_title not in allowed:
            found = (0x01, 0x01, 0x03)
        if ae.require_called_aet and primitive.called_ae_title != self.ae_title.strip():
            found = (0x01, 0x01, 0x07)
        acceptors = [a for a in ae.active_associations if a.is_acceptor]
        if len(acceptors) + self.active > self.max_associations:
            found = (0x02, 0x03, 0x02)
        return found

    def _run(self, association: LeanAssociation, request: _Request) -> None:
        sock = association.sock
        rejection = self._rejection(request.primitive)
        if rejection is not None:
            logger.info("rejecting association from %s", association.calling_ae or "?")
            _send(sock, codec.reject(*rejection))
            association.outcome = "rejected"
            association.awaits_close = True
            return
        try:
            contexts, peer_max_pdu = self._accept(sock, request)
            self._receive(association, contexts, peer_max_pdu)
        except ProtocolError as exc:
            logger.warning("association aborted on a protocol error of the peer: %s", exc)
            _send(sock, codec.abort(0x02, 0x00))
            association.outcome = "aborted"
            association.awaits_close = True
        except TimeoutError:
            logger.warning("association aborted: no data for %g s", self.network_timeout)
            _send(sock, codec.abort(0x02, 0x00))
            association.outcome = "aborted"
            association.awaits_close = True
        except (OSError, EOFError):
            pass  # the connection closed: "closed" unless released or aborted before
        except Exception:  # a fault of ours: abort, never leave the peer waiting
            logger.exception("association aborted: the lean receiver failed")
            _send(sock, codec.abort(0x02, 0x00))
            association.outcome = "aborted"
            association.awaits_close = True

    def _accept(self, sock: socket.socket, request: _Request) -> tuple[dict[int, Any], int]:
        """Send the A-ASSOCIATE-AC; return the accepted contexts by ID and the peer's max PDU."""
        if request.accepted is None:
            request.accepted = self._acceptance(request.primitive)
        encoded, contexts, peer_max = request.accepted
        _send(sock, encoded, raise_errors=True)
        return contexts, peer_max

    def _acceptance(self, primitive: A_ASSOCIATE) -> tuple[bytes, dict[int, Any], int]:
        """The A-ASSOCIATE-AC of ``primitive``, the accepted contexts, the peer's max PDU."""
        results, _roles = negotiate_as_acceptor(
            primitive.presentation_context_definition_list,
            deepcopy(self.ae.supported_contexts),
            {},
        )
        accept = A_ASSOCIATE()
        accept.application_context_name = _APPLICATION_CONTEXT
        accept.calling_ae_title = primitive.calling_ae_title
        accept.called_ae_title = primitive.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.ae.maximum_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = self.ae.implementation_class_uid
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = self.ae.implementation_version_name
        accept.user_information = [maximum, implementation, version]
        pdu = AssociateAcPDU()
        pdu.from_primitive(accept)
        peer_max = 0
        for item in primitive.user_information or []:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
        accepted = {cx.context_id or 0: cx for cx in results if cx.result == 0x00}
        return pdu.encode(), accepted, peer_max

    def _receive(
        self, association: LeanAssociation, contexts: dict[int, Any], peer_max_pdu: int
    ) -> None:
        """The association's messages until release, abort or close."""
        stream = association.sock.makefile("rb", buffering=1 << 16)
        try:
            self._messages(association, stream, contexts, peer_max_pdu)
        finally:
            stream.close()  # the socket closes for real only once its file has

    def _messages(
        self,
        association: LeanAssociation,
        stream: Any,
        contexts: dict[int, Any],
        peer_max_pdu: int,
    ) -> None:
        sock = association.sock
        command_parts: list[bytes] = []
        data_parts: list[memoryview] = []
        command: codec.Command | None = None
        context_id = -1
        while True:
            pdu_type, length = codec.pdu_header(_read(stream, 6))
            if pdu_type == codec.P_DATA_TF and 0 < self.ae.maximum_pdu_size < length:
                # PS3.8 D.1: no P-DATA-TF longer than the Maximum Length we announced.
                raise ProtocolError(f"P-DATA-TF of {length} bytes, over our maximum")
            body = _read(stream, length)
            if pdu_type == codec.A_RELEASE_RQ:
                _send(sock, codec.release_rp(), raise_errors=True)
                association.outcome = "released"
                association.awaits_close = True
                return
            if pdu_type == codec.A_ABORT:
                association.outcome = "aborted"
                return
            if pdu_type != codec.P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            view = memoryview(body)
            for pdv in codec.pdvs(body):
                if pdv.context_id not in contexts:
                    raise ProtocolError("PDV on a presentation context not accepted")
                if command is None:
                    if not pdv.is_command:
                        raise ProtocolError("data set fragment before its command")
                    context_id = pdv.context_id
                    command_parts.append(body[pdv.start : pdv.end])
                    if not pdv.is_last:
                        continue
                    command = codec.decode_command(b"".join(command_parts))
                    command_parts.clear()
                    if command.has_data_set:
                        continue
                else:
                    if pdv.is_command or pdv.context_id != context_id:
                        raise ProtocolError("a command where a data set fragment was due")
                    data_parts.append(view[pdv.start : pdv.end])
                    if not pdv.is_last:
                        continue
                self._answer(association, command, contexts[context_id], data_parts, peer_max_pdu)
                command, context_id = None, -1
                data_parts = []

    def _answer(
        self,
        association: LeanAssociation,
        command: codec.Command,
        context: Any,
        data_parts: list[memoryview],
        peer_max_pdu: int,
    ) -> None:
        """Serve one complete request (as pynetdicom's service classes would)."""
        service = _service_class(command.affected_sop_class_uid)
        if command.command_field == codec.C_STORE_RQ and service is StorageServiceClass:
            encoded = b"".join(
                [
                    codec.file_preamble_and_meta(
                        command.affected_sop_class_uid,
                        command.affected_sop_instance_uid,
                        str(context.transfer_syntax[0]),
                    ),
                    *data_parts,
                ]
            )
            status, comment = self.store(encoded, command.affected_sop_instance_uid, association)
            message = codec.response(
                codec.C_STORE_RSP,
                command.message_id,
                command.affected_sop_class_uid,
                status,
                sop_instance_uid=command.affected_sop_instance_uid,
                error_comment=comment,
            )
        elif command.command_field == codec.C_ECHO_RQ and service is VerificationServiceClass:
            message = codec.response(
                codec.C_ECHO_RSP, command.message_id, command.affected_sop_class_uid, 0x0000
            )
        elif command.command_field & 0x8000:
            logger.warning("unexpected DIMSE response 0x%04X, ignored", command.command_field)
            return
        else:
            # pynetdicom aborts a request no service class of the AE serves.
            raise ProtocolError(f"unsupported DIMSE request 0x{command.command_field:04X}")
        for pdu in codec.p_data(int(context.context_id), True, message, peer_max_pdu):
            association.sock.sendall(pdu)


_service_classes: dict[str, type] = {}


def _service_class(sop_class_uid: str) -> type:
    known = _service_classes.get(sop_class_uid)
    if known is None:
        known = _service_classes[sop_class_uid] = uid_to_service_class(sop_class_uid)
    return known


def _read_exact(sock: socket.socket, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 16))
        if not chunk:
            raise EOFError("connection closed")
        parts.append(chunk)
        remaining -= len(chunk)
    quick_ack(sock)
    return b"".join(parts)


def _read(stream: Any, size: int) -> bytes:
    """``size`` bytes, read in pieces of at most ``_READ_PIECE``: a length field is the
    peer's word, and a read allocates what it asks for before anything arrives."""
    if size <= _READ_PIECE:
        data: bytes = stream.read(size) if size else b""
        if len(data) != size:
            raise EOFError("connection closed")
        return data
    parts = [_read(stream, min(_READ_PIECE, size - done)) for done in range(0, size, _READ_PIECE)]
    return b"".join(parts)


def _send(sock: socket.socket, data: bytes, *, raise_errors: bool = False) -> None:
    try:
        sock.sendall(data)
    except OSError:
        if raise_errors:
            raise


def _await_close(sock: socket.socket) -> None:
    """After our A-RELEASE-RP the requestor closes (PS3.8 Sta13); wait a little for it."""
    try:
        sock.settimeout(_CLOSE_WAIT_S)
        while sock.recv(4096):
            pass
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
