"""QIDO-RS query parsing and matching (PS3.18 8.3.4, PS3.4 C.2.2.2), and DICOMweb
content negotiation (PS3.18 8.7), as pure functions."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from lungnode.api.dicomweb_media import Part, accepts_json, accepts_multipart, multipart_body
from lungnode.api.dicomweb_search import Level, matchable_keys, parse_search

STUDY_KEYS = matchable_keys(Level.STUDY)
ELE = "1.2.840.10008.1.2.1"


def _study() -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3.4"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "SYN0001"
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC42"
    ds.ModalitiesInStudy = ["SR", "OT", "DOC"]
    return ds


@pytest.mark.parametrize(
    ("key", "value", "hit"),
    [
        ("PatientID", "SYN0001", True),
        ("PatientID", "syn0001", False),
        ("PatientID", "", True),
        ("PatientID", "SYN*", True),
        ("PatientID", "SYN000?", True),
        ("PatientID", "?YN", False),
        ("PatientName", "phantom*", True),
        ("PatientName", "PHANTOM^SYNTHETIC", True),
        ("StudyInstanceUID", "1.2.3.4", True),
        ("StudyInstanceUID", "9.9,1.2.3.4", True),
        ("StudyInstanceUID", "9.9\\1.2.3.4", True),
        ("StudyInstanceUID", "1.2.3", False),
        ("StudyDate", "20240315", True),
        ("StudyDate", "20240101-20241231", True),
        ("StudyDate", "20240316-", False),
        ("StudyDate", "-20240315", True),
        ("StudyTime", "1000-1100", True),
        ("StudyTime", "1016-", False),
        ("AccessionNumber", "ACC4*", True),
        ("ModalitiesInStudy", "DOC", True),
        ("Modality", "SR", True),
        ("ModalitiesInStudy", "CT", False),
        ("00100020", "SYN0001", True),
    ],
)
def test_matching(key: str, value: str, hit: bool) -> None:
    search = parse_search({key: [value]}, STUDY_KEYS)
    assert search.matches(_study()) is hit


def test_an_attribute_the_record_lacks_matches_only_universally() -> None:
    assert parse_search({"StudyID": [""]}, STUDY_KEYS).matches(_study())
    assert not parse_search({"StudyID": ["1"]}, STUDY_KEYS).matches(_study())


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"Nonsense": ["1"]}, "neither a DICOM attribute keyword nor a tag"),
        ({"FFFF0001": ["1"]}, "not a tag of the DICOM data dictionary"),
        ({"SOPInstanceUID": ["1.2"]}, "not a query key of this search"),
        ({"StudyInstanceUID": ["1.2.x"]}, "not a UID"),
        ({"StudyDate": ["2024"]}, "YYYYMMDD"),
        ({"StudyDate": ["20240102-20240101"]}, "ends before it starts"),
        ({"StudyDate": ["-"]}, "not a range"),
        ({"limit": ["0"]}, "limit must be"),
        ({"limit": ["x"]}, "not an integer"),
        ({"offset": ["-1"]}, "offset must be"),
        ({"fuzzymatching": ["maybe"]}, "true or false"),
        ({"includefield": ["NoSuchThing"]}, "neither"),
        ({"PatientID": ["a", "b"]}, "once"),
    ],
)
def test_bad_queries_raise_with_a_reason(arguments: dict[str, list[str]], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_search(arguments, STUDY_KEYS)


def test_paging_and_includefield() -> None:
    search = parse_search(
        {"limit": ["5"], "offset": ["10"], "includefield": ["00081030,StudyID", "all"]},
        STUDY_KEYS,
    )
    assert (search.limit, search.offset) == (5, 10)
    assert search.include == ("StudyDescription", "StudyID")
    assert search.include_all
    assert parse_search({"fuzzymatching": ["true"]}, STUDY_KEYS).matchers == ()


def test_series_keys_of_a_search_below_the_study() -> None:
    keys = matchable_keys(Level.SERIES, Level.INSTANCE)
    assert "Modality" in keys and "SOPInstanceUID" in keys and "PatientID" not in keys


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        (None, True),
        ("*/*", True),
        ("application/dicom+json", True),
        ("application/json;q=0.5, text/html", True),
        ("application/dicom+xml", False),
        ("application/dicom+json;q=0", False),
    ],
)
def test_json_negotiation(accept: str | None, ok: bool) -> None:
    assert accepts_json(accept) is ok


@pytest.mark.parametrize(
    ("accept", "syntax", "ok"),
    [
        (None, ELE, True),
        ("*/*", ELE, True),
        ("*/*", "1.2.840.10008.1.2", False),
        ('multipart/related; type="application/dicom"', ELE, True),
        ("multipart/related; type=application/dicom", ELE, True),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=*',
            "1.2.840.10008.1.2",
            True,
        ),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2',
            ELE,
            False,
        ),
        ('multipart/related; type="application/dicom+xml"', ELE, False),
        ("multipart/related", ELE, True),
        ("application/dicom", ELE, False),
        ('text/html, multipart/related; type="application/dicom"; q=0.2', ELE, True),
    ],
)
def test_multipart_negotiation(accept: str | None, syntax: str, ok: bool) -> None:
    assert accepts_multipart(accept, "application/dicom", syntax) is ok


def test_a_multipart_body_streams_each_part(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "object.dcm"
    path.write_bytes(b"\x00\r\n--x" * 40000)
    chunks = list(multipart_body([Part("a/b", path=path), Part("c/d", payload=b"pay")], "B"))
    assert max(len(c) for c in chunks) <= 64 * 1024
    body = b"".join(chunks)
    assert body == (
        b"--B\r\nContent-Type: a/b\r\n\r\n" + path.read_bytes() + b"\r\n"
        b"--B\r\nContent-Type: c/d\r\n\r\npay\r\n--B--\r\n"
    )
