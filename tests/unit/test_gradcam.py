"""Grad-CAM: batched maps that point at the evidence, for many model families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import pytest

from lungnode.imaging.heatmap import overlay, save_png
from lungnode.ml.gradcam import (
    find_gradcam_layer,
    gradcam_batch,
    heatmaps_for_slices,
    upsample,
)


def _blob_detector() -> Any:
    """Class 0 score grows with bright pixels; fixed weights, so the answer is known."""
    inputs = keras.Input((16, 16, 1))
    features = keras.layers.Conv2D(
        1, 1, use_bias=False, activation="relu", name="features", kernel_initializer="ones"
    )(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(2, activation="softmax", name="scores")(pooled)
    model = keras.Model(inputs, outputs)
    model.get_layer("scores").set_weights([np.array([[50.0, -50.0]]), np.zeros(2)])
    return model


def _blobs(corners: list[tuple[int, int]]) -> np.ndarray:
    batch = np.zeros((len(corners), 16, 16, 1), dtype=np.float32)
    for i, (y, x) in enumerate(corners):
        batch[i, y : y + 4, x : x + 4] = 1.0
    return batch


def test_heatmap_peaks_where_the_evidence_is_for_each_slice_of_the_batch() -> None:
    model = _blob_detector()
    corners = [(0, 0), (12, 12), (0, 12)]
    # The softmax is saturated (score ~1.0); a softmax-gradient Grad-CAM would be ~0.
    assert model.predict_on_batch(_blobs(corners))[:, 0].min() > 0.99
    cams = gradcam_batch(model, _blobs(corners), [0, 0, 0], "features")
    assert cams.shape == (3, 16, 16) and cams.dtype == np.float32
    for cam, (y, x) in zip(cams, corners, strict=True):
        assert cam.max() == pytest.approx(1.0)
        assert cam[y : y + 4, x : x + 4].min() == pytest.approx(1.0)
        assert cam.sum() == pytest.approx(16.0)  # nothing outside the blob


def test_class_without_positive_evidence_gives_a_zero_map() -> None:
    cams = gradcam_batch(_blob_detector(), _blobs([(4, 4)]), [1], "features")
    assert np.all(cams == 0.0)


def test_the_pass_is_traced_once_per_model_whatever_the_batch_size() -> None:
    from lungnode.ml import gradcam

    model = _blob_detector()
    for corners in ([(0, 0)], [(0, 0), (12, 12), (0, 12)], [(4, 4), (8, 8)]):
        cams = gradcam_batch(model, _blobs(corners), [0] * len(corners), "features")
        for cam, (y, x) in zip(cams, corners, strict=True):
            assert cam[y : y + 4, x : x + 4].min() == pytest.approx(1.0)
    (compute,) = gradcam._COMPILED[model].values()
    assert compute.experimental_get_tracing_count() == 1


def test_layer_is_found_automatically_and_errors_are_clear() -> None:
    model = _blob_detector()
    assert find_gradcam_layer(model) == "features"
    with pytest.raises(ValueError, match="one class index"):
        gradcam_batch(model, _blobs([(0, 0)]), [0, 0])
    flat = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ValueError, match="4D"):
        find_gradcam_layer(flat)


@pytest.mark.parametrize(
    ("family", "kwargs"),
    [
        ("ResNet50", {}),
        ("VGG16", {}),
        ("DenseNet121", {}),
        ("EfficientNetB0", {}),
        ("MobileNetV2", {}),
        ("MobileNetV3Small", {"include_preprocessing": False}),
    ],
)
def test_keras_applications_families(family: str, kwargs: dict[str, Any]) -> None:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, family)(
        weights=None, input_shape=(64, 64, 3), classes=4, **kwargs
    )
    layer = find_gradcam_layer(model)
    shape = model.get_layer(layer).output.shape
    assert len(shape) == 4 and shape[1] > 1  # a real spatial map, not a pooled head
    batch = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    cams = gradcam_batch(model, batch, [0, 3])
    assert cams.shape[0] == 2 and cams.ndim == 3
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    maps = [upsample(cam, (64, 64)) for cam in cams]
    assert all(m.shape == (64, 64) for m in maps)


def test_overlay_shows_heat_and_a_legend(tmp_path: Path) -> None:
    hu = np.full((128, 128), -850.0, dtype=np.float32)
    heat = np.zeros((128, 128), dtype=np.float32)
    heat[40:60, 30:50] = 1.0
    rgb = overlay(hu, heat)
    assert rgb.shape == (128, 128, 3) and rgb.dtype == np.uint8
    cold, hot = rgb[10, 10], rgb[50, 40]
    assert cold[0] == cold[1] == cold[2]  # grey where there is no heat
    assert hot[0] > hot[2] + 40  # JET 1.0 is red, blended over the grey lung
    # The legend bar near the right edge runs from red (1, top) to blue (0, bottom).
    column = rgb[:, 128 - 18].astype(int)
    colourful = np.flatnonzero(column.max(axis=1) - column.min(axis=1) > 100)
    assert colourful.size > 20
    top, bottom = column[colourful[0]], column[colourful[-1]]
    assert top[0] > 100 and top[2] < 50
    assert bottom[2] > 100 and bottom[0] < 50
    path = save_png(tmp_path / "overlay.png", rgb)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    with pytest.raises(ValueError, match="differ"):
        overlay(hu, heat[:64])


def test_heatmaps_for_slices_are_at_slice_size(tmp_path: Path) -> None:
    from lungnode.ml.bundle import load_bundle
    from lungnode.ml.train import build_small_cnn, write_bundle

    keras.utils.set_random_seed(2)
    out = write_bundle(
        build_small_cnn((32, 32), 2, 4),
        tmp_path / "tiny",
        name="tiny",
        version="1",
        labels=("Adenocarcinoma", "Large Cell Carcinoma", "Normal", "Squamous Cell Carcinoma"),
        input_size=(32, 32),
        windows=("lung", "mediastinal"),
        gradcam_layer="gradcam_conv",
    )
    bundle = load_bundle(out)
    hu = np.random.default_rng(1).uniform(-1000, 200, (3, 80, 60)).astype(np.float32)
    maps = heatmaps_for_slices(bundle, hu, [0, 1, 3])
    assert len(maps) == 3
    for heat in maps:
        assert heat.shape == (80, 60) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heatmaps_for_slices(bundle, hu[:0], []) == []
