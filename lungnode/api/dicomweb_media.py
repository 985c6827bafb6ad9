"""Content negotiation and multipart bodies of DICOMweb (PS3.18 8.7, 8.6.1.2).

The node serves what it stores and never transcodes: a result object is sent in
its file's transfer syntax (Explicit VR Little Endian for everything lungnode
writes), which is also the default of ``application/dicom`` and of
``application/octet-stream`` (PS3.18 Table 8.7.3-2). An Accept that allows none
of that is answered 406.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

#: Bytes read from a file per chunk of a streamed body.
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: type/subtype and its parameters (lower-cased names)."""

    media_type: str
    parameters: dict[str, str]
    quality: float


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header (RFC 9110 12.5.1); none given: ``*/*``."""
    if not header or not header.strip():
        return [MediaRange("*/*", {}, 1.0)]
    ranges: list[MediaRange] = []
    for entry in _split(header, ","):
        pieces = _split(entry, ";")
        if not pieces or not pieces[0].strip():
            continue
        parameters: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            parameters[name.strip().lower()] = value.strip().strip('"')
        try:
            quality = float(parameters.pop("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append(MediaRange(pieces[0].strip().lower(), parameters, quality))
    return ranges


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes (``type="a/b"`` holds a ``/``)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def accepts_json(header: str | None) -> bool:
    """Whether a DICOM JSON body is acceptable (PS3.18 8.7.3.2: dicom+json, or json)."""
    wanted = {"application/dicom+json", "application/json", "application/*", "*/*"}
    return any(r.media_type in wanted for r in parse_accept(header))


def accepts_multipart(header: str | None, part_type: str, transfer_syntax: str) -> bool:
    """Whether ``multipart/related`` of ``part_type`` parts in ``transfer_syntax`` is acceptable.

    A range without ``type`` means ``part_type``; one without ``transfer-syntax``
    means the default, Explicit VR Little Endian; ``*`` means any.
    """
    for entry in parse_accept(header):
        if entry.media_type == "*/*":
            if transfer_syntax == ExplicitVRLittleEndian:
                return True
            continue
        if entry.media_type not in ("multipart/related", "multipart/*"):
            continue
        if entry.parameters.get("type", part_type).lower() not in (part_type, "*/*"):
            continue
        asked = entry.parameters.get("transfer-syntax", ExplicitVRLittleEndian)
        if asked in ("*", transfer_syntax):
            return True
    return False


@dataclass(frozen=True)
class Part:
    """One part of a multipart body: its Content-Type and its bytes (a file or in memory)."""

    content_type: str
    path: Path | None = None
    payload: bytes = b""
    location: str | None = None


def new_boundary() -> str:
    return f"lungnode-{uuid.uuid4().hex}"


def multipart_content_type(part_type: str, boundary: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def multipart_body(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """A ``multipart/related`` body (RFC 2387), each file read in chunks as it is sent."""
    delimiter = f"--{boundary}\r\n".encode()
    for part in parts:
        yield delimiter
        headers = f"Content-Type: {part.content_type}\r\n"
        if part.location:
            headers += f"Content-Location: {part.location}\r\n"
        yield (headers + "\r\n").encode()
        if part.path is None:
            yield part.payload
        else:
            with part.path.open("rb") as stream:
                while chunk := stream.read(CHUNK_BYTES):
                    yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()
