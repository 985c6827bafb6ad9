"""Encapsulated PDF Storage: the report as a DICOM instance in the source study.

The IOD is PS3.3 A.45.1 (SOP Class 1.2.840.10008.5.1.4.1.1.104.1, PS3.4
B.5): Patient, General Study, Encapsulated Document Series, General
Equipment, SC Equipment, Encapsulated Document and SOP Common modules. What
we fill, and why:

- Patient and General Study (C.7.1.1, C.7.2.1): copied from the source, so the
  report lands in the same study.
- Encapsulated Document Series (C.24.1): Modality DOC, a new series with
  deterministic UID and Series Number (:mod:`lungnode.dicom.uids`).
- SC Equipment (C.8.6.1): Conversion Type WSD, a workstation made it.
- Encapsulated Document (C.24.2): Document Title; Concept Name Code Sequence
  (18748-4, LN, "Diagnostic Imaging Report"), the document title of
  CID 7000 "Diagnostic Imaging Report Document Titles" (PS3.16); Burned In
  Annotation YES, as the PDF shows patient facts; Source Instance Sequence
  naming the CT instances of the key slices (or the source instance when the
  series was not analysed); the PDF itself, padded to an even length
  (PS3.5 7.1.1: values have an even length) with a trailing NUL, which PDF
  readers ignore, and its true length in Encapsulated Document Length.
- SOP Common (C.12.1): Contributing Equipment Sequence naming the model.

The file meta information is pydicom's own (its Implementation Class UID and
version name); its group length is computed when the file is written.
"""

from __future__ import annotations

import datetime as _dt

from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from lungnode import __version__
from lungnode.dicom.uids import OutputSeries
from lungnode.dicom.writers.common import (
    MANUFACTURER,
    algorithm_equipment,
    check_result,
    check_source,
    copy_patient_study,
    key_slice_refs,
    resolve_created,
    sop_instance_reference,
)
from lungnode.domain import AnalysisResult

SERIES_DESCRIPTION = "LUNGNODE Report"
DOCUMENT_TITLE = "LUNGNODE lung CT classification report (For Research Use Only)"
MIME_TYPE = "application/pdf"


def write_pdf_document(
    source: Dataset,
    result: AnalysisResult,
    pdf: bytes,
    *,
    analysis_version: int,
    created: _dt.datetime | None = None,
    document_title: str = DOCUMENT_TITLE,
) -> Dataset:
    """An Encapsulated PDF instance holding ``pdf``; valid or raise.

    ``source`` is any instance of the analysed series (its header is enough);
    its Patient and Study are copied and its SOP Class names the key slices'.

    Raises:
        ValueError: ``pdf`` is not a PDF, or an input is inconsistent.
    """
    check_source(source)
    check_result(result)
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("the document does not start with a PDF header")
    if len(document_title) > 1024:
        raise ValueError("document title is longer than ST allows (1024 characters)")
    when = resolve_created(created)
    output = OutputSeries.for_model(
        str(source.SeriesInstanceUID), result.model, analysis_version, "pdf"
    )
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds = Dataset()
    copy_patient_study(source, ds)
    # Encapsulated Document Series (C.24.1)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = output.series_instance_uid
    ds.SeriesNumber = output.series_number
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate = date
    ds.SeriesTime = time
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "lungnode"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"
    # Encapsulated Document (C.24.2)
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDateTime = f"{date}{time}"
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.SourceInstanceSequence = _source_instances(source, result)
    ds.DocumentTitle = document_title
    ds.ConceptNameCodeSequence = [_code_item(codes.LN.DiagnosticImagingReport)]
    ds.VerificationFlag = "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = MIME_TYPE
    ds.EncapsulatedDocument = pdf + b"\x00" if len(pdf) % 2 else pdf
    ds.EncapsulatedDocumentLength = len(pdf)
    # SOP Common (C.12.1)
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = output.sop_instance_uid(0)
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.ContributingEquipmentSequence = [
        algorithm_equipment(result.model, when, "Classification report of the series")
    ]

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    validate_file_meta(ds.file_meta, enforce_standard=True)
    return ds


def _source_instances(source: Dataset, result: AnalysisResult) -> list[Dataset]:
    """Key slices of an analysed series; the source instance of one that was not."""
    refs = key_slice_refs(result)
    if refs:
        return [sop_instance_reference(source, ref) for ref in refs]
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return [item]


def _code_item(code: Code) -> Dataset:
    """A Code Sequence Macro item (PS3.3 Table 8.8-1)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item
