"""The classification as a Structured Report: TID 1500 Measurement Report.

Built with highdicom's TID 1500 (PS3.16 A.35.1) in a Comprehensive 3D SR
(PS3.3 A.35.13), the storage class the IHE AI Results profile (AIR) asks of an
Evidence Creator, or in a Comprehensive SR (PS3.3 A.35.3) where the settings
say so (``sr_storage``) for viewers that read only that; so that a machine can
read what the PDF tells a person. The content tree is::

    Imaging Measurement Report (126000, DCM)                       TID 1500
    +- Language, Device Observer "lungnode" (model name)         TID 1204, 1004
    +- Procedure Reported: CT Chest (24627-2, LN)                   CID 100
    +- Imaging Measurements
       +- Measurement Group "Series classification"              TID 1501
       |  +- Finding: the verdict's class code, Finding Site: Lung
       |  +- Algorithm Identification: name, version, SHA-256    TID 4019
       |  +- Source: the CT instances of the key slices
       |  +- Certainty of Finding (111012, DCM) = confidence, in %
       |  +- Impression (121073, DCM) = the verdict's class code
       |  +- CAD Processing and Findings Summary (111017, DCM) =
       |     "All algorithms succeeded; with[out] findings" (CID 6047)
       +- Measurement Group "Class score: <label>", one per class
          +- Finding: the class code, Finding Site: Lung, Algorithm
          +- Source: the CT instances of the key slices
          +- Certainty of Finding = that class's probability, in %

The Contributing Equipment Sequence names the model as processing equipment
(109102, DCM), with a Device UID that changes with the model's name, version
and SHA-256 (``writers.common.algorithm_equipment``).

A later version of the analysis of the same series (a late instance reopened
it) lists the previous version's SR in the Predecessor Documents Sequence
(PS3.3 C.17.2.1) and says in a Comment which version it replaces.

An Indeterminate verdict (no class cleared the series rule's bar, see
``ml.inference``) is coded (82334004, SCT, "Indeterminate") as Finding and
Impression. It has no Certainty of Finding, since it is no class and has no
score of its own, and no CAD Processing and Findings Summary, since neither
"with findings" nor "without findings" is true of it; a Comment carries the
verdict and the rule's explanation in words, as the PDF words them. The class
score groups follow as for any verdict.

A series that was not analysed gets one group whose CAD Processing and
Findings Summary is (111245, DCM, "No algorithms succeeded; without
findings"), with a Comment (121106, DCM) TEXT saying why; the demo model's
verdict group carries the synthetic-model notice as a Comment too. TID 1501
is extensible, which admits these TEXT items.

Codes (SNOMED CT codes are those of PS3.16 CID 638/639 "Neoplasm"):

=======================  ===========================================
Adenocarcinoma           (254626006, SCT, "Adenocarcinoma of lung")
Large Cell Carcinoma     (22687000, SCT, "Large cell carcinoma") with
                         Finding Site (39607008, SCT, "Lung")
Squamous Cell Carcinoma  (254634000, SCT, "Squamous cell carcinoma of lung")
Normal                   (17621005, SCT, "Normal"), CID 222
=======================  ===========================================

A label with no standard code (a future model's class) is coded in the
private scheme ``99LUNGNODE`` (PS3.16 8.2: private schemes start with "99"),
declared in the Coding Scheme Identification Sequence (PS3.3 C.12.1): its
code value is the label in upper case with non-alphanumerics as "-", its
meaning is the label.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from lungnode import __version__
from lungnode.dicom.uids import OutputSeries, uuid_derived_uid
from lungnode.dicom.writers.common import (
    MANUFACTURER,
    SYNTHETIC_NOTICE,
    algorithm_equipment,
    check_result,
    check_source,
    key_slice_refs,
    resolve_created,
)
from lungnode.domain import (
    INDETERMINATE,
    AnalysisResult,
    ModelIdentity,
    PreviousVersion,
    SliceRef,
)

SERIES_DESCRIPTION = "LUNGNODE Classification SR"
PRIVATE_SCHEME = "99LUNGNODE"

#: Standard codes of the demo model's classes (see the module docstring).
CLASS_CODES: dict[str, Code] = {
    "Adenocarcinoma": codes.SCT.AdenocarcinomaOfLung,
    "Large Cell Carcinoma": codes.SCT.LargeCellCarcinoma,
    "Normal": codes.SCT.Normal,
    "Squamous Cell Carcinoma": codes.SCT.SquamousCellCarcinomaOfLung,
}
_NORMAL_LABELS = frozenset({"Normal"})
#: The code of the Indeterminate verdict (see the module docstring).
INDETERMINATE_CODE: Code = codes.SCT.Indeterminate

#: Procedure Reported (CID 100, extensible): the CT of the chest the model reads.
CT_CHEST = Code("24627-2", "LN", "CT Chest")

_CERTAINTY = codes.DCM.CertaintyOfFinding
_PERCENT = codes.UCUM.Percent
_CAD_SUMMARY = codes.DCM.CADProcessingAndFindingsSummary

_SRDocument = hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR


def class_code(label: str) -> Code:
    """The code of a class label: standard where one exists, else ``99LUNGNODE``."""
    if label in CLASS_CODES:
        return CLASS_CODES[label]
    value = re.sub(r"[^A-Z0-9]+", "-", label.upper()).strip("-")[:16]
    if not value:
        raise ValueError(f"class label {label!r} has no letters or digits to code")
    return Code(value, PRIVATE_SCHEME, label[:64])


def write_sr(
    source: Dataset,
    result: AnalysisResult,
    *,
    analysis_version: int,
    created: _dt.datetime | None = None,
    predecessor: PreviousVersion | None = None,
    comprehensive_3d: bool = True,
) -> Dataset:
    """A Comprehensive 3D (or Comprehensive) SR holding the TID 1500 report of ``result``.

    ``source`` is any instance of the analysed series (its header is enough);
    its Patient and Study are copied, and its SOP Class names the key slices'.
    ``predecessor`` is the analysis this one supersedes: its SR, when recorded,
    goes into the Predecessor Documents Sequence. The result is valid or this
    raises.

    Raises:
        ValueError: an input is inconsistent, or highdicom rejects the content.
    """
    check_source(source)
    check_result(result)
    when = resolve_created(created)
    output = OutputSeries.for_model(
        str(source.SeriesInstanceUID), result.model, analysis_version, "sr"
    )
    refs = key_slice_refs(result)
    try:
        groups = _groups(source, result, refs, output)
        if predecessor is not None:
            groups[0][0].ContentSequence.append(_comment(predecessor.replaces_text()))
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(result.model),
            procedure_reported=CT_CHEST,
            imaging_measurements=groups,
        )
        private = [class_code(label) for label in result.labels if label not in CLASS_CODES]
        storage = hd.sr.Comprehensive3DSR if comprehensive_3d else hd.sr.ComprehensiveSR
        sr = _construct(
            storage,
            report,
            _evidence(source, refs),
            series_instance_uid=output.series_instance_uid,
            series_number=output.series_number,
            sop_instance_uid=output.sop_instance_uid(0),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name="lungnode",
            software_versions=__version__,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
            coding_schemes=[_private_scheme()] if private else None,
            contributing_equipment=[
                algorithm_equipment(result.model, when, "Classification of the series")
            ],
            previous_versions=_predecessors(source, predecessor),
        )
    except TypeError as exc:  # highdicom's way to reject an input
        raise ValueError(f"cannot build the Structured Report: {exc}") from exc
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    return sr


def _construct_copy_free(
    storage: type[_SRDocument],
    report: hd.sr.MeasurementReport,
    evidence: list[Dataset],
    **kwargs: Any,
) -> _SRDocument:
    """The SR document of ``report``, as highdicom builds it, without its costly part.

    highdicom's constructor deep-copies the content tree (to keep a parsed
    copy for its ``content`` property) and searches the whole tree for IMAGE
    and COMPOSITE items to check that each referenced instance is in
    ``evidence``; with one group per class, each citing every key slice, the
    two were more than half of the SR's time. The dataset it writes is the
    caller's tree itself (its root's elements) and the evidence sequences,
    which depend on ``evidence`` alone. So highdicom builds the document around
    an empty root container, and we then give it the real root's elements,
    as highdicom would, and do the check ourselves on the tree as built.
    ``tests/unit/test_writers_sr.py`` checks that the bytes written equal
    those of highdicom's own path.
    """
    root = report[0]
    if not isinstance(root, hd.sr.ContainerContentItem):
        raise TypeError("the report's root is not a CONTAINER content item")
    _check_evidence(root, evidence)
    skeleton = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            skeleton.add(element)
    skeleton.ContentSequence = []
    sr = storage(evidence=evidence, content=skeleton, **kwargs)
    for element in root:
        sr[element.tag] = element
    # What highdicom's ``content`` returns: the tree, here not a copy of it.
    sr._content = hd.sr.ContentSequence([root], is_root=True)
    return sr


#: How write_sr builds the document; the tests swap in highdicom's own path.
_construct = _construct_copy_free


def _check_evidence(root: Dataset, evidence: list[Dataset]) -> None:
    """Every instance the tree references is in ``evidence`` (highdicom's check)."""
    given = {str(item.SOPInstanceUID) for item in evidence}
    missing = sorted(_referenced_instances(root) - given)
    if missing:
        raise ValueError(f"no evidence for the referenced instances {', '.join(missing)}")


def _referenced_instances(node: Dataset) -> set[str]:
    """The SOP Instance UIDs of the IMAGE and COMPOSITE items under ``node``."""
    found: set[str] = set()
    for item in node.get("ContentSequence", ()):
        if item.ValueType in ("IMAGE", "COMPOSITE"):
            found.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        found |= _referenced_instances(item)
    return found


def _groups(
    source: Dataset,
    result: AnalysisResult,
    refs: list[SliceRef],
    output: OutputSeries,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model.name,
        version=result.model.version,
        parameters=[f"SHA-256 {result.model.sha256}"] if result.model.sha256 else None,
        manufacturer=MANUFACTURER,
    )
    lung = [hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)]

    def tracking(text: str) -> hd.sr.TrackingIdentifier:
        # Deterministic, like every UID of the output (see lungnode.dicom.uids).
        uid = uuid_derived_uid(output.sop_instance_uid(0), "tracking", text)
        return hd.sr.TrackingIdentifier(uid=uid, identifier=text[:64])

    if not result.analysed:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("Series classification"),
            algorithm_id=algorithm,
            finding_sites=lung,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    _CAD_SUMMARY, codes.DCM.NoAlgorithmsSucceededWithoutFindings
                )
            ],
            source_images=[_source_image(source, None)],
        )
        group[0].ContentSequence.append(
            _comment(f"Not analysed, because {result.not_analysed_reason}")
        )
        return [group]

    indeterminate = result.verdict == INDETERMINATE
    verdict_code = INDETERMINATE_CODE if indeterminate else class_code(result.verdict)
    # One item per key slice, cited by every group: the same items in each
    # (the tree is written, never changed, so sharing them writes the same bytes).
    sources = [_source_image(source, ref) for ref in refs] or None
    evaluations = [hd.sr.QualitativeEvaluation(codes.DCM.Impression, verdict_code)]
    if not indeterminate:
        summary = (
            codes.DCM.AllAlgorithmsSucceededWithoutFindings
            if result.verdict in _NORMAL_LABELS
            else codes.DCM.AllAlgorithmsSucceededWithFindings
        )
        evaluations.append(hd.sr.QualitativeEvaluation(_CAD_SUMMARY, summary))
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking("Series classification"),
            finding_type=verdict_code,
            algorithm_id=algorithm,
            finding_sites=lung,
            measurements=(
                [_certainty(result.confidence)] if result.confidence is not None else None
            ),
            qualitative_evaluations=evaluations,
            source_images=sources,
        )
    ]
    if indeterminate:
        said = f"{result.verdict_text()}. {result.explanation()}".strip()
        groups[0][0].ContentSequence.append(_comment(said))
    if result.model.synthetic:
        groups[0][0].ContentSequence.append(_comment(SYNTHETIC_NOTICE))
    for label in result.labels:
        if label not in result.class_scores:
            continue
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"Class score: {label}"),
                finding_type=class_code(label),
                algorithm_id=algorithm,
                finding_sites=lung,
                measurements=[_certainty(result.class_scores[label])],
                source_images=sources,
            )
        )
    return groups


