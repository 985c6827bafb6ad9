"""TID 1500 Structured Report: valid, coded, in the source study, deterministic."""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage

from lungnode.dicom.writers import sr as sr_module
from lungnode.dicom.writers.sr import PRIVATE_SCHEME, class_code, write_sr
from lungnode.domain import INDETERMINATE, AnalysisResult, ObjectRef, PreviousVersion
from lungnode.pipeline.outputs import dataset_bytes
from tests.support.synthetic import make_ct_series
from tests.unit.dicom_checks import (
    DEMO_MODEL,
    REAL_MODEL,
    dciodvfy,
    make_result,
    round_trip,
    strict_reading,  # noqa: F401 - a fixture
)

WHEN = _dt.datetime(2025, 3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return make_ct_series(4, rows=16, columns=16, patient_name="Doe^Jane", patient_id="PID42")


def _groups(sr: Dataset) -> list[Dataset]:
    report = sr.ContentSequence
    measurements = next(
        item for item in report if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    return list(measurements.ContentSequence)


def _items(group: Dataset, code_value: str) -> list[Dataset]:
    return [
        i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _tracking(group: Dataset) -> str:
    return str(_items(group, "112039")[0].TextValue)


@pytest.mark.parametrize("verdict", ["Adenocarcinoma", "Normal", "Indeterminate"])
def test_dciodvfy_finds_no_errors(series: list[Dataset], verdict: str, tmp_path: Path) -> None:
    result, _ = make_result(series, verdict=verdict)
    errors, _ = dciodvfy(write_sr(series[0], result, analysis_version=1), tmp_path)
    assert errors == []


def test_not_analysed_passes_dciodvfy_and_says_why(series: list[Dataset], tmp_path: Path) -> None:
    result = AnalysisResult.not_analysed("the series is not axial", DEMO_MODEL)
    sr = write_sr(series[0], result, analysis_version=1)
    errors, _ = dciodvfy(sr, tmp_path)
    assert errors == []
    (group,) = _groups(sr)
    comment = _items(group, "121106")[0].TextValue
    assert comment == "Not analysed, because the series is not axial"
    summary = _items(group, "111017")[0].ConceptCodeSequence[0]
    assert summary.CodeValue == "111245"  # No algorithms succeeded; without findings
    assert _items(group, "121071") == []  # no Finding


@pytest.mark.usefixtures("strict_reading")
def test_round_trips_with_strict_validation(series: list[Dataset]) -> None:
    result, _ = make_result(series)
    sr = write_sr(series[0], result, analysis_version=1)
    back = round_trip(sr)
    assert back.SOPClassUID == Comprehensive3DSRStorage  # IHE AIR's storage class
    assert hd.sr.Comprehensive3DSR.from_dataset(back).SOPInstanceUID == sr.SOPInstanceUID


@pytest.mark.usefixtures("strict_reading")
def test_comprehensive_sr_on_request_is_valid(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series)
    sr = write_sr(series[0], result, analysis_version=1, comprehensive_3d=False)
    back = round_trip(sr)
    assert back.SOPClassUID == ComprehensiveSRStorage
    assert hd.sr.ComprehensiveSR.from_dataset(back).SOPInstanceUID == sr.SOPInstanceUID
    errors, _ = dciodvfy(sr, tmp_path)
    assert errors == []


def test_procedure_reported_is_ct_chest(series: list[Dataset]) -> None:
    result, _ = make_result(series)
    sr = write_sr(series[0], result, analysis_version=1)
    procedure = next(
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ).ConceptCodeSequence[0]
    assert (procedure.CodeValue, procedure.CodingSchemeDesignator) == ("24627-2", "LN")
    assert procedure.CodeMeaning == "CT Chest"


def test_contributing_equipment_identifies_the_model_as_a_device(series: list[Dataset]) -> None:
    result, _ = make_result(series, model=REAL_MODEL)
    sr = write_sr(series[0], result, analysis_version=1)
    # highdicom adds an item of its own; the model's is the one with the Device UID.
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if "DeviceUID" in e]
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert equipment.Manufacturer == "lungnode"
    assert equipment.ManufacturerModelName == REAL_MODEL.name
    assert REAL_MODEL.version in list(equipment.SoftwareVersions)
    device = str(equipment.DeviceUID)
    assert device.startswith("2.25.")

    def device_of(sr: Dataset) -> str:
        return next(str(e.DeviceUID) for e in sr.ContributingEquipmentSequence if "DeviceUID" in e)

    assert device_of(write_sr(series[0], result, analysis_version=2)) == device  # same model
    for changed in (
        replace(REAL_MODEL, version="9.9"),
        replace(REAL_MODEL, sha256="0" * 64),
    ):
        other = write_sr(series[0], replace(result, model=changed), analysis_version=1)
        assert device_of(other) != device


def test_every_class_group_references_the_key_slices(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    expected = [series[3].SOPInstanceUID, series[1].SOPInstanceUID]
    for group in _groups(write_sr(series[0], result, analysis_version=1)):
        images = _items(group, "121112")  # Source of Measurement, IMAGE items
        assert [i.ValueType for i in images] == ["IMAGE", "IMAGE"]
        assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == expected


def test_a_new_version_lists_its_predecessor(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series)
    first = write_sr(series[0], result, analysis_version=1)
    assert "PredecessorDocumentsSequence" not in first
    previous = PreviousVersion(
        version=1,
        finished_at="2025-03-04T05:06:07+00:00",
        objects=(
            ObjectRef(
                "sr",
                str(first.SOPClassUID),
                str(first.SeriesInstanceUID),
                str(first.SOPInstanceUID),
            ),
        ),
    )
    second = write_sr(series[0], result, analysis_version=2, predecessor=previous)
    (study,) = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == series[0].StudyInstanceUID
    (referenced_series,) = study.ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == first.SeriesInstanceUID
    (item,) = referenced_series.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert item.ReferencedSOPClassUID == first.SOPClassUID
    comments = [c.TextValue for c in _items(_groups(second)[0], "121106")]
    assert (
        f"Replaces analysis version 1 of 2025-03-04T05:06:07+00:00 (SR {first.SOPInstanceUID})."
        in comments
    )
    errors, _ = dciodvfy(second, tmp_path)
    assert errors == []


def test_states_verdict_and_every_class_probability(series: list[Dataset]) -> None:
    result, _ = make_result(series)
    sr = write_sr(series[0], result, analysis_version=1, created=WHEN)
    groups = _groups(sr)
    verdict, *classes = groups
    assert _tracking(verdict) == "Series classification"
    adeno = codes.SCT.AdenocarcinomaOfLung
    assert _items(verdict, "121071")[0].ConceptCodeSequence[0].CodeValue == adeno.value
    assert _items(verdict, "121073")[0].ConceptCodeSequence[0].CodeValue == adeno.value
    certainty = _items(verdict, "111012")[0].MeasuredValueSequence[0]
    assert float(certainty.NumericValue) == pytest.approx(100 * result.confidence, abs=1e-3)
    assert certainty.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    summary = _items(verdict, "111017")[0].ConceptCodeSequence[0]
    assert summary.CodeValue == "111242"  # All algorithms succeeded; with findings
    assert "Synthetic phantom model" in _items(verdict, "121106")[0].TextValue

    assert [_tracking(g) for g in classes] == [f"Class score: {k}" for k in result.labels]
    for group, label in zip(classes, result.labels, strict=True):
        finding = _items(group, "121071")[0].ConceptCodeSequence[0]
        assert (finding.CodeValue, finding.CodingSchemeDesignator) == (
            class_code(label).value,
            "SCT",
        )
        site = _items(group, "363698007")[0].ConceptCodeSequence[0]
        assert site.CodeValue == "39607008"  # Lung
        value = _items(group, "111012")[0].MeasuredValueSequence[0].NumericValue
        assert float(value) == pytest.approx(100 * result.class_scores[label], abs=1e-3)


def test_indeterminate_is_coded_without_a_certainty_and_says_why(
    series: list[Dataset],
) -> None:
    result, _ = make_result(series, verdict=INDETERMINATE)
    verdict, *classes = _groups(write_sr(series[0], result, analysis_version=1))
    indeterminate = codes.SCT.Indeterminate
    assert _items(verdict, "121071")[0].ConceptCodeSequence[0].CodeValue == indeterminate.value
    assert _items(verdict, "121073")[0].ConceptCodeSequence[0].CodeValue == indeterminate.value
    # No class, so no certainty of its own, and neither "with" nor "without findings".
    assert _items(verdict, "111012") == [] and _items(verdict, "111017") == []
    comments = [item.TextValue for item in _items(verdict, "121106")]
    assert comments[0].startswith(f"{result.verdict_text()}. ")
    assert "highest score Adenocarcinoma 0.749" in comments[0]
    # Every class score is still stated.
    assert [_tracking(g) for g in classes] == [f"Class score: {k}" for k in result.labels]


def test_identifies_the_algorithm(series: list[Dataset]) -> None:
    result, _ = make_result(series, model=REAL_MODEL)
    verdict = _groups(write_sr(series[0], result, analysis_version=1))[0]
    assert _items(verdict, "111001")[0].TextValue == REAL_MODEL.name
    assert _items(verdict, "111003")[0].TextValue == REAL_MODEL.version
    assert REAL_MODEL.sha256 in _items(verdict, "111002")[0].TextValue
    assert _items(verdict, "121106") == []  # no synthetic notice for a real model


def test_references_key_slices_in_the_source_study(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    source = series[0]
    sr = write_sr(source, result, analysis_version=1)
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber"):
        assert str(sr[keyword].value) == str(source[keyword].value), keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SeriesNumber == 9013
    images = _items(_groups(sr)[0], "121112")  # Source of Measurement
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in images]
    assert referenced == [series[3].SOPInstanceUID, series[1].SOPInstanceUID]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for item in s.ReferencedSOPSequence
    }
    assert set(referenced) <= evidence


def test_unknown_label_uses_the_private_scheme(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series)
    labels = (*result.labels, "Ground-glass nodule")
    scores = {**result.class_scores, "Ground-glass nodule": 0.0}
    sr = write_sr(
        series[0], replace(result, labels=labels, class_scores=scores), analysis_version=1
    )
    code = class_code("Ground-glass nodule")
    assert (code.value, code.scheme_designator) == ("GROUND-GLASS-NOD", PRIVATE_SCHEME)
    last = _items(_groups(sr)[-1], "121071")[0].ConceptCodeSequence[0]
    assert last.CodingSchemeDesignator == PRIVATE_SCHEME
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert PRIVATE_SCHEME in schemes
    errors, _ = dciodvfy(sr, tmp_path)
    assert errors == []


def test_uids_are_deterministic(series: list[Dataset]) -> None:
    result, _ = make_result(series)
    first = write_sr(series[0], result, analysis_version=1)
    again = write_sr(series[0], result, analysis_version=1)
    other = write_sr(series[0], result, analysis_version=2)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_inconsistent_result_raises(series: list[Dataset]) -> None:
    result, _ = make_result(series)
    with pytest.raises(ValueError, match="confidence"):
        write_sr(series[0], replace(result, confidence=1.5), analysis_version=1)
    with pytest.raises(ValueError, match="not_analysed_reason"):
        write_sr(series[0], replace(result, analysed=False), analysis_version=1)


def test_non_ascii_patient_keeps_its_character_set(tmp_path: Path) -> None:
    series = make_ct_series(2, rows=16, columns=16, patient_name="Müller^Jörg")
    result, _ = make_result(series, key_slices=(1,))
    sr = write_sr(series[0], result, analysis_version=1)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(round_trip(sr).PatientName) == "Müller^Jörg"
    errors, _ = dciodvfy(sr, tmp_path)
    assert errors == []


def _highdicom_path(storage: type[Any], report: Any, evidence: list[Dataset], **kwargs: Any) -> Any:
    """highdicom's own construction: deep copy of the tree, evidence found by search."""
    return storage(evidence=evidence, content=report, **kwargs)


def _file_bytes(sr: Dataset) -> bytes:
    # highdicom names itself as contributing equipment with the time of the call.
    for item in sr.ContributingEquipmentSequence:
        if str(item.Manufacturer).startswith("Highdicom"):
            item.ContributionDateTime = "20250304050607"
    return dataset_bytes(sr)


@pytest.mark.parametrize("comprehensive_3d", [True, False])
@pytest.mark.parametrize(
    "case", ["Adenocarcinoma", "Normal", "Indeterminate", "real model", "not analysed", "private"]
)
def test_copy_free_construction_writes_what_highdicom_writes(
    series: list[Dataset], case: str, comprehensive_3d: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_sr skips highdicom's deep copy and evidence search; the file is the same."""
    if case == "not analysed":
        result = AnalysisResult.not_analysed("the series is not axial", DEMO_MODEL)
    elif case == "real model":
        result, _ = make_result(series, model=REAL_MODEL)
    else:
        result, _ = make_result(series, verdict="Adenocarcinoma" if case == "private" else case)
    if case == "private":
        labels = (*result.labels, "Ground-glass nodule")
        result = replace(
            result, labels=labels, class_scores={**result.class_scores, "Ground-glass nodule": 0.0}
        )
    previous = PreviousVersion(
        version=1,
        finished_at="2025-03-04T05:06:07+00:00",
        objects=(ObjectRef("sr", Comprehensive3DSRStorage, "1.2.3.4", "1.2.3.4.5"),),
    )

    def build() -> Dataset:
        return write_sr(
            series[0],
            result,
            analysis_version=2,
            created=WHEN,
            predecessor=previous,
            comprehensive_3d=comprehensive_3d,
        )

    fast = build()
    monkeypatch.setattr(sr_module, "_construct", _highdicom_path)
    standard = build()
    assert _file_bytes(fast) == _file_bytes(standard)
    assert fast.content[0] == standard.content[0]  # the parsed tree highdicom keeps


def test_copy_free_construction_checks_the_evidence(series: list[Dataset]) -> None:
    """A tree citing an instance missing from the evidence is refused, as highdicom does."""
    result, _ = make_result(series)
    report = hd.sr.MeasurementReport(
        observation_context=sr_module._observation_context(result.model),
        procedure_reported=sr_module.CT_CHEST,
        imaging_measurements=[
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(identifier="x"),
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(
                        referenced_sop_class_uid=series[0].SOPClassUID,
                        referenced_sop_instance_uid=series[3].SOPInstanceUID,
                    )
                ],
            )
        ],
    )
    with pytest.raises(ValueError, match=str(series[3].SOPInstanceUID)):
        sr_module._construct_copy_free(
            hd.sr.Comprehensive3DSR,
            report,
            [series[0]],
            series_instance_uid="1.2.3",
            series_number=1,
            sop_instance_uid="1.2.3.4",
            instance_number=1,
        )
