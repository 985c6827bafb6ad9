"""What intake needs from a received instance, read without pydicom when that is safe.

Intake checks every C-STORE data set before it stores it (``dicom.intake``):
the four UIDs, the CT rule (``dicom.modality``), complete pixel data, and the
facts the database and the series assembler keep. Through pydicom that costs
about 2 ms an instance, a large share of what one instance costs to receive,
for some fifteen short values. Almost every instance a PACS routes to us is
an uncompressed little-endian slice whose header holds nothing unusual, and
for those :func:`read_instance_header` reads the same values straight from
the encoded bytes (the element walker of ``dicom.native_slice``).

It is a fast path, never the only path, and it never decides alone against
an instance: it returns None for anything it does not read exactly as the
pydicom path does (another transfer syntax, a missing or empty required
attribute, an invalid UID, a value that is not a plain number, pixel data
shorter than the header says or followed by more elements, non-ASCII text),
and intake then parses with pydicom, which accepts the instance or says what
is wrong. ``tests/unit/test_instance_header.py`` checks that both paths give
the same facts and the same CT verdict.
"""

from __future__ import annotations

import re

from lungnode.dicom import native_slice
from lungnode.dicom.modality import why_not_ct_values
from lungnode.domain import InstanceFacts

# PS3.5 9.1: digits and dots, no empty component, at most 64 characters. Being
# strict here is what makes a UID safe to use as a path component.
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_PATTERN.match(value))


_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_MODALITY = 0x00080060
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_INSTANCE_NUMBER = 0x00200013
_IMAGE_POSITION = 0x00200032
_IMAGE_ORIENTATION = 0x00200037
_IMAGES_IN_ACQUISITION = 0x00201002
_SAMPLES_PER_PIXEL = 0x00280002
_PHOTOMETRIC = 0x00280004
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100

#: The attributes read, with their VR (PS3.6); an explicit VR other than that goes to pydicom.
_VR = {
    _SOP_CLASS_UID: b"UI",
    _SOP_INSTANCE_UID: b"UI",
    _MODALITY: b"CS",
    _STUDY_INSTANCE_UID: b"UI",
    _SERIES_INSTANCE_UID: b"UI",
    _SERIES_NUMBER: b"IS",
    _INSTANCE_NUMBER: b"IS",
    _IMAGE_POSITION: b"DS",
    _IMAGE_ORIENTATION: b"DS",
    _IMAGES_IN_ACQUISITION: b"IS",
    _SAMPLES_PER_PIXEL: b"US",
    _PHOTOMETRIC: b"CS",
    _NUMBER_OF_FRAMES: b"IS",
    _ROWS: b"US",
    _COLUMNS: b"US",
    _BITS_ALLOCATED: b"US",
}
_WANTED = frozenset(_VR)

#: IS and DS values this path reads as pydicom would (PS3.5 6.2); others go to pydicom.
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_DECIMAL = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")


class _Unusual(Exception):
    """Something pydicom should read and judge."""


def read_instance_header(encoded: bytes) -> tuple[InstanceFacts, str | None] | None:
    """(facts, why it is not a CT image or None) for a plain instance; None otherwise.

    ``encoded`` is a Part 10 stream (preamble, file meta, data set), as the SCP
    hands it to intake.
    """
    vrs: dict[int, bytes] = {}
    found = native_slice.read_top_level(encoded, _WANTED, vrs)
    if found is None or any(_VR[tag] != vr for tag, vr in vrs.items()):
        return None
    syntax, values, pixel_offset, pixel_length = found
    if pixel_offset + pixel_length != len(encoded):
        return None  # elements after Pixel Data: pydicom reads and checks them
    try:
        return _read(syntax, values, pixel_length)
    except (_Unusual, UnicodeDecodeError):
        return None


def _read(
    syntax: str, values: dict[int, bytes], pixel_length: int
) -> tuple[InstanceFacts, str | None]:
    uids = {tag: _uid(values, tag) for tag in (_SOP_CLASS_UID, _SOP_INSTANCE_UID)}
    uids |= {tag: _uid(values, tag) for tag in (_STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID)}
    rows, columns = _unsigned(values, _ROWS), _unsigned(values, _COLUMNS)
    bits_allocated = _unsigned(values, _BITS_ALLOCATED)
    if rows is None or columns is None or bits_allocated is None:
        raise _Unusual("Rows, Columns or Bits Allocated missing")
    samples = _unsigned(values, _SAMPLES_PER_PIXEL)
    frames = _integer(values, _NUMBER_OF_FRAMES) or 1
    expected = rows * columns * (samples or 1) * frames * bits_allocated // 8
    if pixel_length < expected:
        raise _Unusual("pixel data shorter than the header says")
    modality = _text(values, _MODALITY)
    facts = InstanceFacts(
        study_instance_uid=uids[_STUDY_INSTANCE_UID],
        series_instance_uid=uids[_SERIES_INSTANCE_UID],
        sop_instance_uid=uids[_SOP_INSTANCE_UID],
        sop_class_uid=uids[_SOP_CLASS_UID],
        transfer_syntax_uid=syntax,
        modality=modality or None,
        series_number=_integer(values, _SERIES_NUMBER),
        instance_number=_integer(values, _INSTANCE_NUMBER),
        number_of_frames=frames,
        position=_decimals(values, _IMAGE_POSITION, 3),
        orientation=_decimals(values, _IMAGE_ORIENTATION, 6),
        declared_count=_integer(values, _IMAGES_IN_ACQUISITION),
    )
    reason = why_not_ct_values(
        sop_class=facts.sop_class_uid,
        modality=modality,
        samples=samples,
        photometric=_text(values, _PHOTOMETRIC),
    )
    return facts, reason


def _text(values: dict[int, bytes], tag: int) -> str:
    """A single-valued text value without padding; "" when absent or empty."""
    raw = values.get(tag)
    if raw is None:
        return ""
    text = raw.decode("ascii").rstrip(" \x00")
    if "\\" in text or text[:1].isspace() or any(c < " " for c in text):
        raise _Unusual("multi-valued, leading space or control character")
    return text


def _uid(values: dict[int, bytes], tag: int) -> str:
    text = _text(values, tag)
    if not is_valid_uid(text):
        raise _Unusual("missing or invalid UID")
    return text


def _integer(values: dict[int, bytes], tag: int) -> int | None:
    text = _text(values, tag).strip()
    if not text:
        return None
    if not _INTEGER.match(text):
        raise _Unusual("not a plain integer string")
    return int(text)


def _decimals(values: dict[int, bytes], tag: int, count: int) -> list[float] | None:
    raw = values.get(tag)
    if raw is None:
        return None
    text = raw.decode("ascii").rstrip(" \x00")
    if not text:
        return None
    parts = [part.strip() for part in text.split("\\")]
    if len(parts) != count or not all(_DECIMAL.match(part) for part in parts):
        raise _Unusual("not plain decimal strings, or not as many as expected")
    return [float(part) for part in parts]


def _unsigned(values: dict[int, bytes], tag: int) -> int | None:
    """A single US value (2 bytes); None when absent."""
    raw = values.get(tag)
    if raw is None:
        return None
    if len(raw) != 2:
        raise _Unusual("not one 16-bit value")
    return int.from_bytes(raw, "little")
