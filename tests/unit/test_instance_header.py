"""Intake's fast header path (``dicom.instance_header``) reads what the pydicom path
reads, or leaves the instance to it: never other facts, never another verdict."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from lungnode.dicom.instance_header import read_instance_header
from lungnode.dicom.intake import parse_instance, read_instance
from lungnode.dicom.modality import why_not_ct
from lungnode.domain import InstanceFacts
from lungnode.errors import IntakeError
from tests.support.synthetic import dataset_bytes, make_ct_series

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _pydicom_path(encoded: bytes) -> tuple[InstanceFacts, str | None] | None:
    """The pydicom path as intake runs it in production (warnings do not fail it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset, facts = parse_instance(encoded)
            return facts, why_not_ct(dataset)
        except Exception:  # IntakeError, or a value the CT rule cannot decode
            return None


def _plain_slice(syntax: str = ExplicitVRLittleEndian, **changes: object) -> bytes:
    dataset = make_ct_series(1, rows=64, columns=64, transfer_syntax=syntax)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        for keyword, value in changes.items():
            if value is None:
                del dataset[keyword]
            else:
                setattr(dataset, keyword, value)
        return dataset_bytes(dataset)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_plain_ct_slice_takes_the_fast_path_with_the_same_facts(syntax: str) -> None:
    encoded = _plain_slice(syntax)
    fast = read_instance_header(encoded)
    assert fast is not None, "a plain slice should not need pydicom"
    assert fast == _pydicom_path(encoded)
    facts, reason = fast
    assert reason is None
    assert facts.transfer_syntax_uid == syntax
    assert facts.position is not None and facts.declared_count == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"Modality": "MR"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},
        {"ImagesInAcquisition": None, "SeriesNumber": None},
        {"ImagePositionPatient": None},
        {"PhotometricInterpretation": "RGB"},
    ],
)
def test_the_fast_path_agrees_on_variants(changes: dict[str, object]) -> None:
    encoded = _plain_slice(**changes)
    fast = read_instance_header(encoded)
    assert fast is not None
    assert fast == _pydicom_path(encoded)


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(_plain_slice(SOPInstanceUID="1.2.3.x"), id="invalid UID"),
        pytest.param(_plain_slice(StudyInstanceUID=None), id="no Study UID"),
        pytest.param(_plain_slice(Rows=None), id="no Rows"),
        pytest.param(_plain_slice()[:-10], id="truncated pixel data"),
        pytest.param(_plain_slice(JPEG2000Lossless), id="compressed"),
    ],
)
def test_what_the_fast_path_does_not_read_exactly_goes_to_pydicom(encoded: bytes) -> None:
    assert read_instance_header(encoded) is None
    # and intake's answer is pydicom's
    pydicom_answer = _pydicom_path(encoded)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pydicom_answer is None:
            with pytest.raises(IntakeError):
                read_instance(encoded)
        else:
            assert read_instance(encoded) == pydicom_answer


def test_a_value_that_does_not_decode_is_a_status_not_an_internal_error() -> None:
    # Samples per Pixel (US) sent as UL with 2 bytes: pydicom parses the data set,
    # and fails only when the CT rule reads the value.
    element = b"\x28\x00\x02\x00US\x02\x00\x01\x00"
    assert _VALID.count(element) == 1
    encoded = _VALID.replace(element, b"\x28\x00\x02\x00UL\x02\x00\x01\x00")
    assert read_instance_header(encoded) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(IntakeError) as refused:
            read_instance(encoded)
    assert refused.value.status == 0xC000


def test_every_pydicom_test_file_agrees_or_goes_to_pydicom() -> None:
    fast_count = 0
    files = sorted(p for p in PYDICOM_TEST_FILES.rglob("*") if p.is_file())
    assert len(files) > 50
    for path in files:
        encoded = path.read_bytes()
        fast = read_instance_header(encoded)
        if fast is None:
            continue
        fast_count += 1
        assert fast == _pydicom_path(encoded), path.name
    assert fast_count >= 3  # CT_small.dcm and friends take the fast path


_VALID = _plain_slice()
_HEADER_END = len(_VALID) - 64 * 64 * 2


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(132, _HEADER_END + 16), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    cut=st.one_of(st.none(), st.integers(_HEADER_END - 40, len(_VALID))),
)
def test_mutated_headers_never_make_the_paths_disagree(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_VALID)
    for position, value in edits:
        data[position] = value
    encoded = bytes(data[:cut] if cut is not None else data)
    fast = read_instance_header(encoded)
    if fast is not None:
        assert fast == _pydicom_path(encoded)
