"""STOW-RS: studies sent to the node over HTTP (PS3.18 10.5, the Store Transaction).

``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{StudyInstanceUID}``
take ``multipart/related; type="application/dicom"``. The body is streamed
(``lungnode.api.multipart_related``): each part is spooled to a file under
``<storage>/tmp/stow`` and, once complete, handed to the same
:meth:`lungnode.dicom.intake.Intake.store` as a C-STORE: the same checks (CT
only), the same durable write (fsync of file and folder before the answer), the
same rows, the same series assembler. One instance at a time is in memory.

A request is recorded as an association whose calling AE title is ``STOW-RS``;
its end plays the part of the association's release for the completion rules
(``series.assembler``): a request read to its close delimiter ends ``released``
(rule 2 then applies after the grace period, as after a C-STORE association),
a body that breaks off ends ``aborted`` (the quiet timer then completes the
series). Instances stored before a break stay stored and registered, as those
of an aborted association do: a resend is idempotent.

Who may send: the ``admin`` and ``sender`` roles, by bearer token or by HTTP
Basic with the same users' names and passwords.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, request
from pydicom.filereader import read_file_meta_info
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from lungnode.api import context
from lungnode.api.auth import BEARER_OR_BASIC, authenticate
from lungnode.api.errors import APIError
from lungnode.api.multipart_related import (
    DICOM,
    MalformedBody,
    Part,
    UnsupportedMediaType,
    dicom_boundary,
    iter_parts,
)
from lungnode.api.stow_report import STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED, StoreReport
from lungnode.db.models import Role
from lungnode.dicom.intake import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    is_valid_uid,
)
from lungnode.errors import IntakeError, storage_full

logger = logging.getLogger(__name__)

stow_blueprint = Blueprint("stow", __name__)

#: The calling AE title of the association a STOW-RS request is recorded as.
STOW_CALLING_AE = "STOW-RS"
#: Who may send studies.
SENDING_ROLES = (Role.ADMIN, Role.SENDER)
#: Seconds a sender is told to wait when the storage is full (RFC 9110 10.2.3).
RETRY_AFTER_SECONDS = 60


def spool_dir(storage_dir: Path) -> Path:
    """Where parts wait for the intake: under the storage, on the same file system."""
    return storage_dir / "tmp" / "stow"


@stow_blueprint.after_request
def _ask_for_basic(response: Response) -> Response:
    """A 401 here names both ways in (the token loaders name Bearer only)."""
    if response.status_code == 401:
        response.headers["WWW-Authenticate"] = BEARER_OR_BASIC
    return response


@stow_blueprint.post("/studies")
def store_instances() -> Response:
    """Store the instances of any studies (PS3.18 10.5.1, Study Store)."""
    return _store(None)


@stow_blueprint.post("/studies/<study>")
def store_study_instances(study: str) -> Response:
    """Store instances of one study; an instance of another fails (PS3.18 10.5.1)."""
    if not is_valid_uid(study):
        raise APIError(404, "not_found", "the Study Instance UID in the URL is not a UID")
    return _store(study)


def _store(study: str | None) -> Response:
    authenticate(*SENDING_ROLES)
    receiving = context.receiving()
    if receiving is None:
        raise APIError(503, "unavailable", "this process does not receive studies (STOW-RS)")
    try:
        boundary = dicom_boundary(request.headers.get("Content-Type"))
    except UnsupportedMediaType as exc:
        raise APIError(415, "unsupported_media_type", str(exc)) from exc
    except MalformedBody as exc:
        raise APIError(400, "bad_request", str(exc)) from exc
    settings = context.settings()
    request.max_content_length = settings.dicomweb_max_request_mb * 2**20
    spool = spool_dir(settings.storage_dir)
    spool.mkdir(parents=True, exist_ok=True)
    sender = _Sender(receiving, request.remote_addr)
    report = StoreReport()
    outcome = "aborted"
    try:
        with closing(iter_parts(request.stream, boundary, spool)) as parts:
            for part in _owned(parts):
                _store_part(part, sender, study, report)
        outcome = "released"
    except MalformedBody as exc:
        raise _broken(400, "bad_request", f"malformed multipart body: {exc}", report) from exc
    except ClientDisconnected as exc:
        raise _broken(400, "bad_request", "the body ended early: truncated", report) from exc
    except RequestEntityTooLarge as exc:
        limit = f"{settings.dicomweb_max_request_mb} MB"
        raise _broken(413, "payload_too_large", f"the request is over {limit}", report) from exc
    finally:
        sender.end(outcome)
    if not report:
        raise APIError(400, "bad_request", "the request holds no instance")
    logger.info("STOW-RS: %d instance(s) stored, %d failed", len(report.stored), len(report.failed))
    return _answer(report)


def _owned(parts: Iterator[Part]) -> Iterator[Part]:
    """Each part, its spooled file removed once the caller is done with it."""
    for part in parts:
        try:
            yield part
        finally:
            part.path.unlink(missing_ok=True)


def _store_part(part: Part, sender: _Sender, study: str | None, report: StoreReport) -> None:
    """One part through the intake; its outcome goes into the report. Raises nothing
    about the instance itself: every refusal is a Failed SOP Sequence item."""
    if part.content_type not in (None, DICOM):
        reason = f"a part of type {part.content_type!r}, not {DICOM}"
        report.fail(STATUS_CANNOT_UNDERSTAND, reason, None)
        return
    encoded = part.path.read_bytes()
    try:
        _check_transfer_syntax(part.path)
        facts = sender.intake.store(encoded, sender.association_id(), study_instance_uid=study)
    except IntakeError as exc:
        logger.warning("STOW-RS instance refused with 0x%04X: %s", exc.status, exc.comment)
        report.fail(exc.status, exc.comment, encoded)
        return
    except Exception:
        logger.exception("STOW-RS instance failed unexpectedly")
        report.fail(STATUS_CANNOT_UNDERSTAND, "internal error while storing", encoded)
        return
    report.stored.append(facts)


def _check_transfer_syntax(path: Path) -> None:
    """The syntaxes C-STORE accepts (``dicom.scp``), no others: what the node cannot
    decode is refused now, with its own reason, not failed later in analysis. A file
    meta that cannot be read is left to the intake to refuse."""
    from lungnode.dicom.scp import ACCEPTED_TRANSFER_SYNTAXES

    try:
        syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except Exception:
        return
    if syntax and syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise IntakeError(STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not supported")


class _Sender:
    """The request as an association: its row is made at the first instance (as
    C-STORE's is) and ended with the request."""

    def __init__(self, receiving: context.Receiving, peer: str | None) -> None:
        self.receiving = receiving
        self.intake = receiving.intake
        self.peer = (peer or "")[:64] or None
        self._id: int | None = None

    def association_id(self) -> int:
        if self._id is None:
            try:
                self._id = self.receiving.associations.association_started(
                    STOW_CALLING_AE, self.peer
                )
            except Exception as exc:
                if storage_full(exc):
                    raise IntakeError(STATUS_OUT_OF_RESOURCES, "storage is full") from exc
                logger.exception("cannot record the STOW-RS request")
                raise IntakeError(STATUS_OUT_OF_RESOURCES, "cannot record the request") from exc
        return self._id

    def end(self, outcome: str) -> None:
        if self._id is None:
            return
        try:
            self.receiving.associations.association_ended(self._id, outcome)
        except Exception:
            logger.exception("cannot record the end of STOW-RS request %d", self._id)
        self.receiving.on_association_ended()


def _broken(status: int, code: str, message: str, report: StoreReport) -> APIError:
    """A body that broke off: what was stored before the break stays (and is said)."""
    details: dict[str, Any] = {"stored": len(report.stored), "failed": len(report.failed)}
    return APIError(status, code, message, details)


def _answer(report: StoreReport) -> Response:
    response = current_app.response_class(
        current_app.json.dumps(report.response_module()),
        status=report.http_status,
        mimetype="application/dicom+json",
    )
    for warning in report.warnings():
        response.headers.add("Warning", warning)
    if any(f.status & 0xFF00 == STATUS_OUT_OF_RESOURCES for f in report.failed):
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def clear_spool(storage_dir: Path, older_than_seconds: float, now: float) -> int:
    """Remove parts a stopped process left spooled; those untouched for
    ``older_than_seconds`` only (another process may be receiving). Returns how many."""
    removed = 0
    directory = spool_dir(storage_dir)
    if not directory.is_dir():
        return 0
    for leftover in directory.glob(".stow-*.part"):
        try:
            if leftover.stat().st_mtime <= now - older_than_seconds:
                leftover.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
