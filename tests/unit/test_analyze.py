"""analyze_volume / analyze_path / analyze_series: verdicts, key slices, heatmaps, timings."""

from __future__ import annotations

from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from lungnode.domain import CLASS_LABELS, AnalysisResult, HUVolume, SliceRef
from lungnode.imaging.windowing import window_to_uint8
from lungnode.ml.bundle import ModelBundle, load_bundle
from lungnode.ml.phantoms import generate_slice, generate_volume
from lungnode.ml.train import build_small_cnn, write_bundle
from lungnode.pipeline.analyze import analyze_path, analyze_series, analyze_volume

DEMO = Path(__file__).resolve().parents[2] / "models" / "lung-ct-demo"


@pytest.fixture(scope="module")
def demo() -> ModelBundle:
    return load_bundle(DEMO)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    keras.utils.set_random_seed(4)
    out = write_bundle(
        build_small_cnn((32, 32), 2, 4),
        tmp_path_factory.mktemp("b") / "tiny",
        name="tiny",
        version="1",
        labels=CLASS_LABELS,
        input_size=(32, 32),
        windows=("lung", "mediastinal"),
        gradcam_layer="gradcam_conv",
    )
    return load_bundle(out)


def _volume(label: str, seed: int, n: int = 24, size: int = 256) -> tuple[HUVolume, np.ndarray]:
    hu, mask = generate_volume(seed, label, n_slices=n, size=size, lesion_half_extent=3)
    refs = [SliceRef(f"2.25.{seed}.{i}", position_mm=float(i)) for i in range(n)]
    return HUVolume(hu, refs, (0.7, 0.7), 1.0), mask


def test_result_is_consistent(tiny: ModelBundle) -> None:
    volume, _ = _volume("Adenocarcinoma", 1, n=10, size=64)
    result = analyze_volume(volume, tiny)
    assert result.analysed and result.verdict in CLASS_LABELS
    assert result.slice_scores.shape == (10, 4)
    assert sum(result.class_scores.values()) == pytest.approx(1.0)
    assert result.confidence == pytest.approx(result.class_scores[result.verdict])
    assert len(result.key_slices) == 4
    assert result.key_slice_refs == [volume.slices[i] for i in result.key_slices]
    assert len(result.heatmaps) == 4
    assert all(h.shape == (64, 64) and h.dtype == np.float32 for h in result.heatmaps)
    assert set(result.timings_s) >= {"preprocess", "inference", "aggregate", "gradcam", "total"}
    assert result.model == tiny.identity
    assert result.labels == CLASS_LABELS and result.rule["rule"] == "lesion_slices"
    without = analyze_volume(volume, tiny, with_heatmaps=False)
    assert without.heatmaps == [] and "gradcam" not in without.timings_s


def test_empty_volume_is_not_analysed(tiny: ModelBundle) -> None:
    empty = HUVolume(np.zeros((0, 8, 8), np.float32), [])
    result = analyze_volume(empty, tiny)
    assert not result.analysed and "no slices" in (result.not_analysed_reason or "")
    assert AnalysisResult.not_analysed("x", tiny.identity).verdict == ""


@pytest.mark.parametrize(
    ("label", "seed"), [(label, 100 + i) for i, label in enumerate(CLASS_LABELS)]
)
def test_demo_model_series_verdicts(demo: ModelBundle, label: str, seed: int) -> None:
    volume, mask = _volume(label, seed)
    result = analyze_volume(volume, demo)
    assert result.verdict == label, result.class_scores
    assert result.model.synthetic
    if label != "Normal":
        lesion = set(np.flatnonzero(mask.any(axis=(1, 2))))
        # Key slices are lesion slices, and the heatmap is hotter on the lesion than elsewhere.
        assert set(result.key_slices) <= lesion
        first = result.key_slices[0]
        heat = result.heatmaps[0]
        assert heat[mask[first]].mean() > 2 * heat[~mask[first]].mean()


def test_analyze_png_reads_grey_as_lung_window(demo: ModelBundle, tmp_path: Path) -> None:
    hu, _ = generate_slice(4242, "Large Cell Carcinoma")
    path = tmp_path / "slice.png"
    cv2.imwrite(str(path), window_to_uint8(hu, "lung"))
    result = analyze_path(path, demo).result
    assert result.verdict == "Large Cell Carcinoma"
    assert result.slice_scores.shape == (1, 4) and result.rule["min_slices_applied"] == 1
    assert result.heatmaps[0].shape == hu.shape
    assert "decode" in result.timings_s


def test_unreadable_picture_is_a_value_error(tiny: ModelBundle, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="not a readable"):
        analyze_path(bad, tiny)
    gif = tmp_path / "x.gif"
    gif.write_bytes(b"GIF89a" + bytes(200))
    with pytest.raises(ValueError, match="expected a PNG"):
        analyze_path(gif, tiny)


def test_dicom_series_end_to_end(demo: ModelBundle, tmp_path: Path) -> None:
    from tests.support.synthetic import make_ct_series, write_series

    hu, mask = generate_volume(
        31, "Squamous Cell Carcinoma", n_slices=16, size=256, lesion_half_extent=3
    )
    datasets = make_ct_series(16, rows=256, columns=256, slice_hu=lambda k: np.rint(hu[k]))
    paths = write_series(datasets, tmp_path)
    # Shuffled: scores come back in decode order and must follow the slices.
    shuffled = [paths[i] for i in np.random.default_rng(2).permutation(len(paths))]
    volume, result = analyze_series(shuffled, demo)
    assert result.verdict == "Squamous Cell Carcinoma"
    uids = {ds.SOPInstanceUID for ds in datasets}
    assert {ref.sop_instance_uid for ref in result.key_slice_refs} <= uids
    assert {"decode", "preprocess", "inference", "gradcam", "total"} <= set(result.timings_s)
    # The overlapped path scores exactly what the one-thread path scores.
    reference = analyze_volume(volume, demo, with_heatmaps=False)
    assert np.allclose(result.slice_scores, reference.slice_scores, atol=1e-5)
    assert result.key_slices == reference.key_slices
    assert set(result.lesion_slices) <= set(np.flatnonzero(mask.any(axis=(1, 2))).tolist())
    single = analyze_path(paths[int(np.flatnonzero(mask.any(axis=(1, 2)))[3])], demo).result
    assert single.slice_scores.shape == (1, 4)


def test_analyze_series_runs_the_check_and_propagates_its_error(
    tiny: ModelBundle, tmp_path: Path
) -> None:
    from tests.support.synthetic import make_ct_series, write_series

    paths = write_series(make_ct_series(3, rows=32, columns=32), tmp_path)
    seen: list[int] = []

    def check(volume: HUVolume) -> None:
        seen.append(volume.hu.shape[0])
        raise LookupError("too few")

    with pytest.raises(LookupError, match="too few"):
        analyze_series(paths, tiny, check=check)
    assert seen == [3]
