"""Deterministic UIDs and Series Numbers for the objects lungnode writes.

Why deterministic: a job that crashes after sending half of its results is
re-run, and the results are sent again. If the re-run minted fresh UIDs, the
PACS would store every object twice. Deriving the UIDs from what identifies a
result - the source series, the model (name and version), the analysis
version, the kind of output and its index - makes a re-run produce the very
same SOP Instance UIDs, which a PACS stores once (PS3.4 B.4.1: a C-STORE of an
existing SOP Instance UID does not create a new instance).

The UIDs are UUID-derived UIDs under the root ``2.25`` (PS3.5 B.2): the
decimal value of a UUID. The UUID is a *name-based* UUID (version 5, SHA-1,
ITU-T X.667 | ISO/IEC 9834-8 clause 14, RFC 9562 5.5), which PS3.5 B.2 admits
because it refers to X.667 for the UUID itself. Its name is the identifying
tuple above, under a fixed lungnode namespace, so two different tuples give
two different UIDs with the uniqueness guarantees of a UUID, and one tuple
always gives the same UID. The longest result is 5 + 39 = 44 characters,
within the 64 of PS3.5 9.1.

Callers must change ``analysis_version`` whenever a series is analysed again
with different input (for example after more slices arrived), so that the
new results are new instances instead of silently conflicting ones.

Series Numbers (IS, PS3.3 C.7.3.1) are deterministic too, never random::

    series number = 9000 + 10 * analysis_version + kind offset

with kind offsets 1 (Secondary Capture), 2 (Encapsulated PDF),
3 (Structured Report), 4 (Parametric Map) and 5 (Key Object Selection).
Analysis version 1 thus gives 9011 to 9015, which sort after every series a
scanner writes and group the outputs of one analysis together.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from lungnode.domain import ModelIdentity

OutputKind = Literal["sc", "pdf", "sr", "pm", "kos"]

#: The namespace of every lungnode name-based UUID: itself the version 5 UUID
#: of the name "lungnode" in the RFC 9562 OID namespace, written out so that
#: it never changes.
LUNGNODE_NAMESPACE = uuid.UUID("3fe9dd9f-adc5-532d-82ef-5406f881ecb2")

#: First Series Number of lungnode outputs (see the module docstring).
SERIES_NUMBER_BASE = 9000

_KIND_OFFSETS: dict[str, int] = {"sc": 1, "pdf": 2, "sr": 3, "pm": 4, "kos": 5}
#: IS values are signed 32-bit (PS3.5 6.2).
_MAX_IS = 2**31 - 1


def _check_kind(kind: str) -> None:
    if kind not in _KIND_OFFSETS:
        known = ", ".join(sorted(_KIND_OFFSETS))
        raise ValueError(f"unknown output kind {kind!r}; known kinds: {known}")


def _check_version(analysis_version: int) -> None:
    if isinstance(analysis_version, bool) or not isinstance(analysis_version, int):
        raise ValueError(f"analysis_version must be an int, got {analysis_version!r}")
    if analysis_version < 0:
        raise ValueError(f"analysis_version must be >= 0, got {analysis_version}")


def uuid_derived_uid(*parts: str) -> str:
    """A ``2.25`` UID (PS3.5 B.2) from a name-based UUID of ``parts``.

    Each part is length-prefixed before joining, so that ``("a|b", "c")`` and
    ``("a", "b|c")`` can never name the same UUID.
    """
    name = "\x1f".join(f"{len(part)}:{part}" for part in parts)
    return f"2.25.{uuid.uuid5(LUNGNODE_NAMESPACE, name).int}"


@dataclass(frozen=True)
class OutputSeries:
    """The identity of one output series: its UIDs and its Series Number."""

    source_series_uid: str
    model_name: str
    model_version: str
    analysis_version: int
    kind: OutputKind

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        _check_version(self.analysis_version)
        if not self.source_series_uid:
            raise ValueError("source_series_uid is empty")

    @classmethod
    def for_model(
        cls,
        source_series_uid: str,
        model: ModelIdentity,
        analysis_version: int,
        kind: OutputKind,
    ) -> OutputSeries:
        """The output series of ``kind`` for a source series analysed by ``model``."""
        return cls(source_series_uid, model.name, model.version, analysis_version, kind)

    def _parts(self) -> tuple[str, ...]:
        return (
            "lungnode-output",
            self.source_series_uid,
            self.model_name,
            self.model_version,
            str(self.analysis_version),
            self.kind,
        )

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID (0020,000E) of the output series."""
        return uuid_derived_uid(*self._parts(), "series")

    def sop_instance_uid(self, index: int) -> str:
        """SOP Instance UID (0008,0018) of the ``index``-th (0-based) instance."""
        if index < 0:
            raise ValueError(f"instance index must be >= 0, got {index}")
        return uuid_derived_uid(*self._parts(), "instance", str(index))

    @property
    def series_number(self) -> int:
        """Series Number (0020,0011); see the module docstring."""
        return series_number(self.kind, self.analysis_version)


def series_number(kind: OutputKind, analysis_version: int) -> int:
    """``9000 + 10 * analysis_version + offset(kind)``; raise if it overflows IS."""
    _check_kind(kind)
    _check_version(analysis_version)
    number = SERIES_NUMBER_BASE + 10 * analysis_version + _KIND_OFFSETS[kind]
    if number > _MAX_IS:
        raise ValueError(f"analysis_version {analysis_version} is too large for a Series Number")
    return number
