"""The DICOM SCP: application entity, presentation contexts and thin handlers.

Handlers get their dependencies as handler arguments (pynetdicom's
``evt_handlers`` extra args), answer a DICOM status and never let an exception
escape: the node must not die on any input. The real work is in
:mod:`lungnode.dicom.intake`.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from lungnode.dicom import reactor
from lungnode.dicom.intake import (
    ACCEPTED_SOP_CLASSES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SUCCESS,
    Intake,
)
from lungnode.errors import IntakeError

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
        key = id(assoc)
        with self._lock:
            known = self._ids.get(key)
        if known is not None:
            return known
        address = f"{assoc.requestor.address}:{assoc.requestor.port}"
        new_id = self.log.association_started(assoc.requestor.ae_title.strip(), address)
        with self._lock:
            self._ids[key] = new_id
        return new_id

    def ended(self, assoc: Association, outcome: str) -> None:
        with self._lock:
            association_id = self._ids.pop(id(assoc), None)
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


def handle_store(event: evt.Event, intake: Intake, tracker: _AssociationTracker) -> int | Dataset:
    """C-STORE: store durably, then answer (PS3.4 B.2.3). Never raises."""
    try:
        encoded = event.encoded_dataset()
        association_id = tracker.id_for(event.assoc)
        facts = intake.store(encoded, association_id)
    except IntakeError as exc:
        logger.warning(
            "C-STORE from %s refused with 0x%04X: %s",
            event.assoc.requestor.ae_title.strip(),
            exc.status,
            exc.comment,
        )
        return _failure(exc.status, exc.comment)
    except Exception:
        logger.exception("C-STORE failed unexpectedly")
        return _failure(STATUS_CANNOT_UNDERSTAND, "internal error while storing")
    requested = getattr(event.request, "AffectedSOPInstanceUID", None)
    if requested and str(requested) != facts.sop_instance_uid:
        logger.warning("AffectedSOPInstanceUID differs from the data set's SOPInstanceUID")
    logger.debug("stored %s", facts.sop_instance_uid)
    return STATUS_SUCCESS


def handle_echo(event: evt.Event) -> int:
    """C-ECHO (PS3.7 9.1.5): always success while the node runs."""
    return STATUS_SUCCESS


def handle_released(event: evt.Event, tracker: _AssociationTracker) -> None:
    tracker.ended(event.assoc, "released")


def handle_aborted(event: evt.Event, tracker: _AssociationTracker) -> None:
    tracker.ended(event.assoc, "aborted")


def handle_closed(event: evt.Event, tracker: _AssociationTracker) -> None:
    # Fires for every connection; a no-op unless neither release nor abort was seen.
    tracker.ended(event.assoc, "closed")


@dataclass(frozen=True)
class SCPConfig:
    ae_title: str
    host: str
    port: int
    allowed_callers: list[str] | None  # None: anyone may call
    max_associations: int = 8
    max_pdu_size: int = 4_194_304
    network_timeout: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None


def make_tls_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """Server-side TLS (PS3.15 B.9, TLS secure transport); client certificates if ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert, keyfile=key)
    if ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca)
    return context


class StorageSCP:
    """The listening AE: C-ECHO and C-STORE of CT images."""

    def __init__(
        self,
        config: SCPConfig,
        intake: Intake,
        association_log: AssociationLog,
        on_association_ended: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.tracker = _AssociationTracker(association_log, on_association_ended)
        self.intake = intake
        self.ae = self._build_ae()
        self._server: ThreadedAssociationServer | None = None

    def _build_ae(self) -> AE:
        config = self.config
        ae = AE(ae_title=config.ae_title)
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
        return ae

    def start(self) -> None:
        """Listen in background threads."""
        reactor.install()
        tracker = self.tracker
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.intake, tracker]),
            (evt.EVT_RELEASED, handle_released, [tracker]),
            (evt.EVT_ABORTED, handle_aborted, [tracker]),
            (evt.EVT_CONN_CLOSE, handle_closed, [tracker]),
        ]
        ssl_context = None
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            ssl_context = make_tls_context(
                self.config.tls_cert, self.config.tls_key, self.config.tls_ca
            )
        self._server = self.ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
        )
        logger.info(
            "DICOM SCP %s listening on %s:%d%s",
            self.config.ae_title,
            self.config.host,
            self.port,
            " (TLS)" if ssl_context else "",
        )

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
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self.ae.shutdown()
            logger.info("DICOM SCP stopped")
