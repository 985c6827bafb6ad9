"""A streaming reader of ``multipart/related`` bodies (RFC 2387, RFC 2046 5.1), for STOW-RS.

A STOW-RS request (PS3.18 10.5.1) carries its instances as the parts of one
``multipart/related; type="application/dicom"`` body, which may be as large as
a whole study. The body is read in bounded chunks and each part's payload is
spooled to a temporary file of its own, so that no more than one chunk (plus a
boundary's length) of the request is ever in memory. The caller gets each
part once it is complete, and owns (and removes) its file from then on; a part
cut short is removed here, and the error raised.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

DICOM = "application/dicom"
#: RFC 2046 5.1.1: characters from these, not ending in a space; at most 70 there, but
#: senders write longer ones (Orthanc's DICOMweb plugin: 73), so up to 200 are read.
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,199}[0-9A-Za-z'()+_,\-./:=?]$")
CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 * 1024


class UnsupportedMediaType(ValueError):
    """The request is not ``multipart/related`` of ``application/dicom`` parts (HTTP 415)."""


class MalformedBody(ValueError):
    """The body is not a well-formed multipart body for its boundary (HTTP 400)."""


@dataclass(frozen=True)
class Part:
    """One complete part: its header fields (names in lower case) and its spooled payload."""

    headers: dict[str, str]
    path: Path
    size: int

    @property
    def content_type(self) -> str | None:
        """The part's media type in lower case, without parameters; None when not given."""
        value = self.headers.get("content-type")
        if value is None:
            return None
        return media_type(value)


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value, in lower case, without parameters."""
    return _parameters(content_type or "")[0]


#: One ``; name=value`` parameter (RFC 9110 5.6.6); the value a quoted string or, leniently,
#: anything up to the next ``;`` (senders write ``type=application/dicom`` unquoted,
#: although ``/`` is not a token character).
_PARAMETER = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _parameters(content_type: str) -> tuple[str, dict[str, str]]:
    """(media type in lower case, parameters by lower-case name) of a Content-Type."""
    mimetype, _, rest = content_type.partition(";")
    parameters: dict[str, str] = {}
    for name, value in _PARAMETER.findall(";" + rest):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        parameters.setdefault(name.lower(), value)
    return mimetype.strip().lower(), parameters


def dicom_boundary(content_type: str | None) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` Content-Type.

    The ``type`` parameter may be quoted or not, and may be left out (RFC 2387
    makes it required; the parts' own Content-Type then says what they are).
    Raises :class:`UnsupportedMediaType` for another media type,
    :class:`MalformedBody` for a missing or invalid boundary.
    """
    mimetype, options = _parameters(content_type or "")
    if mimetype != "multipart/related":
        raise UnsupportedMediaType(
            f'expected multipart/related; type="{DICOM}", not {mimetype or "no Content-Type"!r}'
        )
    part_type = options.get("type")
    if part_type is not None and media_type(part_type) != DICOM:
        raise UnsupportedMediaType(
            f"only parts of type {DICOM} are accepted, not {part_type!r} "
            "(PS3.18 10.5.1: the metadata and bulk data forms are not supported)"
        )
    boundary = options.get("boundary")
    if not boundary:
        raise MalformedBody("the Content-Type has no boundary parameter")
    if not _BOUNDARY.match(boundary):
        raise MalformedBody("the boundary is not a valid RFC 2046 boundary")
    return boundary


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and last is not None:  # obsolete line folding (RFC 5322 3.2.2)
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MalformedBody("a part header line is not 'Name: value'")
        last = name.strip().lower()
        headers[last] = value.strip()
    return headers


class _Reader:
    """A buffer over the request stream, filled ``chunk`` bytes at a time."""

    def __init__(self, stream: IO[bytes], chunk: int) -> None:
        self.stream = stream
        self.chunk = chunk
        # A delimiter is CRLF "--" boundary; the first may open the body without the CRLF.
        self.buffer = bytearray(b"\r\n")
        self.eof = False

    def fill(self) -> bool:
        """Read one more chunk; False at the end of the body."""
        if self.eof:
            return False
        data = self.stream.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def need(self, size: int) -> bool:
        """At least ``size`` bytes buffered, reading as needed; False if the body ends first."""
        while len(self.buffer) < size:
            if not self.fill():
                return False
        return True


def iter_parts(
    stream: IO[bytes],
    boundary: str,
    spool_dir: Path,
    *,
    chunk: int = CHUNK_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Generator[Part, None, None]:
    """Each part of the body, spooled to ``spool_dir`` (``.stow-*.part`` files), in order.

    The caller removes each part's file when done with it. Raises
    :class:`MalformedBody` when the body has no delimiter, a part's headers
    are malformed or too long, or the body ends inside a part or before the
    close delimiter; the file of a part cut short is removed first. Errors
    of the stream itself (too large, a client gone) pass through.
    """
    delimiter = b"\r\n--" + boundary.encode("ascii")
    reader = _Reader(stream, chunk)
    # The preamble, up to the first delimiter, is ignored (RFC 2046 5.1.1).
    while (found := reader.buffer.find(delimiter)) < 0:
        del reader.buffer[: max(0, len(reader.buffer) - len(delimiter) + 1)]
        if not reader.fill():
            raise MalformedBody("the body does not contain the boundary of its Content-Type")
    del reader.buffer[: found + len(delimiter)]
    while True:
        if not reader.need(2):
            raise MalformedBody("the body ends after a delimiter: truncated")
        if reader.buffer[:2] == b"--":
            return  # the close delimiter; the epilogue is ignored
        # Transport padding, then the CRLF ending the delimiter line, then the headers.
        while (end := reader.buffer.find(b"\r\n\r\n")) < 0:
            if len(reader.buffer) > max_header_bytes:
                raise MalformedBody("a part's headers are longer than allowed")
            if not reader.fill():
                raise MalformedBody("the body ends inside a part's headers: truncated")
        line_end = reader.buffer.find(b"\r\n")
        if reader.buffer[:line_end].strip(b" \t"):
            raise MalformedBody("text after a delimiter: the boundary does not match")
        if end > max_header_bytes:
            raise MalformedBody("a part's headers are longer than allowed")
        headers = _parse_headers(bytes(reader.buffer[line_end + 2 : end]))
        del reader.buffer[: end + 4]
        yield _spool_payload(reader, delimiter, headers, spool_dir)


def _spool_payload(
    reader: _Reader, delimiter: bytes, headers: dict[str, str], spool_dir: Path
) -> Part:
    """Write the payload up to the next delimiter to a new file; the Part, once complete."""
    fd, name = tempfile.mkstemp(dir=spool_dir, prefix=".stow-", suffix=".part")
    path = Path(name)
    size = 0
    complete = False
    try:
        with os.fdopen(fd, "wb") as spool:
            while (found := reader.buffer.find(delimiter)) < 0:
                # Keep what could be the start of a delimiter split between two chunks.
                keep = len(delimiter) - 1
                if len(reader.buffer) > keep:
                    spool.write(reader.buffer[:-keep])
                    size += len(reader.buffer) - keep
                    del reader.buffer[:-keep]
                if not reader.fill():
                    raise MalformedBody("the body ends inside a part: truncated")
            spool.write(reader.buffer[:found])
            size += found
            del reader.buffer[: found + len(delimiter)]
        complete = True
    finally:
        if not complete:
            path.unlink(missing_ok=True)
    return Part(headers, path, size)
