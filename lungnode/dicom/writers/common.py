"""What every lungnode writer shares: source checks, copied attributes, equipment.

All outputs go into the source study (DESIGN "Outputs"), so each one copies
the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) from an
instance of the analysed series, and records the algorithm that made it in
the Contributing Equipment Sequence (PS3.3 C.12.1, Table C.12-1), as the IHE
AI Results (AIR) profile asks of AI results: purpose (109102, DCM, "Processing
Equipment"), manufacturer, model name and version, a Device UID per model
identity, with the weights' hash in the description.
"""

from __future__ import annotations

import datetime as _dt

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungnode import __version__
from lungnode.dicom.uids import uuid_derived_uid
from lungnode.domain import INDETERMINATE, AnalysisResult, ModelIdentity, SliceRef

#: Manufacturer (0008,0070) of every object lungnode writes.
MANUFACTURER = "lungnode"
#: Burned into images and printed in reports.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
#: The notice for the bundled demo model (``ModelIdentity.synthetic``).
SYNTHETIC_NOTICE = "Synthetic phantom model: trained on synthetic phantoms, not for diagnostic use"

#: Patient module (C.7.1.1) and General Study module (C.7.2.1) attributes
#: copied verbatim from the source when present; the type 2 ones are written
#: empty when the source lacks them.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDescription",
    "IssuerOfAccessionNumberSequence",
)

_REQUIRED_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def check_source(source: Dataset) -> None:
    """Raise ``ValueError`` unless ``source`` identifies an instance of a study."""
    missing = [kw for kw in _REQUIRED_SOURCE if not source.get(kw)]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}")


def check_result(result: AnalysisResult) -> None:
    """Raise ``ValueError`` if an analysed result is inconsistent with itself."""
    if not result.analysed:
        if not result.not_analysed_reason:
            raise ValueError("a result that was not analysed needs not_analysed_reason")
        return
    if result.verdict == INDETERMINATE:
        if result.confidence is not None:
            raise ValueError(f"{INDETERMINATE} has no confidence, got {result.confidence}")
    elif result.verdict not in result.labels:
        raise ValueError(f"verdict {result.verdict!r} is not one of the labels {result.labels}")
    elif result.confidence is None or not 0.0 <= result.confidence <= 1.0:
        raise ValueError(f"confidence {result.confidence} is outside [0, 1]")
    for label, score in result.class_scores.items():
        if label not in result.labels:
            raise ValueError(f"class score for unknown label {label!r}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score {score} of {label!r} is outside [0, 1]")
    if len(result.key_slice_refs) != len(result.key_slices):
        raise ValueError(
            f"{len(result.key_slices)} key slices but {len(result.key_slice_refs)} references"
        )


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient and General Study modules from ``source`` into ``target``."""
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    target.StudyInstanceUID = source.StudyInstanceUID
    for keyword in PATIENT_STUDY_TYPE2:
        setattr(target, keyword, source.get(keyword, ""))
    for keyword in PATIENT_STUDY_OPTIONAL:
        if keyword in source:
            target[keyword] = source[keyword]


def key_slice_refs(result: AnalysisResult) -> list[SliceRef]:
    """The key slice references, without repeats, in the result's order."""
    seen: dict[tuple[str, int | None], SliceRef] = {}
    for ref in result.key_slice_refs:
        seen.setdefault((ref.sop_instance_uid, ref.frame_number), ref)
    return list(seen.values())


def sop_instance_reference(source: Dataset, ref: SliceRef) -> Dataset:
    """An Image SOP Instance Reference Macro item (PS3.3 Table 10-3) for ``ref``.

    The SOP Class is the source's: every instance of one series shares it
    (PS3.3 C.7.3: a series holds one kind of instance).
    """
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None:
        item.ReferencedFrameNumber = ref.frame_number
    return item


def algorithm_equipment(
    model: ModelIdentity, created: _dt.datetime, description: str
) -> hd.ContributingEquipment:
    """A Contributing Equipment item (PS3.3 C.12.1) naming the model as processing equipment."""
    hash_note = f"; model SHA-256 {model.sha256}" if model.sha256 else ""
    synthetic_note = f"; {SYNTHETIC_NOTICE}" if model.synthetic else ""
    text = f"{description}{hash_note}{synthetic_note}"
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(model.name),
        software_versions=[_lo(model.version), f"lungnode {__version__}"],
        contribution_datetime=created,
        contribution_description=text[:1024],
    )
    equipment.DeviceUID = model_device_uid(model)
    return equipment


def model_device_uid(model: ModelIdentity) -> str:
    """The Device UID (0018,1002) of the model as equipment: one per name, version and hash.

    IHE AIR identifies the algorithm that made a result by it, so a retrained
    model (a new SHA-256) is a new device even under an unchanged version.
    """
    return uuid_derived_uid("lungnode-model-device", model.name, model.version, model.sha256 or "")


def explained_class(result: AnalysisResult) -> str:
    """What the heatmaps explain (see ``pipeline.analyze``): the verdict's lesion class,
    or for Normal and Indeterminate the most likely lesion class of each slice."""
    normal = str(result.rule.get("normal_label", "Normal"))
    if result.verdict in result.labels and result.verdict != normal:
        return result.verdict
    return "the most likely lesion class"


def resolve_created(created: _dt.datetime | None) -> _dt.datetime:
    """``created`` or now, without microseconds (DA/TM of PS3.5 6.2)."""
    return (created or _dt.datetime.now()).replace(microsecond=0)


def model_text(model: ModelIdentity) -> str:
    """The model in words, as burned into images and printed in reports."""
    return f"{model.name} {model.version}"


def _lo(text: str) -> str:
    """A value that fits LO: 64 characters, no backslash (PS3.5 6.2)."""
    return text.replace("\\", "/")[:64]
