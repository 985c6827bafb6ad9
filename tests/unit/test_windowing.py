"""Windowing follows the DICOM linear VOI LUT and builds float32 model input."""

from __future__ import annotations

import numpy as np
import pytest

from lungnode.imaging.windowing import (
    WINDOWS,
    Window,
    apply_window,
    build_model_input,
    get_window,
    grey_to_hu,
    picture_to_hu,
    window_to_uint8,
)


def test_named_windows_have_standard_values() -> None:
    assert WINDOWS["lung"] == Window(-600, 1500)
    assert WINDOWS["mediastinal"] == Window(40, 350)
    assert {"bone", "soft_tissue"} <= set(WINDOWS)


def test_linear_function_matches_ps3_3_c11_2_1_2() -> None:
    c, w = 40.0, 350.0
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    hu = np.array([low - 100, low, (low + high) / 2, high, high + 0.01, 3000], dtype=np.float32)
    out = apply_window(hu, Window(c, w))
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0] == 0.0 and out[1] == 0.0 and out[-1] == 1.0
    assert out.dtype == np.float32


def test_linear_exact_and_threshold_width() -> None:
    hu = np.array([-200.0, 40.0, 300.0], dtype=np.float32)
    np.testing.assert_allclose(
        apply_window(hu, Window(40, 350), function="LINEAR_EXACT"), [0.0, 0.5, 1.0]
    )
    np.testing.assert_array_equal(apply_window(hu, Window(40, 1)), [0.0, 1.0, 1.0])


def test_integer_input_and_in_place_output() -> None:
    hu = np.array([[-1000, 0, 1000]], dtype=np.int16)
    out = apply_window(hu, "lung")
    assert out.dtype == np.float32
    buf = np.zeros((1, 3), dtype=np.float32)
    assert apply_window(hu, "lung", out=buf) is buf
    np.testing.assert_array_equal(buf, out)


def test_invalid_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="width"):
        Window(0, 0.5)
    with pytest.raises(ValueError, match="known windows"):
        get_window("brain-ish")


def test_build_model_input_shape_dtype_and_channels() -> None:
    hu = np.full((5, 64, 96), -850.0, dtype=np.float32)
    hu[:, :, 48:] = 40.0  # right half soft tissue
    x = build_model_input(hu, ["lung", "mediastinal"], (32, 48))
    assert x.shape == (5, 32, 48, 2) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    lung, mediastinal = x[0, :, :, 0], x[0, :, :, 1]
    np.testing.assert_allclose(lung[:, :20], apply_window(np.float32(-850), "lung"), atol=1e-5)
    assert np.all(mediastinal[:, :20] == 0.0)  # lung is black in the mediastinal window
    np.testing.assert_allclose(
        mediastinal[:, 30:], apply_window(np.float32(40), "mediastinal"), atol=1e-5
    )


def test_build_model_input_resizes_by_area_averaging() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, (300, 16, 16)).astype(np.float32)
    x = build_model_input(hu, ["lung"], (8, 8))
    # INTER_AREA at an integer factor is the mean of each 2x2 block; the
    # window applies to that mean.
    expected = apply_window(hu.reshape(300, 8, 2, 8, 2).mean(axis=(2, 4)), "lung")
    np.testing.assert_allclose(x[..., 0], expected, atol=1e-5)


def test_grey_round_trip_through_the_lung_window() -> None:
    grey = np.arange(256, dtype=np.uint8)[np.newaxis]
    hu = grey_to_hu(grey)
    assert hu.dtype == np.float32
    assert hu[0, 0] == pytest.approx(-1350.0) and hu[0, -1] == pytest.approx(149.0)
    np.testing.assert_array_equal(window_to_uint8(hu, "lung"), grey)


def test_picture_to_hu_accepts_colour_and_16_bit() -> None:
    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[..., :] = 255
    assert np.allclose(picture_to_hu(colour), 149.0)
    deep = np.full((4, 4), 65535, dtype=np.uint16)
    assert np.allclose(picture_to_hu(deep), 149.0)
