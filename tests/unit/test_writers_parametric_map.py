"""Parametric Map of the Grad-CAM maps: valid, on the CT's geometry, peak where Grad-CAM's is."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ParametricMapStorage

from lungnode.dicom.writers.common import SYNTHETIC_NOTICE
from lungnode.dicom.writers.parametric_map import write_parametric_map
from lungnode.domain import AnalysisResult
from tests.support.synthetic import dataset_bytes, make_ct_series, write_series
from tests.unit.dicom_checks import (
    DEMO_MODEL,
    REAL_MODEL,
    dciodvfy,
    make_result,
    round_trip,
    strict_reading,  # noqa: F401 - a fixture
)

WHEN = _dt.datetime(2025, 3, 4, 5, 6, 7)
DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "lung-ct-demo"


def header(ds: Dataset) -> Dataset:
    """``ds`` as the caller hands it over: read back without its pixel data."""
    return pydicom.dcmread(DicomBytesIO(dataset_bytes(ds)), stop_before_pixels=True)


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return make_ct_series(5, rows=24, columns=32, patient_name="Doe^Jane", patient_id="PID42")


def _rotation(yaw_deg: float, tilt_deg: float) -> np.ndarray:
    """A rotation about z by ``yaw`` after one about x by ``tilt``: a doubly oblique plane."""
    a, b = math.radians(yaw_deg), math.radians(tilt_deg)
    about_z = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rotation: np.ndarray = about_z @ about_x
    return rotation


@pytest.fixture(scope="module")
def oblique() -> list[Dataset]:
    """Five oblique slices: origin far from zero, 0.6 mm rows by 0.85 mm columns, 2.5 mm apart."""
    datasets = make_ct_series(5, rows=24, columns=32)
    rotation = _rotation(20.0, 15.0)
    row_dir, col_dir = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-101.25, 57.5, -340.0])
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [round(float(v), 6) for v in origin + 2.5 * k * normal]
        ds.PixelSpacing = [0.6, 0.85]
        ds.SliceThickness = 2.5
        del ds.SliceLocation
    return datasets


def _write(
    series: list[Dataset],
    result: AnalysisResult,
    version: int = 1,
) -> Dataset:
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    headers = [header(by_uid[ref.sop_instance_uid]) for ref in result.key_slice_refs]
    return write_parametric_map(headers, result, analysis_version=version, created=WHEN)


def patient_point(
    position: list[float], orientation: list[float], spacing: list[float], r: float, c: float
) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1: P = S + X * column spacing * c + Y * row spacing * r.

    X (the first three cosines) is the direction of a row (increasing column
    index), Y of a column (increasing row index); Pixel Spacing is (row
    spacing, column spacing), the spacing between rows first.
    """
    s = np.array([float(v) for v in position])
    x = np.array([float(v) for v in orientation[:3]])
    y = np.array([float(v) for v in orientation[3:]])
    point: np.ndarray = s + x * float(spacing[1]) * c + y * float(spacing[0]) * r
    return point


def pm_point(pm: Dataset, frame: int, r: float, c: float) -> np.ndarray:
    """Patient coordinate of pixel (r, c) of 0-based ``frame`` of the map."""
    per_frame = pm.PerFrameFunctionalGroupsSequence[frame]
    shared = pm.SharedFunctionalGroupsSequence[0]
    return patient_point(
        per_frame.PlanePositionSequence[0].ImagePositionPatient,
        shared.PlaneOrientationSequence[0].ImageOrientationPatient,
        shared.PixelMeasuresSequence[0].PixelSpacing,
        r,
        c,
    )


def ct_point(ct: Dataset, frame_number: int | None, r: float, c: float) -> np.ndarray:
    """Patient coordinate of pixel (r, c) of a CT slice (a frame of an enhanced one)."""
    if frame_number is None:
        return patient_point(
            ct.ImagePositionPatient, ct.ImageOrientationPatient, ct.PixelSpacing, r, c
        )
    shared = ct.SharedFunctionalGroupsSequence[0]
    return patient_point(
        ct.PerFrameFunctionalGroupsSequence[frame_number - 1]
        .PlanePositionSequence[0]
        .ImagePositionPatient,
        shared.PlaneOrientationSequence[0].ImageOrientationPatient,
        shared.PixelMeasuresSequence[0].PixelSpacing,
        r,
        c,
    )