def _predecessors(source: Dataset, previous: PreviousVersion | None) -> list[Dataset] | None:
    """The previous version's SR, as the Predecessor Documents Sequence needs it."""
    sr = previous.object_of("sr") if previous is not None else None
    if sr is None:
        return None
    item = Dataset()
    item.StudyInstanceUID = source.StudyInstanceUID
    item.SeriesInstanceUID = sr.series_instance_uid
    item.SOPClassUID = sr.sop_class_uid
    item.SOPInstanceUID = sr.sop_instance_uid
    return [item]


def _comment(text: str) -> hd.sr.TextContentItem:
    """A Comment (121106, DCM) TEXT item; TID 1501 is extensible."""
    return hd.sr.TextContentItem(
        name=codes.DCM.Comment,
        value=text[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _certainty(probability: float) -> hd.sr.Measurement:
    """Certainty of Finding (111012, DCM) in percent (UCUM "%"), 0 to 100."""
    return hd.sr.Measurement(name=_CERTAINTY, value=round(100.0 * probability, 3), unit=_PERCENT)


def _source_image(source: Dataset, ref: SliceRef | None) -> hd.sr.SourceImageForMeasurementGroup:
    if ref is None:
        return hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        )
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=ref.sop_instance_uid,
        referenced_frame_numbers=[ref.frame_number] if ref.frame_number is not None else None,
    )


def _observation_context(model: ModelIdentity) -> hd.sr.ObservationContext:
    """The device observer (TID 1004): lungnode running the model."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uuid_derived_uid(
            "lungnode-device-observer", model.name, model.version, model.sha256 or ""
        ),
        name="lungnode",
        manufacturer_name=MANUFACTURER,
        model_name=f"{model.name} {model.version}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _evidence(source: Dataset, refs: list[SliceRef]) -> list[Dataset]:
    """The source first (patient and study come from it), then each key slice's instance."""
    evidence = [source]
    seen = {str(source.SOPInstanceUID)}
    for ref in refs:
        if ref.sop_instance_uid in seen:
            continue
        seen.add(ref.sop_instance_uid)
        item = Dataset()
        item.StudyInstanceUID = source.StudyInstanceUID
        item.SeriesInstanceUID = source.SeriesInstanceUID
        item.SOPClassUID = source.SOPClassUID
        item.SOPInstanceUID = ref.sop_instance_uid
        evidence.append(item)
    return evidence


def _private_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="lungnode class labels",
        responsible_organization="lungnode",
    )
