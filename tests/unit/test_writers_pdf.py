"""Encapsulated PDF Storage: valid, in the source study, deterministic, byte-exact."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EncapsulatedPDFStorage

from lungnode.dicom.writers.pdf import write_pdf_document
from lungnode.domain import AnalysisResult
from lungnode.report.pdf import ReportInput, StudyFacts, build_report
from tests.support.synthetic import make_ct_series
from tests.unit.dicom_checks import (
    DEMO_MODEL,
    dciodvfy,
    make_result,
    round_trip,
    strict_reading,  # noqa: F401 - a fixture
)

WHEN = _dt.datetime(2025, 3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return make_ct_series(4, rows=32, columns=32, patient_name="Doe^Jane", patient_id="PID42")


@pytest.fixture(scope="module")
def analysed(series: list[Dataset]) -> tuple[AnalysisResult, bytes]:
    result, _ = make_result(series)
    pdf = build_report(ReportInput(result, StudyFacts.from_dataset(series[0]), created=WHEN))
    return result, pdf


def test_dciodvfy_finds_no_errors(
    series: list[Dataset], analysed: tuple[AnalysisResult, bytes], tmp_path: Path
) -> None:
    result, pdf = analysed
    errors, _ = dciodvfy(write_pdf_document(series[0], result, pdf, analysis_version=1), tmp_path)
    assert errors == []


def test_not_analysed_passes_dciodvfy_and_references_the_source(
    series: list[Dataset], tmp_path: Path
) -> None:
    result = AnalysisResult.not_analysed("the series has 4 slices, 16 are needed", DEMO_MODEL)
    pdf = build_report(ReportInput(result))
    ds = write_pdf_document(series[0], result, pdf, analysis_version=1)
    errors, _ = dciodvfy(ds, tmp_path)
    assert errors == []
    assert [item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence] == [
        series[0].SOPInstanceUID
    ]


@pytest.mark.usefixtures("strict_reading")
def test_round_trip_keeps_the_pdf_byte_exact(
    series: list[Dataset], analysed: tuple[AnalysisResult, bytes]
) -> None:
    result, pdf = analysed
    for document in (pdf, pdf + b"\n"):  # one of the two has an odd length
        back = round_trip(write_pdf_document(series[0], result, document, analysis_version=1))
        stored = bytes(back.EncapsulatedDocument)
        assert len(stored) % 2 == 0
        assert back.EncapsulatedDocumentLength == len(document)
        assert stored[: back.EncapsulatedDocumentLength] == document
        assert stored[len(document) :] in (b"", b"\x00")


def test_attributes_and_codes(
    series: list[Dataset], analysed: tuple[AnalysisResult, bytes]
) -> None:
    result, pdf = analysed
    ds = write_pdf_document(series[0], result, pdf, analysis_version=1, created=WHEN)
    assert ds.SOPClassUID == EncapsulatedPDFStorage
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.Modality == "DOC"
    assert ds.BurnedInAnnotation == "YES"
    assert "For Research Use Only" in ds.DocumentTitle
    code = ds.ConceptNameCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("18748-4", "LN")
    assert (ds.ContentDate, ds.ContentTime) == ("20250304", "050607")
    assert ds.SeriesNumber == 9012
    assert ds.InstanceNumber == 1


def test_copies_patient_and_study_and_references_key_slices(
    series: list[Dataset], analysed: tuple[AnalysisResult, bytes]
) -> None:
    result, pdf = analysed
    source = series[0]
    ds = write_pdf_document(source, result, pdf, analysis_version=1)
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyID", "AccessionNumber"):
        assert str(ds[keyword].value) == str(source[keyword].value), keyword
    assert ds.StudyDescription == source.StudyDescription
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert [item.ReferencedSOPInstanceUID for item in ds.SourceInstanceSequence] == [
        ref.sop_instance_uid for ref in result.key_slice_refs
    ]
    equipment = ds.ContributingEquipmentSequence[0]
    assert equipment.ManufacturerModelName == DEMO_MODEL.name


def test_file_meta_is_pydicoms_own(
    series: list[Dataset], analysed: tuple[AnalysisResult, bytes], tmp_path: Path
) -> None:
    result, pdf = analysed
    ds = write_pdf_document(series[0], result, pdf, analysis_version=1)
    assert ds.file_meta.ImplementationClassUID == PYDICOM_IMPLEMENTATION_UID
    path = tmp_path / "report.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    meta = pydicom.dcmread(path).file_meta
    # The group length counts the bytes after its own 12-byte element up to the
    # data set (PS3.10 7.1), whose first element is in group 0008.
    raw = path.read_bytes()
    end_of_meta = 128 + 4 + 12 + meta.FileMetaInformationGroupLength
    assert raw[end_of_meta : end_of_meta + 2] == b"\x08\x00"
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_uids_are_deterministic(
    series: list[Dataset], analysed: tuple[AnalysisResult, bytes]
) -> None:
    result, pdf = analysed
    first = write_pdf_document(series[0], result, pdf, analysis_version=1)
    again = write_pdf_document(series[0], result, pdf, analysis_version=1)
    other = write_pdf_document(series[0], result, pdf, analysis_version=2)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID


def test_rejects_what_is_not_a_pdf(
    series: list[Dataset], analysed: tuple[AnalysisResult, bytes]
) -> None:
    result, _ = analysed
    with pytest.raises(ValueError, match="PDF"):
        write_pdf_document(series[0], result, b"<html></html>", analysis_version=1)


def test_non_ascii_patient_keeps_its_character_set(tmp_path: Path) -> None:
    series = make_ct_series(2, rows=16, columns=16, patient_name="Müller^Jörg")
    result, _ = make_result(series, key_slices=(1,))
    pdf = build_report(ReportInput(result, StudyFacts.from_dataset(series[0])))
    ds = write_pdf_document(series[0], result, pdf, analysis_version=1)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(round_trip(ds).PatientName) == "Müller^Jörg"
    errors, _ = dciodvfy(ds, tmp_path)
    assert errors == []
