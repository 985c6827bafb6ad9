"""Sending instances to a remote AE (C-STORE SCU), with each status classified.

Outcomes follow PS3.4 Table B.2-1: success (0x0000) and warnings (0xB000,
0xB007, 0xB006) are delivered; 0xA7xx is out of resources, worth retrying
later; 0xA9xx and 0xCxxx are final failures; no association, a timeout or an
abort are transient. An association the peer rejects is final when it says
rejected-permanent and transient when it says rejected-transient (PS3.8 9.3.4).
"""

from __future__ import annotations

import enum
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from lungnode.dicom import reactor

logger = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # transient: no association, timeout, abort, 0xA7xx, rejected-transient
    FINAL = "final"  # 0xA9xx, 0xCxxx, other failures, rejected-permanent: dead-letter


def classify_status(status: int | None) -> Outcome:
    """Map a C-STORE response status (None: no response) to what to do next."""
    if status is None:
        return Outcome.RETRY
    if status == 0x0000 or status in (0xB000, 0xB006, 0xB007) or (status & 0xF000) == 0xB000:
        return Outcome.DELIVERED
    if (status & 0xFF00) == 0xA700:
        return Outcome.RETRY
    return Outcome.FINAL


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@HOST:PORT``."""
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            return cls(ae_title, host, int(port))
        except ValueError as exc:
            raise ValueError(f"invalid destination {text!r}: expected AE@HOST:PORT") from exc


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None
    outcome: Outcome
    error: str | None = None
    #: How ``status`` reads in a reason, where it is not a DIMSE status ("HTTP 503",
    #: "FailureReason 0xA700" of a STOW-RS response); None: ``0xNNNN``.
    status_text: str | None = None


def _abstract_syntaxes(paths: Sequence[Path]) -> dict[Path, tuple[str, str]]:
    """(SOP class, transfer syntax) of each file."""
    found = {}
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        found[path] = (str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))
    return found


def _contexts_for(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) found in the files, no more."""
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in sorted(set(pairs))]
    if len(contexts) > 128:  # PS3.8 9.3.2.2: at most 128 presentation contexts
        raise ValueError("too many SOP class / transfer syntax combinations for one association")
    return contexts


def _not_accepted(assoc: Association, pair: tuple[str, str]) -> str | None:
    """Why a file of this (SOP class, transfer syntax) cannot go on the association,
    or None when the peer accepted a context for it (PS3.8 9.3.3.2)."""
    sop_class, syntax = pair
    for context in assoc.accepted_contexts:
        if context.abstract_syntax == sop_class and syntax in context.transfer_syntax:
            return None
    return _refusal(pair)


def _refusal(pair: tuple[str, str]) -> str:
    sop_class, syntax = pair
    return f"the destination does not accept {UID(sop_class).name} in {UID(syntax).name}"


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    calling_ae: str = "LUNGNODE",
    on_sent: Callable[[SendResult], None] | None = None,
    timeout: float = 60.0,
) -> list[SendResult]:
    """Send the files over one association, proposing only the contexts they need."""
    reactor.install()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    syntaxes = _abstract_syntaxes(paths)
    ae.requested_contexts = _contexts_for(syntaxes.values())
    results: list[SendResult] = []
    unreachable = unreachable_reason(destination, timeout)
    if unreachable is not None:
        return _all_failed(paths, unreachable, on_sent)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        close_dropped(assoc)
        if assoc.is_rejected:
            reason, outcome = rejection(assoc)
            return _all_failed(paths, reason, on_sent, outcome)
        answer = assoc.acceptor.primitive
        if answer is not None and answer.result == 0x00:
            # Accepted, but none of the proposed contexts: pynetdicom aborts then.
            return _refused_each(paths, syntaxes, on_sent)
        return _all_failed(paths, "no association", on_sent)
    try:
        for path in paths:
            refused = _not_accepted(assoc, syntaxes[path])
            # A PACS that does not store a SOP class (an older one and the Parametric
            # Map, say) will not on the next attempt either: final, and the other
            # objects go on.
            result = (
                SendResult(path, None, Outcome.FINAL, refused)
                if refused is not None
                else _send_one(assoc, path)
            )
            results.append(result)
            if on_sent:
                on_sent(result)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            close_dropped(assoc)
    for path in paths[len(results) :]:
        result = SendResult(path, None, Outcome.RETRY, "association lost")
        results.append(result)
        if on_sent:
            on_sent(result)
    return results


def unreachable_reason(destination: Destination, timeout: float) -> str | None:
    """Why nothing listens at the destination, or None if a TCP connection opens.

    Checked before pynetdicom tries: its transport does not close the socket of a
    refused connection, and "connection refused" is the usual state of a PACS
    that is down.
    """
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout):
            return None
    except OSError as exc:
        return f"no association: cannot connect to {destination.host}:{destination.port}: {exc}"


def rejection(assoc: Association) -> tuple[str, Outcome]:
    """Why the peer rejected the association, and what to do: a rejected-permanent
    (PS3.8 9.3.4: a called or calling AE title it does not know, say) is final, a
    rejected-transient (too many associations, say) is worth retrying."""
    answer = assoc.acceptor.primitive
    if answer is None or answer.result not in (0x01, 0x02):
        return "association rejected", Outcome.RETRY
    reason = f"association rejected ({answer.result_str}, {answer.source_str}: {answer.reason_str})"
    return reason, Outcome.FINAL if answer.result == 0x01 else Outcome.RETRY


def _all_failed(
    paths: Sequence[Path],
    reason: str,
    on_sent: Callable[[SendResult], None] | None,
    outcome: Outcome = Outcome.RETRY,
) -> list[SendResult]:
    results = [SendResult(path, None, outcome, reason) for path in paths]
    if on_sent:
        for result in results:
            on_sent(result)
    return results


def _refused_each(
    paths: Sequence[Path],
    syntaxes: dict[Path, tuple[str, str]],
    on_sent: Callable[[SendResult], None] | None,
) -> list[SendResult]:
    """The peer accepted the association but no presentation context: final for each."""
    results = []
    for path in paths:
        results.append(SendResult(path, None, Outcome.FINAL, _refusal(syntaxes[path])))
        if on_sent:
            on_sent(results[-1])
    return results


def close_dropped(assoc: Association) -> None:
    """Close our socket of an association the peer refused or dropped.

    pynetdicom closes its socket only after a release or an abort it sent itself;
    otherwise the descriptor stays open until garbage collection. A sender that
    retries an unreachable PACS for hours must not leak one per attempt.
    """
    assoc.kill()
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.close()


def _send_one(assoc: Association, path: Path) -> SendResult:
    status_ds = assoc.send_c_store(path)
    if status_ds is None or "Status" not in status_ds:
        return SendResult(path, None, Outcome.RETRY, "no response (timeout or abort)")
    status = int(status_ds.Status)
    comment = str(status_ds.get("ErrorComment", "")) or None
    return SendResult(path, status, classify_status(status), comment)


def iter_dicom_files(inputs: Iterable[Path]) -> list[Path]:
    """Expand directories into the DICOM files below them (by content, not by name)."""
    found: list[Path] = []
    for item in inputs:
        candidates = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
        for candidate in candidates:
            with candidate.open("rb") as stream:
                header = stream.read(132)
            if len(header) == 132 and header[128:] == b"DICM":
                found.append(candidate)
    return found
