"""WADO-RS (PS3.18 10.4): retrieve the node's result objects, their metadata, frames
and bulk data.

- ``/studies/{study}[/series/{series}[/instances/{instance}]]``: the instances as
  ``multipart/related; type="application/dicom"``, each file streamed from disk
  as stored (never a whole study in memory);
- the same with ``/metadata``: ``application/dicom+json``, an array of datasets
  without bulk data (PS3.18 10.4.1.1.2), streamed one instance at a time;
- ``.../instances/{instance}/frames/{list}``: native frames of Pixel Data or
  Float Pixel Data as ``multipart/related; type="application/octet-stream"``;
- ``.../instances/{instance}/bulkdata/{tag}``: one top-level binary value, the
  target of the metadata's ``BulkDataURI``.

Unknown UIDs answer 404; an Accept none of this can satisfy answers 406.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from flask import Blueprint, Response, request
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import BYTES_VR

from lungnode.api import dicomweb_index as index
from lungnode.api.dicom_json import DICOM_JSON, metadata_json
from lungnode.api.dicomweb_media import (
    Part,
    accepts_json,
    accepts_multipart,
    multipart_body,
    multipart_content_type,
    new_boundary,
)
from lungnode.api.dicomweb_query import base_url, not_acceptable
from lungnode.api.errors import APIError
from lungnode.db.result_index import StoredResult

logger = logging.getLogger(__name__)

dicomweb_retrieve_blueprint = Blueprint("dicomweb_retrieve", __name__)

DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
#: Bits per sample of each pixel data element that holds native frames (PS3.3 C.7.6.3).
_PIXEL_ELEMENTS = {0x7FE00010: None, 0x7FE00008: 32, 0x7FE00009: 64}


def _instances(study: str, series: str | None = None, sop: str | None = None) -> list[StoredResult]:
    entry = index.find_study(study)
    found = entry.instances if entry is not None else []
    if series is not None:
        found = [i for i in found if i.series_instance_uid == series]
    if sop is not None:
        found = [i for i in found if i.sop_instance_uid == sop]
    if not found:
        named = " / ".join(uid for uid in (study, series, sop) if uid is not None)
        raise APIError(404, "not_found", f"no result object {named}")
    return found


def _transfer_syntax(result: StoredResult) -> str:
    header = index.header(result.path)
    if header is None:
        raise APIError(404, "not_found", f"result object {result.sop_instance_uid} is gone")
    return str(header.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))


def _retrieve(found: list[StoredResult]) -> Response:
    accept = request.headers.get("Accept")
    syntaxes = [_transfer_syntax(result) for result in found]
    if not all(accepts_multipart(accept, DICOM, syntax) for syntax in set(syntaxes)):
        raise not_acceptable("instances")
    url = base_url()
    parts = [
        Part(
            f"{DICOM}; transfer-syntax={syntax}",
            path=result.path,
            location=index.instance_url(url, result),
        )
        for result, syntax in zip(found, syntaxes, strict=True)
    ]
    boundary = new_boundary()
    return Response(
        multipart_body(parts, boundary),
        content_type=multipart_content_type(DICOM, boundary),
        direct_passthrough=True,
    )


def _metadata(found: list[StoredResult]) -> Response:
    if not accepts_json(request.headers.get("Accept")):
        raise not_acceptable("metadata")
    url = base_url()

    def body() -> Iterator[bytes]:
        yield b"["
        for n, result in enumerate(found):
            dataset = dcmread(result.path)
            prefix = index.instance_url(url, result) + "/bulkdata/"

            def bulk_data_uri(tag: int, prefix: str = prefix) -> str:
                return f"{prefix}{tag:08X}"

            document = metadata_json(dataset, bulk_data_uri)
            yield (b"," if n else b"") + json.dumps(document).encode()
        yield b"]"

    return Response(body(), content_type=DICOM_JSON, direct_passthrough=True)


@dicomweb_retrieve_blueprint.get("/studies/<study>")
@index.read_access
def retrieve_study(study: str) -> Response:
    """Retrieve every result instance of a study (PS3.18 10.4.1, Study resource)."""
    return _retrieve(_instances(study))


@dicomweb_retrieve_blueprint.get("/studies/<study>/series/<series>")
@index.read_access
def retrieve_series(study: str, series: str) -> Response:
    """Retrieve the instances of a series."""
    return _retrieve(_instances(study, series))


@dicomweb_retrieve_blueprint.get("/studies/<study>/series/<series>/instances/<instance>")
@index.read_access
def retrieve_instance(study: str, series: str, instance: str) -> Response:
    """Retrieve one instance (still a multipart body, of one part)."""
    return _retrieve(_instances(study, series, instance))


@dicomweb_retrieve_blueprint.get("/studies/<study>/metadata")
@index.read_access
def study_metadata(study: str) -> Response:
    """The metadata of every result instance of a study."""
    return _metadata(_instances(study))


@dicomweb_retrieve_blueprint.get("/studies/<study>/series/<series>/metadata")
@index.read_access
def series_metadata(study: str, series: str) -> Response:
    """The metadata of the instances of a series."""
    return _metadata(_instances(study, series))


@dicomweb_retrieve_blueprint.get("/studies/<study>/series/<series>/instances/<instance>/metadata")
@index.read_access
def instance_metadata(study: str, series: str, instance: str) -> Response:
    """The metadata of one instance (an array of one dataset)."""
    return _metadata(_instances(study, series, instance))


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise APIError(400, "bad_request", f"{text!r} is not a list of frame numbers") from None
    if not numbers or min(numbers) < 1:
        raise APIError(400, "bad_request", "frame numbers start at 1")
    return numbers


@dicomweb_retrieve_blueprint.get(
    "/studies/<study>/series/<series>/instances/<instance>/frames/<frames>"
)
@index.read_access
def retrieve_frames(study: str, series: str, instance: str, frames: str) -> Response:
    """Native frames of an image (PS3.18 10.4.1, Frames resource), uncompressed."""
    numbers = _frame_numbers(frames)
    (result,) = _instances(study, series, instance)
    syntax = _transfer_syntax(result)
    if syntax != ExplicitVRLittleEndian:
        raise APIError(406, "not_acceptable", f"frames of {syntax} are not served")
    if not accepts_multipart(request.headers.get("Accept"), OCTET_STREAM, syntax):
        raise not_acceptable("frames")
    dataset = dcmread(result.path)
    tag = next((t for t in _PIXEL_ELEMENTS if t in dataset), None)
    if tag is None:
        raise APIError(404, "not_found", f"instance {instance} has no frames")
    bits = _PIXEL_ELEMENTS[tag] or int(dataset.BitsAllocated)
    size = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1))
    size = size * bits // 8
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    if max(numbers) > count:
        raise APIError(404, "not_found", f"instance {instance} has {count} frame(s)")
    pixels = dataset[tag].value
    parts = [
        Part(
            f"{OCTET_STREAM}; transfer-syntax={syntax}",
            payload=bytes(pixels[(n - 1) * size : n * size]),
        )
        for n in numbers
    ]
    boundary = new_boundary()
    return Response(
        multipart_body(parts, boundary), content_type=multipart_content_type(OCTET_STREAM, boundary)
    )


@dicomweb_retrieve_blueprint.get(
    "/studies/<study>/series/<series>/instances/<instance>/bulkdata/<tag>"
)
@index.read_access
def retrieve_bulk_data(study: str, series: str, instance: str, tag: str) -> Response:
    """One top-level binary value of an instance (PS3.18 10.4.1, Bulkdata resource)."""
    try:
        number = int(tag, 16) if len(tag) == 8 else -1
    except ValueError:
        number = -1
    if number < 0:
        raise APIError(404, "not_found", f"{tag!r} is not a tag")
    (result,) = _instances(study, series, instance)
    syntax = _transfer_syntax(result)
    if not accepts_multipart(request.headers.get("Accept"), OCTET_STREAM, syntax):
        raise not_acceptable("bulk data")
    dataset = dcmread(result.path)
    if number not in dataset or dataset[number].VR not in BYTES_VR:
        raise APIError(404, "not_found", f"instance {instance} has no bulk data {tag}")
    parts = [Part(f"{OCTET_STREAM}; transfer-syntax={syntax}", payload=dataset[number].value)]
    boundary = new_boundary()
    return Response(
        multipart_body(parts, boundary), content_type=multipart_content_type(OCTET_STREAM, boundary)
    )
