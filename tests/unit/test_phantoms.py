"""Phantoms: plausible HU, class-typical lesions, deterministic from a seed."""

from __future__ import annotations

import numpy as np
import pytest

from lungnode.domain import CLASS_LABELS
from lungnode.ml import phantoms
from lungnode.ml.phantoms import (
    ADENOCARCINOMA,
    LARGE_CELL,
    NORMAL,
    SQUAMOUS,
    generate_dataset,
    generate_slice,
    generate_volume,
)


def _lesion_stats(label: str, n: int = 20) -> list[dict[str, float]]:
    stats = []
    for seed in range(n):
        hu, mask = generate_slice(seed, label)
        ys, xs = np.nonzero(mask)
        size = hu.shape[0]
        stats.append(
            {
                "area": float(mask.sum()),
                "centre_offset": float(abs(xs.mean() - size / 2) / size),
                "median_hu": float(np.median(hu[mask])),
                "min_hu": float(hu[mask].min()),
            }
        )
    return stats


def test_anatomy_has_ct_like_values() -> None:
    hu, mask = generate_slice(3, NORMAL)
    assert hu.dtype == np.float32 and hu.shape == (256, 256)
    assert not mask.any()
    assert np.median(hu[:8, :8]) == pytest.approx(-1000, abs=40)  # air in the corner
    assert np.median(hu[128, 20:236]) > -900  # the body is in the middle
    lung_pixels = np.count_nonzero((hu > -950) & (hu < -750))
    assert lung_pixels > 0.1 * hu.size  # two lungs
    assert hu.max() > 300  # bone


def test_same_seed_same_image_different_seed_different_image() -> None:
    a, ma = generate_slice(42, ADENOCARCINOMA)
    b, mb = generate_slice(np.random.default_rng(42), ADENOCARCINOMA)
    c, _ = generate_slice(43, ADENOCARCINOMA)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(a, c)


def test_lesions_follow_their_class() -> None:
    adeno, squamous, large = (
        _lesion_stats(label) for label in (ADENOCARCINOMA, SQUAMOUS, LARGE_CELL)
    )
    mean = lambda stats, key: float(np.mean([s[key] for s in stats]))  # noqa: E731
    # Large cell carcinoma is the largest; squamous sits nearer the midline (perihilar).
    assert mean(large, "area") > 2 * mean(adeno, "area")
    assert mean(large, "area") > mean(squamous, "area")
    assert mean(squamous, "centre_offset") < mean(adeno, "centre_offset")
    assert mean(squamous, "centre_offset") < mean(large, "centre_offset")
    # All are solid (soft-tissue HU) in their mask; some squamous lesions cavitate.
    for stats in (adeno, squamous, large):
        assert mean(stats, "median_hu") > -100
    assert any(s["min_hu"] < -800 for s in squamous)
    assert all(s["min_hu"] > -400 for s in large)


def test_adenocarcinoma_has_a_ground_glass_halo() -> None:
    hu, mask = generate_slice(5, ADENOCARCINOMA)
    import cv2

    ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    ring &= ~mask
    halo = np.median(hu[ring])
    assert -750 < halo < -250  # between lung (-850) and solid tissue


def test_unknown_label_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        generate_slice(0, "Mesothelioma")


def test_volume_has_contiguous_lesion_slices() -> None:
    hu, mask = generate_volume(9, LARGE_CELL, n_slices=20, size=128, lesion_half_extent=3)
    assert hu.shape == (20, 128, 128) and mask.shape == hu.shape
    lesion_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    assert lesion_slices.size == 7
    assert np.all(np.diff(lesion_slices) == 1)
    areas = mask.sum(axis=(1, 2))[lesion_slices]
    assert areas.argmax() == 3  # the widest cross-section is in the middle
    normal_hu, normal_mask = generate_volume(9, NORMAL, n_slices=6, size=128)
    assert not normal_mask.any()


def test_dataset_is_balanced_and_reproducible() -> None:
    hu, y = generate_dataset(11, 3, size=64)
    assert hu.shape == (12, 64, 64)
    assert np.bincount(y).tolist() == [3, 3, 3, 3]
    hu2, y2 = generate_dataset(11, 3, size=64)
    np.testing.assert_array_equal(hu, hu2)
    np.testing.assert_array_equal(y, y2)
    assert set(phantoms.CLASS_LABELS) == set(CLASS_LABELS)
