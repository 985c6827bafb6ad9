"""The Store Instances Response (PS3.18 10.5.3 and Annex I) of one STOW-RS request.

Each part of the request ends up referenced once: in the Referenced SOP
Sequence (0008,1199) when stored, or in the Failed SOP Sequence (0008,1198)
with its Failure Reason (0008,1197), the C-STORE status the node would have
answered for it (PS3.18 I.2.2 takes the same codes). The HTTP status follows
Table 10.5.3-1: 200 when every instance was stored, 202 when some were, 409
when none was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom import Dataset, dcmread

from lungnode.domain import InstanceFacts

#: PS3.18 I.2.2: the Cxxx range is "cannot understand"; C122 is its own meaning.
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
#: At most this many reasons travel back as Warning header fields (PS3.18 8.3.5.1).
MAX_WARNINGS = 10


@dataclass(frozen=True)
class Failure:
    status: int
    reason: str
    sop_class_uid: str | None
    sop_instance_uid: str | None


@dataclass
class StoreReport:
    stored: list[InstanceFacts] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stored) + len(self.failed)

    @property
    def http_status(self) -> int:
        """PS3.18 Table 10.5.3-1."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def fail(self, status: int, reason: str, encoded: bytes | None) -> None:
        """Record a part that was not stored; its UIDs are read from it where they can be."""
        sop_class, sop_instance = identify(encoded) if encoded is not None else (None, None)
        self.failed.append(Failure(status, reason, sop_class, sop_instance))

    def response_module(self) -> dict[str, Any]:
        """The Store Instances Response Module (PS3.18 Table I.1-1) in DICOM JSON (PS3.18 F.2).

        Retrieve URL (Type 2) is present and empty: received instances are not
        offered for retrieval (the node's DICOMweb serves its results only).
        """
        module = Dataset()
        module.RetrieveURL = None
        if self.failed:
            module.FailedSOPSequence = [_failed_item(failure) for failure in self.failed]
        if self.stored:
            module.ReferencedSOPSequence = [_referenced_item(facts) for facts in self.stored]
        return dict(module.to_json_dict())

    def warnings(self) -> list[str]:
        """``Warning`` header values (RFC 7234 5.5, code 299) with each distinct reason."""
        reasons = list(dict.fromkeys(f"0x{f.status:04X} {f.reason}" for f in self.failed))
        return [f'299 lungnode "{_quoted(reason)}"' for reason in reasons[:MAX_WARNINGS]]


def _referenced_item(facts: InstanceFacts) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = facts.sop_class_uid
    item.ReferencedSOPInstanceUID = facts.sop_instance_uid
    item.RetrieveURL = None
    return item


def _failed_item(failure: Failure) -> Dataset:
    """The SOP Instance Reference Macro (PS3.3 Table 10-11) where the part could be read,
    and the Failure Reason; a part that is not DICOM at all has only the reason."""
    item = Dataset()
    if failure.sop_class_uid:
        item.ReferencedSOPClassUID = failure.sop_class_uid
    if failure.sop_instance_uid:
        item.ReferencedSOPInstanceUID = failure.sop_instance_uid
    item.FailureReason = failure.status
    return item


def identify(encoded: bytes) -> tuple[str | None, str | None]:
    """(SOP Class UID, SOP Instance UID) of a part, read leniently; None where unreadable."""
    try:
        dataset = dcmread(
            BytesIO(encoded),
            force=True,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        sop_class = dataset.get("SOPClassUID")
        sop_instance = dataset.get("SOPInstanceUID")
    except Exception:  # anything at all: the part is refused either way
        return None, None
    return (_uid(sop_class), _uid(sop_instance))


def _uid(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text if text and len(text) <= 64 and all(c in "0123456789." for c in text) else None


def _quoted(text: str) -> str:
    """Text safe inside a quoted-string of a header field (printable ASCII, no quotes)."""
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in text)[:200]
