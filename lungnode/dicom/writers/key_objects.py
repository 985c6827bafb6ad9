"""The key slices and the result objects as a Key Object Selection document.

A radiologist opening the study wants to jump to what the node found; a
Key Object Selection (KOS, PS3.3 A.35.4) is the object viewers use for that
("key images"), and IHE AI Results (AIR) uses it to flag the images an AI
result is about. It is built by :class:`highdicom.ko.KeyObjectSelectionDocument`
on template TID 2010 "Key Object Selection" (PS3.16)::

    Of Interest (113000, DCM)                    Document Title, CID 7010
    +- Observer Type: Device, "lungnode" (model)   TID 1002 / 1004
    +- Key Object Description (113012, DCM): the verdict in words, the
    |  synthetic-model notice when the demo model made it
    +- IMAGE: one per CT instance of the key slices, with the key frames'
    |  numbers for a multi-frame instance (PS3.3 C.18.4, Image Reference)
    +- IMAGE / COMPOSITE: each result object passed in ``references``, e.g.
       the Parametric Map (an image) and the Structured Report (a composite)

TID 2010 admits IMAGE, COMPOSITE and WAVEFORM references; every referenced
instance is listed in the Current Requested Procedure Evidence Sequence
(PS3.3 C.17.2.3), and nothing else is. The document goes into the source
study, in its own series (``uids`` kind "kos"); a reference outside that
study raises ``ValueError`` (TID 2010 selects within one study here).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

import highdicom as hd
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from lungnode import __version__
from lungnode.dicom.uids import OutputSeries, uuid_derived_uid
from lungnode.dicom.writers.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    SYNTHETIC_NOTICE,
    algorithm_equipment,
    check_result,
    check_source,
    copy_patient_study,
    key_slice_refs,
    resolve_created,
)
from lungnode.domain import AnalysisResult, ModelIdentity

SERIES_DESCRIPTION = "LUNGNODE Key images"
#: (113000, DCM, "Of Interest"), CID 7010.
DOCUMENT_TITLE = codes.DCM.OfInterest


def write_key_object_selection(
    source: Dataset,
    result: AnalysisResult,
    *,
    analysis_version: int,
    references: Sequence[Dataset] = (),
    created: _dt.datetime | None = None,
) -> Dataset:
    """A Key Object Selection of the key slices and ``references``; valid or raise.

    ``source`` is any instance of the analysed series (its header is enough);
    its Patient and Study are copied, and its SOP Class names the key slices'.
    ``references`` are other objects of the analysis (the Parametric Map,
    the Structured Report): their headers are enough.

    Raises:
        ValueError: not analysed, no key slices, a reference outside the
            source study or without its UIDs, or highdicom rejects the content.
    """
    check_source(source)
    check_result(result)
    if not result.analysed:
        raise ValueError("no key object selection for a series that was not analysed")
    refs = key_slice_refs(result)
    if not refs:
        raise ValueError("no key object selection without key slices")
    when = resolve_created(created)
    output = OutputSeries.for_model(
        str(source.SeriesInstanceUID), result.model, analysis_version, "kos"
    )
    frames: dict[str, list[int]] = {}
    for ref in refs:
        numbers = frames.setdefault(ref.sop_instance_uid, [])
        if ref.frame_number is not None:
            numbers.append(ref.frame_number)
    key_images = [_key_image(source, uid) for uid in frames]
    others: dict[str, Dataset] = {}
    for reference in references:
        check_source(reference)
        if reference.StudyInstanceUID != source.StudyInstanceUID:
            raise ValueError(f"reference {reference.SOPInstanceUID} is not in the source study")
        if str(reference.SOPInstanceUID) not in frames:
            others.setdefault(str(reference.SOPInstanceUID), reference)
    selected = [*key_images, *others.values()]
    try:
        content = KeyObjectSelection(
            document_title=DOCUMENT_TITLE,
            referenced_objects=selected,
            observer_device_context=_observer(result.model),
            description=_description(result),
        )
        _add_frame_numbers(content, frames)
        kos = KeyObjectSelectionDocument(
            # The first item gives patient and study; each one is referenced.
            evidence=selected,
            content=content,
            series_instance_uid=output.series_instance_uid,
            series_number=output.series_number,
            sop_instance_uid=output.sop_instance_uid(0),
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name="lungnode",
            software_versions=__version__,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
            contributing_equipment=[
                algorithm_equipment(result.model, when, "Selection of the key slices")
            ],
        )
    except (TypeError, AttributeError) as exc:  # highdicom's way to reject an input
        raise ValueError(f"cannot build the Key Object Selection: {exc}") from exc
    kos.InstanceCreationDate = DA(when.date())
    kos.InstanceCreationTime = TM(when.time())
    return kos


def _key_image(source: Dataset, sop_instance_uid: str) -> Dataset:
    """The header of a key slice's CT instance, as far as the document needs it.

    Patient and study come from ``source`` (the same series); Rows and
    Columns make highdicom reference it as an IMAGE.
    """
    image = Dataset()
    copy_patient_study(source, image)
    image.SeriesInstanceUID = source.SeriesInstanceUID
    image.SOPClassUID = source.SOPClassUID
    image.SOPInstanceUID = sop_instance_uid
    image.Rows = source.get("Rows", 0)
    image.Columns = source.get("Columns", 0)
    return image


def _add_frame_numbers(content: KeyObjectSelection, frames: dict[str, list[int]]) -> None:
    """Name the key frames of multi-frame instances (Image Reference, PS3.3 C.18.4)."""
    for item in content[0].ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        reference = item.ReferencedSOPSequence[0]
        numbers = frames.get(str(reference.ReferencedSOPInstanceUID))
        if numbers:
            reference.ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]


def _description(result: AnalysisResult) -> str:
    """Key Object Description (113012, DCM), a TEXT item (UT; PS3.16 TID 2010)."""
    text = (
        f"{NOT_FOR_DIAGNOSTIC_USE}. Key slices of the lungnode analysis. "
        f"Verdict: {result.verdict_text()}"
    )
    if result.model.synthetic:
        text += f". {SYNTHETIC_NOTICE}"
    return text


def _observer(model: ModelIdentity) -> hd.sr.ObserverContext:
    """The device observer (TID 1004): lungnode running the model, as in ``writers.sr``."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uuid_derived_uid("lungnode-device-observer", model.name, model.version),
        name="lungnode",
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.name} {model.version}"[:64],
    )
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=device,
    )
