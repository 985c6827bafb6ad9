"""Secondary Capture Grad-CAM images: valid, in the source study, deterministic."""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from lungnode.dicom.writers.sc import banner_text, render_key_image, write_sc_images
from lungnode.domain import INDETERMINATE, AnalysisResult
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


@pytest.fixture
def series() -> list[Dataset]:
    return make_ct_series(4, rows=64, columns=64, patient_name="Doe^Jane", patient_id="PID42")


def _write(series: list[Dataset], version: int = 1, **kwargs: object) -> list[Dataset]:
    result, volume = make_result(series, **kwargs)  # type: ignore[arg-type]
    return write_sc_images(series[0], result, volume, analysis_version=version, created=WHEN)


def test_dciodvfy_finds_no_errors(series: list[Dataset], tmp_path: Path) -> None:
    for image in _write(series):
        errors, _ = dciodvfy(image, tmp_path)
        assert errors == []


def test_enhanced_source_is_referenced_by_frame(tmp_path: Path) -> None:
    enhanced = make_ct_series(4, rows=32, columns=32, enhanced=True)
    images = _write(enhanced, enhanced=True)
    assert [int(im.SourceImageSequence[0].ReferencedFrameNumber) for im in images] == [3, 2]
    errors, _ = dciodvfy(images[0], tmp_path)
    assert errors == []


@pytest.mark.usefixtures("strict_reading")
def test_round_trips_with_strict_validation(series: list[Dataset]) -> None:
    image = _write(series)[0]
    back = round_trip(image)
    assert back.SOPInstanceUID == image.SOPInstanceUID
    assert back.pixel_array.shape == (int(image.Rows), int(image.Columns), 3)


def test_lands_in_the_source_study_in_a_new_series(series: list[Dataset]) -> None:
    source = series[0]
    images = _write(series)
    for image in images:
        for keyword in (
            "StudyInstanceUID",
            "PatientName",
            "PatientID",
            "PatientSex",
            "StudyDate",
            "StudyID",
            "AccessionNumber",
        ):
            assert str(image[keyword].value) == str(source[keyword].value), keyword
        assert image.SeriesInstanceUID != source.SeriesInstanceUID
        assert image.SeriesDescription == "LUNGNODE Grad-CAM"
        assert image.SeriesNumber == 9011
        assert image.Modality == "OT"
        assert image.BurnedInAnnotation == "YES"
        assert image.PhotometricInterpretation == "RGB"
    assert len({image.SeriesInstanceUID for image in images}) == 1
    assert [image.InstanceNumber for image in images] == [1, 2]


