"""Key Object Selection: valid, in the source study, selects the key slices and the results."""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from lungnode.dicom.writers.common import SYNTHETIC_NOTICE
from lungnode.dicom.writers.key_objects import write_key_object_selection
from lungnode.dicom.writers.parametric_map import write_parametric_map
from lungnode.dicom.writers.sr import write_sr
from lungnode.domain import AnalysisResult
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
    return make_ct_series(5, rows=16, columns=16, patient_name="Doe^Jane", patient_id="PID42")


def _results(series: list[Dataset], result: AnalysisResult) -> tuple[Dataset, Dataset]:
    """The Structured Report and the Parametric Map of ``result``, as the job writes them."""
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    sr = write_sr(series[0], result, analysis_version=1, created=WHEN)
    pm = write_parametric_map(
        [by_uid[ref.sop_instance_uid] for ref in result.key_slice_refs],
        result,
        analysis_version=1,
        created=WHEN,
    )
    return sr, pm


def _selected(kos: Dataset) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """SOP Instance UID -> (value type, SOP Class UID, frame numbers) of each reference."""
    selected = {}
    for item in kos.ContentSequence:
        if item.ValueType not in ("IMAGE", "COMPOSITE", "WAVEFORM"):
            continue
        (reference,) = item.ReferencedSOPSequence
        frames = reference.get("ReferencedFrameNumber")
        numbers = (
            ()
            if frames is None
            else tuple(int(f) for f in ([frames] if isinstance(frames, int) else frames))
        )
        uid = str(reference.ReferencedSOPInstanceUID)
        assert uid not in selected, "each instance is selected once"
        selected[uid] = (item.ValueType, str(reference.ReferencedSOPClassUID), numbers)
    return selected


def _evidence(kos: Dataset) -> dict[str, str]:
    """SOP Instance UID -> Study Instance UID of the Current Requested Procedure Evidence."""
    return {
        str(sop.ReferencedSOPInstanceUID): str(study.StudyInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for sop in s.ReferencedSOPSequence
    }


def _text(kos: Dataset) -> str:
    (item,) = [i for i in kos.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    return str(item.TextValue)


def test_dciodvfy_finds_no_errors(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series, key_slices=(3, 1, 4))
    sr, pm = _results(series, result)
    kos = write_key_object_selection(
        series[0], result, analysis_version=1, references=[sr, pm], created=WHEN
    )
    errors, _ = dciodvfy(kos, tmp_path)
    assert errors == []
    alone = write_key_object_selection(series[0], result, analysis_version=1)
    errors, _ = dciodvfy(alone, tmp_path)
    assert errors == []


@pytest.mark.usefixtures("strict_reading")
def test_round_trips_with_strict_validation(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    sr, pm = _results(series, result)
    kos = write_key_object_selection(series[0], result, analysis_version=1, references=[sr, pm])
    back = round_trip(kos)
    assert back.SOPClassUID == KeyObjectSelectionDocumentStorage
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(back)
    assert document.resolve_reference(pm.SOPInstanceUID)[0] == series[0].StudyInstanceUID


def test_selects_exactly_the_key_slices_and_the_results(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1, 4))
    sr, pm = _results(series, result)
    source = series[0]  # not a key slice: it gives patient and study only
    kos = write_key_object_selection(
        source, result, analysis_version=1, references=[sr, pm], created=WHEN
    )
    ct = str(source.SOPClassUID)
    assert _selected(kos) == {
        series[3].SOPInstanceUID: ("IMAGE", ct, ()),
        series[1].SOPInstanceUID: ("IMAGE", ct, ()),
        series[4].SOPInstanceUID: ("IMAGE", ct, ()),
        sr.SOPInstanceUID: ("COMPOSITE", str(sr.SOPClassUID), ()),
        pm.SOPInstanceUID: ("IMAGE", str(pm.SOPClassUID), ()),
    }
    # Every selected instance is evidence, nothing else is, all in the one study.
    assert set(_evidence(kos)) == set(_selected(kos))
    assert set(_evidence(kos).values()) == {source.StudyInstanceUID}
    # Key slices in key-slice order, then the results.
    order = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if "ReferencedSOPSequence" in item
    ]
    assert order[:3] == [
        series[3].SOPInstanceUID,
        series[1].SOPInstanceUID,
        series[4].SOPInstanceUID,
    ]


def test_lands_in_the_source_study_titled_and_described(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(2,))
    source = series[0]
    kos = write_key_object_selection(source, result, analysis_version=1, created=WHEN)
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber", "StudyID"):
        assert str(kos[keyword].value) == str(source[keyword].value), keyword
    assert kos.SeriesInstanceUID != source.SeriesInstanceUID
    assert kos.Modality == "KO" and kos.SeriesNumber == 9015
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113000",
        "DCM",
        "Of Interest",
    )
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert result.verdict_text() in _text(kos)
    assert SYNTHETIC_NOTICE in _text(kos)
    equipment = kos.ContributingEquipmentSequence
    assert any(DEMO_MODEL.sha256 in item.get("ContributionDescription", "") for item in equipment)
    real, _ = make_result(series, key_slices=(2,), model=REAL_MODEL)
    assert SYNTHETIC_NOTICE not in _text(
        write_key_object_selection(source, real, analysis_version=1)
    )


def test_enhanced_source_is_selected_by_frame(tmp_path: Path) -> None:
    enhanced = make_ct_series(4, rows=16, columns=16, enhanced=True)
    result, _ = make_result(enhanced, key_slices=(2, 1, 3), enhanced=True)
    kos = write_key_object_selection(enhanced[0], result, analysis_version=1)
    assert _selected(kos) == {
        enhanced[0].SOPInstanceUID: ("IMAGE", str(enhanced[0].SOPClassUID), (3, 2, 4))
    }
    errors, _ = dciodvfy(kos, tmp_path)
    assert errors == []
    single, _ = make_result(enhanced, key_slices=(2,), enhanced=True)
    one = write_key_object_selection(enhanced[0], single, analysis_version=1)
    assert _selected(one)[enhanced[0].SOPInstanceUID][2] == (3,)


def test_uids_are_deterministic(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    first = write_key_object_selection(series[0], result, analysis_version=1)
    again = write_key_object_selection(series[0], result, analysis_version=1)
    other = write_key_object_selection(series[0], result, analysis_version=2)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesNumber == 9025


def test_bad_input_raises(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    source = series[0]
    with pytest.raises(ValueError, match="not analysed"):
        write_key_object_selection(
            source, AnalysisResult.not_analysed("not axial", DEMO_MODEL), analysis_version=1
        )
    no_keys = replace(result, key_slices=[], key_slice_refs=[], heatmaps=[])
    with pytest.raises(ValueError, match="without key slices"):
        write_key_object_selection(source, no_keys, analysis_version=1)
    elsewhere = make_ct_series(1, rows=16, columns=16)[0]
    with pytest.raises(ValueError, match="not in the source study"):
        write_key_object_selection(source, result, analysis_version=1, references=[elsewhere])
    nameless = Dataset()
    nameless.StudyInstanceUID = source.StudyInstanceUID
    with pytest.raises(ValueError, match="lacks"):
        write_key_object_selection(source, result, analysis_version=1, references=[nameless])
