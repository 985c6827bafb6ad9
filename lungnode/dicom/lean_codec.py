"""The bytes of the few PDUs and DIMSE command sets the lean C-STORE receiver speaks.

The lean receiver (:mod:`lungnode.dicom.lean_store`) reads and writes the Upper
Layer protocol itself, in the association's one thread. Negotiation uses
pynetdicom's PDU classes (once per association); what repeats per instance is
here, in plain bytes: P-DATA-TF and its PDVs (PS3.8 9.3.5, E.2), the command
set of a request (implicit VR little endian, group 0000, PS3.7 6.3.1, 9.3.1.1,
9.3.5.1) and of a response, and the file meta information that makes the
received data set a DICOM file (PS3.10 7.1), byte for byte what pynetdicom
writes (``tests/unit/test_lean_codec.py`` holds them equal).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# DIMSE command fields (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101

_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")


class ProtocolError(Exception):
    """The peer broke the Upper Layer or DIMSE protocol: the association is aborted."""


def pdu_header(data: bytes) -> tuple[int, int]:
    """(PDU type, length of what follows) of a 6-byte PDU header (PS3.8 9.3.1)."""
    pdu_type, _reserved, length = _HEADER.unpack(data)
    return pdu_type, length


@dataclass(frozen=True)
class PDV:
    """One presentation data value of a P-DATA-TF (PS3.8 9.3.5.1, E.2)."""

    context_id: int
    is_command: bool
    is_last: bool
    start: int
    end: int


def pdvs(body: bytes) -> Iterator[PDV]:
    """The PDVs of a P-DATA-TF body, as offsets into ``body``; raise ProtocolError."""
    offset, size = 0, len(body)
    if size == 0:
        raise ProtocolError("P-DATA-TF without a PDV")
    while offset < size:
        if size - offset < 6:
            raise ProtocolError("truncated PDV header")
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > size:
            raise ProtocolError("PDV length out of bounds")
        yield PDV(context_id, bool(control & 0x01), bool(control & 0x02), offset + 6, end)
        offset = end


def p_data(context_id: int, command: bool, payload: bytes, max_pdu: int) -> Iterator[bytes]:
    """``payload`` as P-DATA-TF PDUs of one PDV each, none over the peer's ``max_pdu``
    (its Maximum Length Received; 0 means unlimited, PS3.8 D.1)."""
    room = max(max_pdu - 6, 1) if max_pdu else len(payload) or 1
    chunks = [payload[i : i + room] for i in range(0, len(payload), room)] or [b""]
    for index, chunk in enumerate(chunks):
        control = (0x01 if command else 0x00) | (0x02 if index == len(chunks) - 1 else 0x00)
        pdv = _PDV_HEADER.pack(len(chunk) + 2, context_id, control) + chunk
        yield _HEADER.pack(P_DATA_TF, 0, len(pdv)) + pdv


def release_rp() -> bytes:
    return _HEADER.pack(A_RELEASE_RP, 0, 4) + bytes(4)


def abort(source: int, reason: int) -> bytes:
    """A-ABORT (PS3.8 9.3.8): source 0 service user, 2 service provider."""
    return _HEADER.pack(A_ABORT, 0, 4) + bytes([0, 0, source, reason])


def reject(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return _HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes([0, result, source, diagnostic])


@dataclass(frozen=True)
class Command:
    """What the receiver needs of a DIMSE request's command set."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    has_data_set: bool


def decode_command(data: bytes) -> Command:
    """A command set (implicit VR little endian, group 0000); raise ProtocolError."""
    values: dict[int, bytes] = {}
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < 8:
            raise ProtocolError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or length > size - offset:
            raise ProtocolError("malformed command set")
        values[element] = data[offset : offset + length]
        offset += length
    try:
        command_field = _unsigned_short(values[0x0100])
        data_set_type = _unsigned_short(values[0x0800])
    except (KeyError, struct.error) as exc:
        raise ProtocolError("command set without Command Field or Data Set Type") from exc
    message_id = values.get(0x0110, b"")
    return Command(
        command_field=command_field,
        message_id=_unsigned_short(message_id) if len(message_id) == 2 else 0,
        affected_sop_class_uid=_uid(values.get(0x0002, b"")),
        affected_sop_instance_uid=_uid(values.get(0x1000, b"")),
        has_data_set=data_set_type != NO_DATA_SET,
    )


def _unsigned_short(value: bytes) -> int:
    return int(struct.unpack("<H", value)[0])


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii", "replace")


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = text.encode("ascii", "replace")
    return value + pad if len(value) % 2 else value


def response(
    command_field: int,
    message_id: int,
    sop_class_uid: str,
    status: int,
    *,
    sop_instance_uid: str | None = None,
    error_comment: str | None = None,
) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set, with the elements pynetdicom sends."""
    elements = [
        _element(0x0002, _padded(sop_class_uid, b"\0")),
        _element(0x0100, struct.pack("<H", command_field)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
    ]
    if error_comment is not None:
        elements.append(_element(0x0902, _padded(error_comment, b" ")))
    if sop_instance_uid is not None:
        elements.append(_element(0x1000, _padded(sop_instance_uid, b"\0")))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


_PREAMBLE = b"\0" * 128 + b"DICM"
_META_VERSION = b"\x00\x01"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return (
            struct.pack("<HH", 0x0002, element)
            + vr
            + b"\0\0"
            + struct.pack("<L", len(value))
            + value
        )
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def file_preamble_and_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> bytes:
    """Preamble, ``DICM`` and file meta information (explicit VR LE, PS3.10 7.1), as
    pynetdicom's ``create_file_meta`` and ``encode_file_meta`` make them."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", _META_VERSION),
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
            _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return _PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body