def test_references_the_key_slice_instances(series: list[Dataset]) -> None:
    images = _write(series, key_slices=(3, 0))
    refs = [image.SourceImageSequence[0] for image in images]
    assert [ref.ReferencedSOPInstanceUID for ref in refs] == [
        series[3].SOPInstanceUID,
        series[0].SOPInstanceUID,
    ]
    assert all(ref.ReferencedSOPClassUID == series[0].SOPClassUID for ref in refs)
    assert refs[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_contributing_equipment_names_the_model(series: list[Dataset]) -> None:
    image = _write(series)[0]
    items = image.ContributingEquipmentSequence
    # highdicom records the source's acquisition equipment and itself, too.
    ours = [i for i in items if i.get("ManufacturerModelName") == DEMO_MODEL.name]
    assert len(ours) == 1
    assert ours[0].Manufacturer == "lungnode"
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert DEMO_MODEL.version in ours[0].SoftwareVersions
    assert DEMO_MODEL.sha256 in ours[0].ContributionDescription
    assert "synthetic" in image.ImageComments.lower()


def test_uids_are_deterministic(series: list[Dataset]) -> None:
    first = [image.SOPInstanceUID for image in _write(series)]
    again = [image.SOPInstanceUID for image in _write(series)]
    next_version = _write(series, version=2)
    assert first == again
    assert not set(first) & {image.SOPInstanceUID for image in next_version}
    assert next_version[0].SeriesNumber == 9021


def _yellow_pixels(picture: np.ndarray) -> int:
    r, g, b = (picture[..., i].astype(int) for i in range(3))
    return int(((r > 200) & (g > 150) & (b < 80)).sum())


def test_synthetic_notice_is_burned_in_only_for_the_demo_model(series: list[Dataset]) -> None:
    result, volume = make_result(series)
    hu, heat = volume.hu[2], result.heatmaps[0]
    kwargs = {"verdict": "Adenocarcinoma (confidence 0.800)", "slice_score": 0.9}
    demo = render_key_image(hu, heat, model=DEMO_MODEL, **kwargs)  # type: ignore[arg-type]
    real = render_key_image(hu, heat, model=REAL_MODEL, **kwargs)  # type: ignore[arg-type]
    assert demo.shape[1] == 512 and demo.shape[0] > real.shape[0] > 512
    banner = real.shape[0] - 512
    assert _yellow_pixels(demo[: demo.shape[0] - 512]) > 50
    assert _yellow_pixels(real[:banner]) == 0
    # The red "NOT FOR DIAGNOSTIC USE" line is in both.
    assert (real[:banner, :, 0] > 200).sum() > 50


def test_indeterminate_images_say_the_verdict_as_the_report_does(
    series: list[Dataset], tmp_path: Path
) -> None:
    result, _ = make_result(series, verdict=INDETERMINATE)
    images = _write(series, verdict=INDETERMINATE)
    errors, _ = dciodvfy(images[0], tmp_path)
    assert errors == []
    for image in images:
        assert f"Verdict: {result.verdict_text()}" in image.ImageComments
        assert "Grad-CAM of the most likely lesion class" in image.DerivationDescription
    # The burned-in banner states the same words, wrapped to the image's width.
    lines = [text for text, _ in banner_text(result.verdict_text(), 0.749, DEMO_MODEL)]
    assert f"Verdict: {result.verdict_text()}" in lines
    assert "slice score 0.749" in " ".join(lines)


def test_not_analysed_has_no_images(series: list[Dataset]) -> None:
    _, volume = make_result(series)
    result = AnalysisResult.not_analysed("too few slices", DEMO_MODEL)
    with pytest.raises(ValueError, match="not analysed"):
        write_sc_images(series[0], result, volume, analysis_version=1)


def test_inconsistent_inputs_raise(series: list[Dataset]) -> None:
    result, volume = make_result(series)
    with pytest.raises(ValueError, match="heatmaps"):
        write_sc_images(series[0], replace(result, heatmaps=[]), volume, analysis_version=1)
    with pytest.raises(ValueError, match="outside the volume"):
        write_sc_images(series[0], replace(result, key_slices=[9, 1]), volume, analysis_version=1)
    with pytest.raises(ValueError, match="verdict"):
        write_sc_images(series[0], replace(result, verdict="Cat"), volume, analysis_version=1)
    source = series[0].copy()
    del source.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        write_sc_images(source, result, volume, analysis_version=1)


@pytest.mark.parametrize("normal_scores_highest", [False, True])
def test_render_results_draws_each_picture_once_with_the_same_pixels(
    series: list[Dataset], normal_scores_highest: bool
) -> None:
    """The results stage reuses a key picture for the Secondary Capture only where
    the two would say the same slice score; the pixels are those drawn apart."""
    from lungnode.pipeline.outputs import render_results

    result, volume = make_result(series)
    hu = volume.hu.copy()
    hu[:, 16:48, 16:48] = -50.0  # something to see under the heatmap
    volume = replace(volume, hu=hu)
    scores = np.array([0.7, 0.05, 0.2, 0.05], dtype=np.float32)
    if normal_scores_highest:  # the key pictures then show Normal's score, the SC the verdict's
        scores = np.array([0.3, 0.1, 0.5, 0.1], dtype=np.float32)
    result = replace(result, slice_scores=np.tile(scores, (len(series), 1)))
    alone = write_sc_images(series[0], result, volume, analysis_version=1, created=WHEN)
    rendered = render_results(series[0], volume, result, 1)
    together = [ds for kind, ds in rendered.datasets if kind == "sc"]
    assert [ds.PixelData for ds in together] == [ds.PixelData for ds in alone]
    pairs = zip(together, rendered.key_pictures, strict=True)
    shared = [np.array_equal(ds.pixel_array, picture) for ds, picture in pairs]
    assert shared == [not normal_scores_highest] * len(together)
