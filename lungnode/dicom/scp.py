"""The DICOM SCP: application entity, presentation contexts and thin handlers.

Handlers get their dependencies as handler arguments (pynetdicom's
``evt_handlers`` extra args), answer a DICOM status and never let an exception
escape: the node must not die on any input. The real work is in
:mod:`lungnode.dicom.intake`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from pydicom import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from lungnode.dicom import reactor
from lungnode.dicom.commitment import CommitmentReports, add_report_context, handle_event_report
from lungnode.dicom.intake import (
    ACCEPTED_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    Intake,
)
from lungnode.dicom.lean_store import LeanAssociation, LeanReceiver
from lungnode.dicom.scp_servers import (
    DispatchingServer,
    HandedOverServer,
    NodeAE,
    RequestHandlerForReplay,
    WrapInThreadServer,
)
from lungnode.errors import IntakeError, listen_error, storage_full

if TYPE_CHECKING:
    from lungnode.dicom.ingest_workers import IngestWorkers

logger = logging.getLogger(__name__)

#: Every transfer syntax pydicom decodes with the pylibjpeg plugins installed (PS3.5 A.4).
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]

# PS3.7 Annex C: ErrorComment is LO, at most 64 characters.
_ERROR_COMMENT_LENGTH = 64


class AssociationLog(Protocol):
    """Where associations that send instances are recorded (the database, in the node)."""

    def association_started(self, calling_ae: str, peer_address: str | None) -> int: ...

    def association_ended(self, association_id: int, outcome: str) -> None: ...


class _NobodyAllowed(list[str]):
    """A calling-AE allow-list that matches no one (pynetdicom treats [] as "anyone")."""

    def __bool__(self) -> bool:
        return True


@dataclass
class _AssociationTracker:
    """Maps live associations to their database rows, created at the first C-STORE."""

    log: AssociationLog
    on_ended: Callable[[], None] = lambda: None
    _ids: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def id_for(self, assoc: Association) -> int:
        address = f"{assoc.requestor.address}:{assoc.requestor.port}"
        return self.id_for_key(id(assoc), assoc.requestor.ae_title.strip(), address)

    def id_for_key(self, key: int, calling_ae: str, address: str) -> int:
        """The row of the association known by ``key`` (made now if it has none)."""
        with self._lock:
            known = self._ids.get(key)
        if known is not None:
            return known
        new_id = self.log.association_started(calling_ae, address)
        with self._lock:
            self._ids[key] = new_id
        return new_id

    def ended(self, assoc: Association, outcome: str) -> None:
        self.ended_key(id(assoc), outcome)

    def ended_key(self, key: int, outcome: str) -> None:
        with self._lock:
            association_id = self._ids.pop(key, None)
        if association_id is None:
            return
        try:
            self.log.association_ended(association_id, outcome)
        except Exception:
            logger.exception("cannot record the end of association %d", association_id)
        self.on_ended()


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return response


def _association_id(record: Callable[[], int]) -> int:
    """The association's row; a database that cannot record it (a full disk under
    it, or the database away) is out of resources, as in ``Intake.store``: 0xA700,
    which a sender retries, not 0xC000, which tells it the data set is at fault."""
    try:
        return record()
    except Exception as exc:
        if storage_full(exc):  # the refusal's own warning says it
            raise IntakeError(STATUS_OUT_OF_RESOURCES, "storage is full") from exc
        logger.exception("cannot record the association")
        raise IntakeError(STATUS_OUT_OF_RESOURCES, "cannot record the association") from exc


def store_instance(
    intake: Intake,
    encoded: Callable[[], bytes],
    record_association: Callable[[], int],
    calling_ae: str,
    requested_instance_uid: str | None,
) -> tuple[int, str | None]:
    """C-STORE: store durably, then say what to answer (PS3.4 B.2.3): (status, error
    comment or None). Both receivers (pynetdicom's and ``dicom.lean_store``) call it.
    Never raises."""
    try:
        association_id = _association_id(record_association)
        facts = intake.store(encoded(), association_id)
    except IntakeError as exc:
        logger.warning(
            "C-STORE from %s refused with 0x%04X: %s", calling_ae, exc.status, exc.comment
        )
        return exc.status, exc.comment[:_ERROR_COMMENT_LENGTH]
    except Exception:
        logger.exception("C-STORE failed unexpectedly")
        return STATUS_CANNOT_UNDERSTAND, "internal error while storing"
    if requested_instance_uid and requested_instance_uid != facts.sop_instance_uid:
        logger.warning("AffectedSOPInstanceUID differs from the data set's SOPInstanceUID")
    logger.debug("stored %s", facts.sop_instance_uid)
    return STATUS_SUCCESS, None


def handle_store(event: evt.Event, intake: Intake, tracker: _AssociationTracker) -> int | Dataset:
    """C-STORE through pynetdicom: :func:`store_instance`. Never raises."""
    requested = getattr(event.request, "AffectedSOPInstanceUID", None)
    status, comment = store_instance(
        intake,
        event.encoded_dataset,
        lambda: tracker.id_for(event.assoc),
        event.assoc.requestor.ae_title.strip(),
        str(requested) if requested else None,
    )
    return status if comment is None else _failure(status, comment)


def handle_echo(event: evt.Event) -> int:
    """C-ECHO (PS3.7 9.1.5): always success while the node runs."""
    return STATUS_SUCCESS


def handle_released(event: evt.Event, tracker: _AssociationTracker) -> None:
    tracker.ended(event.assoc, "released")


def handle_aborted(event: evt.Event, tracker: _AssociationTracker) -> None:
    tracker.ended(event.assoc, "aborted")


def handle_closed(event: evt.Event, tracker: _AssociationTracker) -> None:
    """Fires for every connection; a no-op when release or abort was seen already.

    The connection can close before the association thread has announced a
    release: the DUL thread sends our A-RELEASE-RP, the peer closes at once,
    and this fires first. The upper layer then still sits in Sta13 (awaiting
    close after the release response, PS3.8 Table 9-10): that was a release.
    """
    assoc = event.assoc
    state = getattr(
        getattr(getattr(assoc, "dul", None), "state_machine", None), "current_state", None
    )
    released = assoc.is_released or (state == "Sta13" and not assoc.is_aborted)
    tracker.ended(assoc, "released" if released else "closed")


@dataclass(frozen=True)
class SCPConfig:
    ae_title: str
    host: str
    port: int
    allowed_callers: list[str] | None  # None: anyone may call
    max_associations: int = 32
    max_pdu_size: int = 4_194_304
    network_timeout: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    #: Accept Storage Commitment reports (N-EVENT-REPORT, PS3.4 J.3.3) from peers.
    commitment_reports: bool = False
    #: "lean": storage-only associations are served by ``dicom.lean_store``;
    #: "pynetdicom": every association by pynetdicom.
    store_receiver: str = "lean"


def make_tls_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """Server-side TLS (PS3.15 B.9, TLS secure transport); client certificates if ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert, keyfile=key)
    if ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca)
    return context