def source_of(pm: Dataset, frame: int) -> tuple[str, int | None]:
    """(SOP Instance UID, frame number) of the CT slice beneath 0-based ``frame``."""
    (derivation,) = pm.PerFrameFunctionalGroupsSequence[frame].DerivationImageSequence
    (item,) = derivation.SourceImageSequence
    number = item.get("ReferencedFrameNumber")
    return str(item.ReferencedSOPInstanceUID), int(number) if number is not None else None


def test_dciodvfy_finds_no_errors(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series, key_slices=(3, 1, 4))
    errors, _ = dciodvfy(_write(series, result), tmp_path)
    assert errors == []


@pytest.mark.usefixtures("strict_reading")
def test_round_trips_with_strict_validation(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    pm = _write(series, result)
    back = round_trip(pm)
    assert back.SOPClassUID == ParametricMapStorage
    assert "FloatPixelData" in back and "PixelData" not in back
    assert int(back.BitsAllocated) == 32
    assert back.pixel_array.dtype == np.float32 and back.pixel_array.shape == (2, 24, 32)
    assert hd.pm.ParametricMap.from_dataset(back).SOPInstanceUID == pm.SOPInstanceUID


def test_lands_in_the_source_study_and_names_what_it_holds(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    pm = _write(series, result)
    source = series[0]
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber"):
        assert str(pm[keyword].value) == str(source[keyword].value), keyword
    assert pm.SeriesInstanceUID != source.SeriesInstanceUID
    assert pm.SeriesNumber == 9014
    assert pm.SeriesDescription == "LUNGNODE Grad-CAM map"
    assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert pm.Manufacturer == "lungnode" and pm.ManufacturerModelName == "lungnode"
    assert pm.ContentLabel == "GRADCAM"
    (mapping,) = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence
    assert (mapping.DoubleFloatRealWorldValueFirstValueMapped, mapping.RealWorldValueSlope) == (
        0.0,
        1.0,
    )
    assert mapping.DoubleFloatRealWorldValueLastValueMapped == 1.0
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert mapping.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("130403", "DCM")
    assert "Grad-CAM" in mapping.LUTExplanation
    # The source instances are referenced, per frame and as a whole.
    key_uids = {series[3].SOPInstanceUID, series[1].SOPInstanceUID}
    assert {item.ReferencedSOPInstanceUID for item in pm.SourceImageSequence} == key_uids
    assert {source_of(pm, f)[0] for f in range(2)} == key_uids
    equipment = pm.ContributingEquipmentSequence
    assert any(DEMO_MODEL.sha256 in item.get("ContributionDescription", "") for item in equipment)
    assert SYNTHETIC_NOTICE in pm.ImageComments
    assert "synthetic" in pm.ContentDescription


def test_a_real_model_carries_no_synthetic_notice(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(2,), model=REAL_MODEL)
    pm = _write(series, result)
    assert SYNTHETIC_NOTICE not in pm.ImageComments
    assert "synthetic" not in pm.ContentDescription


def test_each_frame_lies_on_its_ct_slice(oblique: list[Dataset], tmp_path: Path) -> None:
    """Pixel (r, c) of each frame is where pixel (r, c) of the CT slice beneath it is."""
    result, _ = make_result(oblique, key_slices=(3, 0, 4))
    pm = _write(oblique, result)
    errors, _ = dciodvfy(pm, tmp_path)
    assert errors == []
    assert pm.FrameOfReferenceUID == oblique[0].FrameOfReferenceUID
    by_uid = {ds.SOPInstanceUID: ds for ds in oblique}
    heat_of = {
        ref.sop_instance_uid: heat
        for ref, heat in zip(result.key_slice_refs, result.heatmaps, strict=True)
    }
    frames = round_trip(pm).pixel_array
    assert int(pm.NumberOfFrames) == 3
    rows, columns = int(pm.Rows), int(pm.Columns)
    assert (rows, columns) == (24, 32)
    pixels = [(0, 0), (0, columns - 1), (rows - 1, 0), (rows - 1, columns - 1), (7, 19), (17, 5)]
    for frame in range(3):
        uid, number = source_of(pm, frame)
        assert number is None
        ct = by_uid[uid]
        for r, c in pixels:
            np.testing.assert_allclose(
                pm_point(pm, frame, r, c), ct_point(ct, None, r, c), atol=1e-3
            )
        # The frame holds that slice's heatmap, not transposed, not another slice's.
        np.testing.assert_array_equal(frames[frame], heat_of[uid])


def test_enhanced_ct_frames_are_referenced_and_placed(tmp_path: Path) -> None:
    enhanced = make_ct_series(4, rows=24, columns=32, enhanced=True, frame_order=[2, 0, 3, 1])
    result, _ = make_result(enhanced, key_slices=(2, 1), enhanced=True)
    pm = write_parametric_map([header(enhanced[0])], result, analysis_version=1, created=WHEN)
    errors, _ = dciodvfy(pm, tmp_path)
    assert errors == []
    ct = enhanced[0]
    heat_of = {
        ref.frame_number: heat
        for ref, heat in zip(result.key_slice_refs, result.heatmaps, strict=True)
    }
    frames = round_trip(pm).pixel_array
    referenced = set()
    for frame in range(2):
        uid, number = source_of(pm, frame)
        assert uid == ct.SOPInstanceUID and number is not None
        referenced.add(number)
        for r, c in [(0, 0), (23, 31), (5, 20)]:
            np.testing.assert_allclose(
                pm_point(pm, frame, r, c), ct_point(ct, number, r, c), atol=1e-3
            )
        np.testing.assert_array_equal(frames[frame], heat_of[number])
    assert referenced == {3, 2}


def test_uids_are_deterministic(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    first = _write(series, result)
    again = _write(series, result)
    other = _write(series, result, version=2)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesNumber == 9024


def test_bad_input_raises(series: list[Dataset]) -> None:
    result, _ = make_result(series, key_slices=(3, 1))
    headers = [header(series[3]), header(series[1])]
    with pytest.raises(ValueError, match="not analysed"):
        write_parametric_map(
            headers, AnalysisResult.not_analysed("not axial", DEMO_MODEL), analysis_version=1
        )
    no_keys = replace(result, key_slices=[], key_slice_refs=[], heatmaps=[])
    with pytest.raises(ValueError, match="without key slices"):
        write_parametric_map(headers, no_keys, analysis_version=1)
    with pytest.raises(ValueError, match="heatmaps"):
        write_parametric_map(
            headers, replace(result, heatmaps=result.heatmaps[:1]), analysis_version=1
        )
    with pytest.raises(ValueError, match="no source header"):
        write_parametric_map(headers[:1], result, analysis_version=1)
    with pytest.raises(ValueError, match="no source headers"):
        write_parametric_map([], result, analysis_version=1)
    wrong_size = [np.zeros((8, 8), np.float32), result.heatmaps[1]]
    with pytest.raises(ValueError, match="heatmap of"):
        write_parametric_map(headers, replace(result, heatmaps=wrong_size), analysis_version=1)
    not_finite = [np.full((24, 32), np.nan, np.float32), result.heatmaps[1]]
    with pytest.raises(ValueError, match="not finite"):
        write_parametric_map(headers, replace(result, heatmaps=not_finite), analysis_version=1)
    for keyword in (
        "ImagePositionPatient",
        "PixelSpacing",
        "SliceThickness",
        "FrameOfReferenceUID",
    ):
        flat = header(series[3])
        del flat[keyword]
        with pytest.raises(ValueError, match=f"no geometry: {keyword}"):
            write_parametric_map([flat, headers[1]], result, analysis_version=1)
    elsewhere = header(series[1])
    elsewhere.FrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="more than one Frame of Reference"):
        write_parametric_map([headers[0], elsewhere], result, analysis_version=1)


def test_map_peak_is_the_grad_cam_peak_and_on_the_lesion(tmp_path: Path) -> None:
    """The demo model on a lesion phantom: the map's peak, read back from the object
    alone, is where Grad-CAM peaked, and on the lesion.

    Tolerance to the lesion: the phantom draws the lesion as a lobulated disc
    around its centre (``ml.phantoms``), and Grad-CAM of the demo model comes
    from a 16x16 feature map upsampled to 256x256 (cells of 16 pixels), so its
    peak is expected anywhere on the lesion, not at its centre. The pointing
    game (``test_pointing_game``) counts a peak within the lesion mask dilated
    by 3 pixels as a hit; here the peak must be no farther from the lesion's
    centroid than the lesion's farthest pixel plus those 3 pixels.
    """
    from lungnode.ml.bundle import load_bundle
    from lungnode.ml.phantoms import generate_volume
    from lungnode.pipeline.analyze import analyze_series

    hu, mask = generate_volume(
        101, "Large Cell Carcinoma", n_slices=16, size=256, lesion_half_extent=3
    )
    datasets = make_ct_series(
        16, rows=256, columns=256, pixel_spacing_mm=0.8, slice_hu=lambda k: np.rint(hu[k])
    )
    paths = write_series(datasets, tmp_path / "ct")
    _, result = analyze_series(paths, load_bundle(DEMO_BUNDLE))
    assert result.verdict == "Large Cell Carcinoma", result.class_scores
    headers = {
        str(h.SOPInstanceUID): h
        for h in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    }
    index_of = {ds.SOPInstanceUID: k for k, ds in enumerate(datasets)}
    pm = write_parametric_map(
        [headers[ref.sop_instance_uid] for ref in result.key_slice_refs],
        result,
        analysis_version=1,
    )
    back = round_trip(pm)
    frames = back.pixel_array
    heat_of = {
        ref.sop_instance_uid: heat
        for ref, heat in zip(result.key_slice_refs, result.heatmaps, strict=True)
    }
    assert frames.shape[0] == len(heat_of)
    for frame in range(frames.shape[0]):
        uid, _ = source_of(back, frame)
        ct = headers[uid]
        r, c = np.unravel_index(int(np.argmax(frames[frame])), frames[frame].shape)
        peak = pm_point(back, frame, int(r), int(c))
        gr, gc = np.unravel_index(int(np.argmax(heat_of[uid])), heat_of[uid].shape)
        grad_cam_peak = ct_point(ct, None, int(gr), int(gc))
        one_pixel = max(float(v) for v in ct.PixelSpacing)
        assert np.linalg.norm(peak - grad_cam_peak) <= one_pixel

        lesion = np.argwhere(mask[index_of[uid]])
        assert len(lesion), "a key slice of this phantom cuts the lesion"
        centroid_rc = lesion.mean(axis=0)
        centre = ct_point(ct, None, float(centroid_rc[0]), float(centroid_rc[1]))
        extent_px = float(np.linalg.norm(lesion - centroid_rc, axis=1).max()) + 3.0
        distance = float(np.linalg.norm(peak - centre))
        print(
            f"key slice {index_of[uid]}: map peak {distance:.1f} mm from the lesion centroid "
            f"(tolerance {extent_px * one_pixel:.1f} mm)"
        )
        assert distance <= extent_px * one_pixel


def test_enhanced_ct_without_shared_pixel_measures_raises() -> None:
    """highdicom places a multi-frame source by its shared groups only (see the writer)."""
    enhanced = header(make_ct_series(4, rows=16, columns=16, enhanced=True)[0])
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence
    del shared.PixelMeasuresSequence
    for group in enhanced.PerFrameFunctionalGroupsSequence:
        group.PixelMeasuresSequence = measures
    result, _ = make_result([enhanced], key_slices=(2, 1), enhanced=True)
    with pytest.raises(ValueError, match="cannot build the Parametric Map"):
        write_parametric_map([enhanced], result, analysis_version=1)
