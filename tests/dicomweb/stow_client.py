"""Building STOW-RS requests the way a sender does, for the tests (PS3.18 10.5.1)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

BOUNDARY = "lungnode-stow-test-boundary"


def multipart_body(
    payloads: Sequence[bytes], boundary: str = BOUNDARY, part_type: str | None = "application/dicom"
) -> bytes:
    """A whole ``multipart/related`` body: one part per payload, then the close delimiter."""
    body = bytearray()
    for payload in payloads:
        body += f"--{boundary}\r\n".encode()
        if part_type is not None:
            body += f"Content-Type: {part_type}\r\n".encode()
        body += b"\r\n" + payload + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def content_type(boundary: str = BOUNDARY, quoted: bool = True) -> str:
    kind = '"application/dicom"' if quoted else "application/dicom"
    return f"multipart/related; type={kind}; boundary={boundary}"


def chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body as a generator: ``requests`` sends it chunked, without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]