def _connection_closed(event: evt.Event, notify: Callable[[], None]) -> None:
    notify()


class StorageSCP:
    """The listening AE: C-ECHO and C-STORE of CT images."""

    def __init__(
        self,
        config: SCPConfig,
        intake: Intake,
        association_log: AssociationLog,
        on_association_ended: Callable[[], None] = lambda: None,
        *,
        on_connection_closed: Callable[[], None] | None = None,
        dispatcher: IngestWorkers | None = None,
        commitment_reports: CommitmentReports | None = None,
    ) -> None:
        """``dispatcher`` (optional) hands some connections to worker processes
        (``dicom.ingest_workers``); ``on_connection_closed`` is told about every
        connection that closes, whether or not it became an association;
        ``commitment_reports`` (optional) takes Storage Commitment reports."""
        self.config = config
        self.commitment_reports = commitment_reports
        self.tracker = _AssociationTracker(association_log, on_association_ended)
        self.intake = intake
        self.dispatcher = dispatcher
        self.on_connection_closed = on_connection_closed
        if dispatcher is not None and on_connection_closed is None:
            self.on_connection_closed = dispatcher.local_closed
        self.ae = self._build_ae()
        self.lean: LeanReceiver | None = None
        if config.store_receiver == "lean":
            self.lean = LeanReceiver(
                self.ae,
                self._lean_store,
                self._lean_ended,
                ae_title=config.ae_title,
                max_associations=config.max_associations,
                network_timeout=config.network_timeout,
            )
            self.ae.lean = self.lean
        self._server: ThreadedAssociationServer | None = None

    def _lean_store(
        self, encoded: bytes, requested_instance_uid: str, association: LeanAssociation
    ) -> tuple[int, str | None]:
        tracker = self.tracker
        return store_instance(
            self.intake,
            lambda: encoded,
            lambda: tracker.id_for_key(
                id(association), association.calling_ae, association.address
            ),
            association.calling_ae,
            requested_instance_uid,
        )

    def _lean_ended(self, association: LeanAssociation) -> None:
        self.tracker.ended_key(id(association), association.outcome)

    def _build_ae(self) -> NodeAE:
        config = self.config
        ae = NodeAE(ae_title=config.ae_title)
        ae.maximum_associations = config.max_associations
        ae.maximum_pdu_size = config.max_pdu_size
        ae.network_timeout = config.network_timeout
        ae.acse_timeout = config.network_timeout
        ae.dimse_timeout = config.network_timeout
        ae.require_called_aet = True
        if config.allowed_callers is None:
            ae.require_calling_aet = []
        elif config.allowed_callers:
            ae.require_calling_aet = config.allowed_callers
        else:
            logger.warning("no peers are configured: every association will be rejected")
            ae._require_calling_aet = _NobodyAllowed()
        ae.add_supported_context(Verification)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        if self.commitment_reports is not None:
            add_report_context(ae)
        return ae

    def _handlers(self) -> list[Any]:
        tracker = self.tracker
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.intake, tracker]),
            (evt.EVT_RELEASED, handle_released, [tracker]),
            (evt.EVT_ABORTED, handle_aborted, [tracker]),
            (evt.EVT_CONN_CLOSE, handle_closed, [tracker]),
        ]
        if self.on_connection_closed is not None:
            handlers.append((evt.EVT_CONN_CLOSE, _connection_closed, [self.on_connection_closed]))
        if self.commitment_reports is not None:
            reports = [self.commitment_reports]
            handlers.append((evt.EVT_N_EVENT_REPORT, handle_event_report, reports))
        return handlers

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            return make_tls_context(self.config.tls_cert, self.config.tls_key, self.config.tls_ca)
        return None

    def start(self) -> None:
        """Listen in background threads."""
        reactor.install()
        ssl_context = self._ssl_context()
        server_class = WrapInThreadServer if self.dispatcher is None else DispatchingServer
        try:
            server = self._make_server(server_class, ssl_context)
        except OSError as exc:
            host, port = self.config.host, self.config.port
            raise listen_error(exc, "DICOM", host, port, "LUNGNODE_DICOM_PORT") from exc
        if isinstance(server, DispatchingServer) and self.dispatcher is not None:
            server.dispatcher = self.dispatcher
        self._serve(server)
        logger.info(
            "DICOM SCP %s listening on %s:%d%s%s",
            self.config.ae_title,
            self.config.host,
            self.port,
            " (TLS)" if ssl_context else "",
            " (lean storage receiver)" if self.lean is not None else "",
        )

    def _make_server(
        self, server_class: type[WrapInThreadServer], ssl_context: ssl.SSLContext | None
    ) -> WrapInThreadServer:
        server = cast(
            WrapInThreadServer,
            self.ae.make_server(
                (self.config.host, self.config.port),
                evt_handlers=self._handlers(),
                ssl_context=ssl_context,
                server_class=server_class,
                request_handler=RequestHandlerForReplay,
            ),
        )
        server.on_connection_closed = self.on_connection_closed
        server.lean = self.lean
        return server

    def start_handed_over(self) -> None:
        """Receive connections accepted by another process (see :meth:`receive`); no listening."""
        reactor.install()
        server = self._make_server(HandedOverServer, self._ssl_context())
        self.ae._servers.append(server)
        self._server = server

    def receive(self, connection: socket.socket, address: tuple[Any, ...]) -> None:
        """Run an association on a connection accepted elsewhere, in a new thread."""
        if self._server is None:
            connection.close()
            raise RuntimeError("receive() before start_handed_over()")
        self._server.process_request(connection, address)

    def _serve(self, server: ThreadedAssociationServer) -> None:
        """What ``AE.start_server(block=False)`` does, for a server class of ours."""
        thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        self._server = server

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        if self.lean is not None:
            self.lean.stop()
        if self._server is not None:
            if isinstance(self._server, HandedOverServer):
                self._server.close_handed_over()
            else:
                self._server.shutdown()
            self._server = None
            self.ae.shutdown()
            logger.info("DICOM SCP stopped")
