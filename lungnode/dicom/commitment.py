"""Storage Commitment Push Model (PS3.4 Annex J): asking a destination to commit
what it received, and taking in its answer.

The node is the SCU of the Storage Commitment Push Model SOP Class
(1.2.840.10008.1.20.1). It asks with an N-ACTION (Action Type ID 1, "Request
Storage Commitment", PS3.4 J.3.2) whose Action Information holds a Transaction
UID and the Referenced SOP Sequence of the instances to commit. The SCP answers
later with an N-EVENT-REPORT (PS3.4 J.3.3): Event Type ID 1 when every instance
is committed, 2 when some failed (the Failed SOP Sequence, each with its Failure
Reason). The report may come on the association of the request, while it is
still open, or on a new association that the SCP opens to the node; there the
SCP proposes the SCP role by SCP/SCU Role Selection (PS3.7 D.3.3.4), which the
node's listening AE accepts (:func:`add_report_context`).

Both ways end in :func:`handle_event_report`, which hands the parsed report to a
:class:`CommitmentReports` (the database, in the node) and answers its status:
0x0000 for a transaction the node asked for, 0x0115 (invalid argument value)
for a Transaction UID it does not know, and other failures for a report it
cannot read. After the N-EVENT-REPORT the Transaction UID is no longer active
(PS3.4 J.3.3), so each request gets a fresh one (:func:`new_transaction_uid`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydicom import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association

from lungnode.dicom import reactor
from lungnode.dicom.scu import (
    Destination,
    Outcome,
    close_dropped,
    rejection,
    unreachable_reason,
)

logger = logging.getLogger(__name__)

#: PS3.4 J.3.1 and PS3.6 Annex A: the SOP Class and its well-known SOP Instance.
STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: PS3.4 Table J.3-1: Request Storage Commitment.
ACTION_REQUEST_COMMITMENT = 1
#: PS3.4 Table J.3-2: Storage Commitment Request Successful / Complete - Failures Exist.
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2

#: PS3.7 10.1.1.1.8 (N-EVENT-REPORT statuses).
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT_VALUE = 0x0115
STATUS_MISTYPED_ARGUMENT = 0x0212

#: PS3.4 J.3.3.1.2 (and C.4.3.1.1 of PS3.3, Failure Reason): what each code means.
FAILURE_REASONS: Mapping[int, str] = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP Class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}

_NOT_ACCEPTED = "the destination does not accept Storage Commitment Push Model"

# PS3.7 Annex C: ErrorComment is LO, at most 64 characters.
_ERROR_COMMENT_LENGTH = 64


@dataclass(frozen=True)
class Reference:
    """One instance of a commitment request (PS3.4 Table J.3-1, Referenced SOP Sequence)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT said about one transaction (PS3.4 J.3.3)."""

    transaction_uid: str
    #: SOP Instance UIDs the SCP committed.
    committed: tuple[str, ...] = ()
    #: SOP Instance UID -> Failure Reason (None when the item did not give one).
    failed: Mapping[str, int | None] = field(default_factory=dict)


class CommitmentReports(Protocol):
    """Where reports go (the database, in the node): applied idempotently."""

    def apply_commitment_report(
        self,
        transaction_uid: str,
        committed: Sequence[str],
        failed: Mapping[str, tuple[int | None, str]],
    ) -> bool:
        """Record the outcome; False when no delivery belongs to the transaction."""
        ...


def new_transaction_uid() -> str:
    """A fresh Transaction UID: a UUID-derived UID under ``2.25`` (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def describe_failure(reason: int | None) -> str:
    """``0x0112 (no such object instance)``, for a delivery's last error."""
    if reason is None:
        return "no failure reason given"
    return f"0x{reason:04X} ({FAILURE_REASONS.get(reason, 'unknown failure reason')})"


def action_information(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION's Action Information (PS3.4 Table J.3-1)."""
    if not references:
        raise ValueError("a commitment request needs at least one instance")
    information = Dataset()
    information.TransactionUID = transaction_uid
    items = []
    for reference in references:
        item = Dataset()
        item.ReferencedSOPClassUID = reference.sop_class_uid
        item.ReferencedSOPInstanceUID = reference.sop_instance_uid
        items.append(item)
    information.ReferencedSOPSequence = items
    return information


def parse_report(event_type: int | None, information: Dataset) -> CommitmentReport:
    """Read an N-EVENT-REPORT's Event Information (PS3.4 Table J.3-2); ValueError
    with the reason when it is not a Storage Commitment result."""
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST):
        raise ValueError(f"no such event type {event_type!r}")
    transaction_uid = str(information.get("TransactionUID", "") or "").strip()
    if not transaction_uid:
        raise ValueError("the report has no Transaction UID")
    committed = tuple(
        str(item.ReferencedSOPInstanceUID)
        for item in information.get("ReferencedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in item
    )
    failed: dict[str, int | None] = {}
    for item in information.get("FailedSOPSequence", []):
        if "ReferencedSOPInstanceUID" in item:
            reason = item.get("FailureReason")
            failed[str(item.ReferencedSOPInstanceUID)] = None if reason is None else int(reason)
    if event_type == EVENT_FAILURES_EXIST and not failed:
        raise ValueError("event type 2 (failures exist) without a Failed SOP Sequence")
    return CommitmentReport(transaction_uid, committed, failed)


def _status(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return response


def handle_event_report(
    event: evt.Event,
    reports: CommitmentReports,
    on_report: Callable[[str], None] | None = None,
) -> tuple[int | Dataset, None]:
    """N-EVENT-REPORT of the Storage Commitment Push Model: record it, then answer
    (PS3.4 J.3.3, PS3.7 10.1.1.1.8). Never raises. ``on_report`` (optional) is called
    with the Transaction UID of a report recorded."""
    calling_ae = event.assoc.requestor.ae_title.strip()
    try:
        report = parse_report(event.event_type, event.event_information)
    except ValueError as exc:
        logger.warning("storage commitment report from %s refused: %s", calling_ae, exc)
        status = STATUS_NO_SUCH_EVENT_TYPE if "event type" in str(exc) else STATUS_MISTYPED_ARGUMENT
        return _status(status, str(exc)), None
    except Exception:
        logger.exception("storage commitment report from %s unreadable", calling_ae)
        return _status(STATUS_MISTYPED_ARGUMENT, "cannot read the Event Information"), None
    failed = {uid: (reason, describe_failure(reason)) for uid, reason in report.failed.items()}
    try:
        known = reports.apply_commitment_report(report.transaction_uid, report.committed, failed)
    except Exception:
        logger.exception("cannot record storage commitment report %s", report.transaction_uid)
        return _status(STATUS_PROCESSING_FAILURE, "cannot record the report"), None
    if not known:
        logger.warning(
            "storage commitment report from %s for unknown transaction %s",
            calling_ae,
            report.transaction_uid,
        )
        return _status(STATUS_INVALID_ARGUMENT_VALUE, "unknown Transaction UID"), None
    logger.info(
        "storage commitment report from %s for %s: %d committed, %d failed",
        calling_ae,
        report.transaction_uid,
        len(report.committed),
        len(report.failed),
    )
    if on_report is not None:
        on_report(report.transaction_uid)
    return STATUS_SUCCESS, None


def add_report_context(ae: AE) -> None:
    """Accept Storage Commitment Push Model associations a reporting SCP opens: it may
    take the SCP role (it sends N-EVENT-REPORT), never the SCU role (the node commits
    nothing for others). A proposal without role selection gets the default roles."""
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)


@dataclass(frozen=True)
class ActionResult:
    """How an N-ACTION went: a status (None: no response) and what to do next."""

    status: int | None
    outcome: Outcome
    error: str | None = None
    #: A report for the transaction came on the same association.
    reported: bool = False


def classify_action_status(status: int | None) -> Outcome:
    """N-ACTION statuses (PS3.4 J.3.2.1.2, PS3.7 10.1.4.1.10): success, or a failure.

    0x0213 (resource limitation) and no response are worth asking again later;
    any other failure is retried as well, up to the attempts allowed, since the
    objects are sent again first (a PACS that lost them may have them then).
    """
    if status == STATUS_SUCCESS:
        return Outcome.DELIVERED
    return Outcome.RETRY


def request_commitment(
    destination: Destination,
    transaction_uid: str,
    references: Sequence[Reference],
    reports: CommitmentReports,
    *,
    calling_ae: str = "LUNGNODE",
    timeout: float = 30.0,
    wait_for_report: float = 0.0,
) -> ActionResult:
    """Send the N-ACTION on an association of its own, then keep it open up to
    ``wait_for_report`` seconds for an N-EVENT-REPORT on it (recorded in ``reports``
    like one on a new association)."""
    information = action_information(transaction_uid, references)
    reactor.install()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = [build_context(STORAGE_COMMITMENT_PUSH_MODEL)]
    unreachable = unreachable_reason(destination, timeout)
    if unreachable is not None:
        return ActionResult(None, Outcome.RETRY, unreachable)
    reported = threading.Event()

    def on_report(uid: str) -> None:
        if uid == transaction_uid:
            reported.set()

    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, handle_event_report, [reports, on_report])],
    )
    if not assoc.is_established:
        close_dropped(assoc)
        if assoc.is_rejected:
            reason, outcome = rejection(assoc)
            return ActionResult(None, outcome, reason)
        answer = assoc.acceptor.primitive
        if answer is not None and answer.result == 0x00:
            # Accepted, but not our one presentation context: pynetdicom aborts then.
            return ActionResult(None, Outcome.FINAL, _NOT_ACCEPTED)
        return ActionResult(None, Outcome.RETRY, "no association")
    try:
        return _send_action(assoc, information, reported, wait_for_report)
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            close_dropped(assoc)


def _send_action(
    assoc: Association, information: Dataset, reported: threading.Event, wait: float
) -> ActionResult:
    accepted = [
        cx for cx in assoc.accepted_contexts if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL
    ]
    if not accepted:
        return ActionResult(None, Outcome.FINAL, _NOT_ACCEPTED)
    status_ds, _ = assoc.send_n_action(
        information,
        ACTION_REQUEST_COMMITMENT,
        STORAGE_COMMITMENT_PUSH_MODEL,
        STORAGE_COMMITMENT_INSTANCE,
    )
    if status_ds is None or "Status" not in status_ds:
        return ActionResult(None, Outcome.RETRY, "no N-ACTION response (timeout or abort)")
    status = int(status_ds.Status)
    outcome = classify_action_status(status)
    if outcome is not Outcome.DELIVERED:
        comment = str(status_ds.get("ErrorComment", "")) or "commitment request refused"
        return ActionResult(status, outcome, comment)
    if wait > 0:
        reported.wait(wait)
    return ActionResult(status, outcome, reported=reported.is_set())
