"""The streaming multipart/related reader: parts whole and in order, whatever the chunk
size; every malformed body refused with nothing left in the spool folder."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lungnode.api.multipart_related import (
    MalformedBody,
    UnsupportedMediaType,
    dicom_boundary,
    iter_parts,
)
from tests.dicomweb.stow_client import BOUNDARY, multipart_body


def read_all(body: bytes, spool: Path, chunk: int = 7) -> list[tuple[dict[str, str], bytes]]:
    spool.mkdir(exist_ok=True)
    parts = []
    for part in iter_parts(io.BytesIO(body), BOUNDARY, spool, chunk=chunk):
        parts.append((part.headers, part.path.read_bytes()))
        assert part.size == len(parts[-1][1])
        part.path.unlink()
    return parts


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_parts_come_whole_whatever_the_chunk_size(tmp_path: Path, chunk: int) -> None:
    # Payloads that hold pieces of the delimiter, CRLFs and dashes.
    near_miss = b"\r\n\r\n--" + BOUNDARY.encode()[:-1]
    payloads = [b"", b"\r\n--lungnode", b"x" * 1000 + b"\r\n--", near_miss]
    body = b"preamble to ignore\r\n" + multipart_body(payloads) + b"epilogue"
    parts = read_all(body, tmp_path / "spool", chunk)
    assert [payload for _headers, payload in parts] == payloads
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in parts)
    assert list((tmp_path / "spool").iterdir()) == []


def test_transport_padding_and_headerless_parts(tmp_path: Path) -> None:
    body = (
        f"--{BOUNDARY}  \t\r\n\r\nfirst\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
        f" ; folded\r\n\r\nsecond\r\n--{BOUNDARY}--"
    ).encode()
    parts = read_all(body, tmp_path / "spool")
    assert parts == [({}, b"first"), ({"content-type": "application/dicom ; folded"}, b"second")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"no delimiter at all", "does not contain the boundary"),
        (multipart_body([b"abc"], boundary="another-boundary"), "does not contain the boundary"),
        (multipart_body([b"abc"])[:-30], "truncated"),
        (multipart_body([b"abc"])[: -len(f"--{BOUNDARY}--\r\n")], "truncated"),
        (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode(), "truncated"),
        (f"--{BOUNDARY}X\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), "boundary does not match"),
        (f"--{BOUNDARY}\r\nno colon here\r\n\r\nabc\r\n--{BOUNDARY}--".encode(), "Name: value"),
        (f"--{BOUNDARY}\r\nX: {'y' * 20000}\r\n\r\n".encode(), "longer than allowed"),
    ],
)
def test_malformed_bodies_leave_nothing_spooled(tmp_path: Path, body: bytes, message: str) -> None:
    spool = tmp_path / "spool"
    with pytest.raises(MalformedBody, match=message):
        read_all(body, spool)
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize(
    ("header", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc', "abc"),
        ("multipart/related; type=application/dicom; boundary=abc", "abc"),
        ('Multipart/Related; boundary="a b:c"; type="Application/DICOM"', "a b:c"),
        ("multipart/related; boundary=abc", "abc"),
        # Orthanc's DICOMweb plugin: two UUIDs, 73 characters (RFC 2046 says at most 70).
        (f"multipart/related; boundary={'a' * 36}-{'b' * 36}", f"{'a' * 36}-{'b' * 36}"),
    ],
)
def test_content_types_accepted(header: str, boundary: str) -> None:
    assert dicom_boundary(header) == boundary


@pytest.mark.parametrize(
    "header",
    [
        None,
        "application/dicom",
        "multipart/form-data; boundary=abc",
        'multipart/related; type="application/dicom+json"; boundary=abc',
        'multipart/related; type="application/octet-stream"; boundary=abc',
    ],
)
def test_content_types_refused(header: str | None) -> None:
    with pytest.raises(UnsupportedMediaType):
        dicom_boundary(header)


@pytest.mark.parametrize(
    "header",
    ['multipart/related; type="application/dicom"', 'multipart/related; boundary="a\x01b"'],
)
def test_missing_or_invalid_boundary(header: str) -> None:
    with pytest.raises(MalformedBody):
        dicom_boundary(header)
