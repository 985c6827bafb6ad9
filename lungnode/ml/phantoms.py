"""Synthetic axial chest CT slices in Hounsfield units, with class-typical lesions.

This is a stand-in for real labelled lung CT, which this project does not
have and cannot ship. The phantoms let us train a demonstration model, test
the whole pipeline end to end, and check that a series verdict follows the
slices, all without patient data. A model trained on them knows nothing about
real patients, and every output built with it says so.

Anatomy (HU, roughly as on a real scan): air -1000 outside, a body ellipse of
soft tissue (+40) under a subcutaneous fat layer (-100), two lungs (-850)
with vessels as small bright blobs, a mediastinum with heart and aorta, a
vertebral body, sternum and ribs, and Gaussian noise.

Lesions follow the textbook look of each class:

- adenocarcinoma: peripheral, part solid with a ground-glass halo (~-500 HU),
  spiculated;
- squamous cell carcinoma: central/perihilar, solid and lobulated, sometimes
  cavitating (an air centre);
- large cell carcinoma: large, peripheral, solid, smooth and well defined;
- Normal: no lesion.

Everything is drawn with OpenCV on float32 images and is deterministic given
a ``numpy.random.Generator`` or an integer seed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from lungnode.domain import CLASS_LABELS

logger = logging.getLogger(__name__)

ADENOCARCINOMA, LARGE_CELL, NORMAL, SQUAMOUS = CLASS_LABELS

AIR_HU, FAT_HU, SOFT_HU, LUNG_HU, GGO_HU = -1000.0, -100.0, 40.0, -850.0, -500.0

SeedLike = np.random.Generator | int | None


def as_generator(seed: SeedLike) -> np.random.Generator:
    """Accept a Generator (used as is) or a seed (a fresh PCG64 generator)."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


@dataclass(frozen=True)
class _Anatomy:
    """One patient's geometry, as fractions of the image size (drawn once per volume)."""

    body_axes: tuple[float, float]
    body_center: tuple[float, float]
    fat: float
    lung_axes: tuple[float, float]
    lung_dx: float
    lung_dy: float
    lung_tilt: float
    noise_hu: float
    vessels: np.ndarray  # (n, 4): lung side 0/1, radial fraction, angle, radius fraction


@dataclass(frozen=True)
class _Lesion:
    """A lesion in one lung, in lung-relative coordinates."""

    label: str
    side: int  # 0 = image left, 1 = image right
    radial: float  # 0 = lung centre, 1 = lung border
    angle: float  # radians; 0 points laterally, away from the mediastinum
    radius: float  # fraction of image width
    cavity: float  # cavity radius as a fraction of the lesion radius; 0 = none
    outline: np.ndarray  # radial multipliers of the lesion border (lobulation)
    spicules: np.ndarray  # (n, 2): angle, length as multiple of radius


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    n_vessels = int(rng.integers(14, 28))
    vessels = np.column_stack(
        [
            rng.integers(0, 2, n_vessels),
            np.sqrt(rng.uniform(0.0, 0.85, n_vessels)),
            rng.uniform(0, 2 * math.pi, n_vessels),
            rng.uniform(0.003, 0.011, n_vessels),
        ]
    )
    return _Anatomy(
        body_axes=(rng.uniform(0.40, 0.45), rng.uniform(0.27, 0.33)),
        body_center=(0.5 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.02, 0.02)),
        fat=rng.uniform(0.012, 0.035),
        lung_axes=(rng.uniform(0.13, 0.16), rng.uniform(0.19, 0.23)),
        lung_dx=rng.uniform(0.18, 0.21),
        lung_dy=rng.uniform(-0.04, -0.01),
        lung_tilt=rng.uniform(-12, 12),
        noise_hu=rng.uniform(8.0, 22.0),
        vessels=vessels,
    )


def _sample_lesion(rng: np.random.Generator, label: str) -> _Lesion | None:
    if label == NORMAL:
        return None
    if label not in CLASS_LABELS:
        raise ValueError(f"unknown class {label!r}; known: {CLASS_LABELS}")
    side = int(rng.integers(0, 2))
    n_outline = 16
    cavity = 0.0
    spicules = np.zeros((0, 2))
    if label == ADENOCARCINOMA:
        radial = rng.uniform(0.55, 0.75)
        angle = rng.uniform(-1.4, 1.4)  # lateral half: peripheral
        radius = rng.uniform(0.022, 0.04)
        outline = 1.0 + rng.uniform(-0.25, 0.25, n_outline)
        n_spicules = int(rng.integers(7, 13))
        spicules = np.column_stack(
            [rng.uniform(0, 2 * math.pi, n_spicules), rng.uniform(1.5, 2.4, n_spicules)]
        )
    elif label == SQUAMOUS:
        radial = rng.uniform(0.4, 0.62)
        angle = math.pi + rng.uniform(-0.6, 0.6)  # medial: perihilar
        radius = rng.uniform(0.035, 0.06)
        outline = 1.0 + rng.uniform(-0.12, 0.12, n_outline)
        if rng.random() < 0.5:
            cavity = rng.uniform(0.3, 0.55)
    else:  # large cell carcinoma
        radial = rng.uniform(0.35, 0.55)
        angle = rng.uniform(-1.2, 1.2)
        radius = rng.uniform(0.065, 0.095)
        outline = 1.0 + rng.uniform(-0.03, 0.03, n_outline)
    return _Lesion(label, side, radial, angle, radius, cavity, outline, spicules)


def _lung_geometry(
    anat: _Anatomy, size: int, side: int, z: float
) -> tuple[tuple[int, int], tuple[int, int], float]:
    """Centre (x, y), semi-axes and tilt of one lung at height ``z`` in [0, 1]."""
    grow = 0.75 + 0.25 * math.sin(math.pi * z)  # lungs are largest mid-chest
    sign = -1 if side == 0 else 1
    cx = size * (anat.body_center[0] + sign * anat.lung_dx)
    cy = size * (anat.body_center[1] + anat.lung_dy)
    axes = (round(size * anat.lung_axes[0] * grow), round(size * anat.lung_axes[1] * grow))
    return (round(cx), round(cy)), axes, sign * anat.lung_tilt


def _draw_anatomy(
    anat: _Anatomy, size: int, z: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return (hu without noise, lung mask uint8) for one slice."""
    hu = np.full((size, size), AIR_HU, dtype=np.float32)
    bx, by = anat.body_center[0] * size, anat.body_center[1] * size
    body_axes = (round(anat.body_axes[0] * size), round(anat.body_axes[1] * size))
    centre = (round(bx), round(by))
    cv2.ellipse(hu, centre, body_axes, 0, 0, 360, FAT_HU, -1)
    inner = (round(body_axes[0] - anat.fat * size), round(body_axes[1] - anat.fat * size))
    cv2.ellipse(hu, centre, inner, 0, 0, 360, SOFT_HU, -1)
    # Ribs: bright dots on an ellipse just inside the muscle wall.
    for t in np.linspace(0.15, math.pi - 0.15, 6):
        for sign in (-1, 1):
            rx = bx + sign * (inner[0] - 0.03 * size) * math.cos(t)
            ry = by - (inner[1] - 0.03 * size) * math.sin(t) * 0.2 + 0.12 * size * (1 - math.sin(t))
            cv2.circle(hu, (round(rx), round(ry)), max(1, round(0.011 * size)), 600.0, -1)
    lung = np.zeros((size, size), dtype=np.uint8)
    for side in (0, 1):
        c, axes, tilt = _lung_geometry(anat, size, side, z)
        cv2.ellipse(lung, c, axes, tilt, 0, 360, 1, -1)
    hu[lung > 0] = LUNG_HU
    # Vessels: small bright blobs, clipped to the lungs.
    vessel_layer = np.zeros_like(lung)
    for side, radial, angle, radius in anat.vessels:
        c, axes, _ = _lung_geometry(anat, size, int(side), z)
        jitter = rng.normal(0, 0.01)
        vx = c[0] + (radial + jitter) * axes[0] * math.cos(angle)
        vy = c[1] + (radial + jitter) * axes[1] * math.sin(angle)
        cv2.circle(vessel_layer, (round(vx), round(vy)), max(1, round(radius * size)), 1, -1)
    hu[(vessel_layer > 0) & (lung > 0)] = SOFT_HU
    # Mediastinum: heart (anterior, slightly left of the patient = image right),
    # descending aorta beside the spine, vertebral body and sternum.
    heart_c = (round(bx + 0.04 * size), round(by - 0.05 * size))
    cv2.ellipse(hu, heart_c, (round(0.09 * size), round(0.08 * size)), 20, 0, 360, 35.0, -1)
    cv2.circle(
        hu, (round(bx + 0.05 * size), round(by + 0.12 * size)), round(0.028 * size), 45.0, -1
    )
    spine_c = (round(bx), round(by + 0.19 * size))
    cv2.circle(hu, spine_c, round(0.055 * size), 700.0, -1)
    cv2.circle(hu, spine_c, round(0.042 * size), 250.0, -1)
    cv2.ellipse(
        hu,
        (round(bx), round(by - anat.body_axes[1] * size + 0.05 * size)),
        (round(0.025 * size), round(0.012 * size)),
        0,
        0,
        360,
        400.0,
        -1,
    )
    return hu, lung


def _lesion_outline(lesion: _Lesion, centre: tuple[float, float], radius_px: float) -> np.ndarray:
    n = len(lesion.outline)
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = radius_px * lesion.outline
    pts = np.column_stack([centre[0] + r * np.cos(theta), centre[1] + r * np.sin(theta)])
    return np.round(pts).astype(np.int32)


def _draw_lesion(
    hu: np.ndarray, lung: np.ndarray, anat: _Anatomy, lesion: _Lesion, z: float, scale: float
) -> np.ndarray:
    """Paint ``lesion`` at cross-section ``scale`` (0..1] into ``hu``; return its mask."""
    size = hu.shape[0]
    c, axes, _ = _lung_geometry(anat, size, lesion.side, z)
    lateral = -1 if lesion.side == 0 else 1  # image x direction that points away from the midline
    cx = c[0] + lateral * lesion.radial * axes[0] * math.cos(lesion.angle)
    cy = c[1] + lesion.radial * axes[1] * math.sin(lesion.angle)
    radius_px = max(1.5, lesion.radius * size * scale)
    inside = lung > 0
    core = np.zeros_like(lung)
    cv2.fillPoly(core, [_lesion_outline(lesion, (cx, cy), radius_px)], 1)
    if lesion.label == ADENOCARCINOMA:
        halo = np.zeros((size, size), dtype=np.float32)
        cv2.circle(halo, (round(cx), round(cy)), round(radius_px * 2.0), 1.0, -1)
        k = max(3, round(radius_px * 0.6) | 1)
        weight: np.ndarray = cv2.GaussianBlur(halo, (k, k), 0) * inside
        hu += weight * (GGO_HU - hu) * (hu < GGO_HU)
        thickness = max(1, round(size / 256))
        for angle, length in lesion.spicules:
            end = (
                round(cx + length * radius_px * math.cos(angle)),
                round(cy + length * radius_px * math.sin(angle)),
            )
            cv2.line(core, (round(cx), round(cy)), end, 1, thickness)
    mask = (core > 0) & inside
    hu[mask] = 30.0 if lesion.label == ADENOCARCINOMA else SOFT_HU
    if lesion.cavity > 0 and radius_px * lesion.cavity >= 1.5:
        cavity = np.zeros_like(lung)
        cv2.circle(
            cavity,
            (round(cx + 0.1 * radius_px), round(cy - 0.1 * radius_px)),
            round(radius_px * lesion.cavity),
            1,
            -1,
        )
        hu[(cavity > 0) & mask] = -950.0
    return mask


def _finish(hu: np.ndarray, anat: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Blur a little (the scanner's point spread) and add noise, in place."""
    cv2.GaussianBlur(hu, (3, 3), 0.7, dst=hu)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(anat.noise_hu)
    return hu


def generate_slice(
    seed: SeedLike, label: str, size: int = 256, lesion_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial chest CT slice of class ``label``.

    Returns ``(hu, lesion_mask)``: float32 HU of shape (size, size) and a
    bool mask of the lesion (all False for ``Normal``). ``lesion_scale`` in
    (0, 1] shrinks the lesion, as a slice through its edge would. This is
    synthetic data, a stand-in for real labelled CT.
    """
    rng = as_generator(seed)
    anat = _sample_anatomy(rng)
    lesion = _sample_lesion(rng, label)
    z = rng.uniform(0.3, 0.7)
    hu, lung = _draw_anatomy(anat, size, z, rng)
    mask = np.zeros((size, size), dtype=bool)
    if lesion is not None:
        mask = _draw_lesion(hu, lung, anat, lesion, z, lesion_scale)
    return _finish(hu, anat, rng), mask


def generate_volume(
    seed: SeedLike,
    label: str,
    n_slices: int = 32,
    size: int = 256,
    lesion_half_extent: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic axial series: (hu (n, size, size) float32, lesion mask bool).

    One anatomy runs through all slices; the lesion (if any) is a rough sphere
    spanning ``2 * lesion_half_extent + 1`` contiguous slices around a random
    centre, so a series has lesion slices and normal slices, like a real
    scan. This is synthetic data, a stand-in for real labelled CT.
    """
    rng = as_generator(seed)
    anat = _sample_anatomy(rng)
    lesion = _sample_lesion(rng, label)
    hu = np.empty((n_slices, size, size), dtype=np.float32)
    mask = np.zeros((n_slices, size, size), dtype=bool)
    half = lesion_half_extent if lesion_half_extent is not None else int(rng.integers(2, 5))
    half = max(0, min(half, (n_slices - 1) // 2))
    centre = int(rng.integers(half, n_slices - half)) if n_slices > 0 else 0
    for i in range(n_slices):
        z = 0.15 + 0.7 * (i + 0.5) / n_slices
        slice_hu, lung = _draw_anatomy(anat, size, z, rng)
        dz = abs(i - centre)
        if lesion is not None and dz <= half:
            # A sphere's cross-section, never below ~0.66 of its widest.
            scale = math.sqrt(1.0 - (dz / (half + 1)) ** 2)
            mask[i] = _draw_lesion(slice_hu, lung, anat, lesion, z, scale)
        hu[i] = _finish(slice_hu, anat, rng)
    return hu, mask


def generate_dataset(
    seed: SeedLike,
    n_per_class: int,
    size: int = 256,
    min_lesion_scale: float = 0.6,
    labels: tuple[str, ...] = CLASS_LABELS,
) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled, balanced set of single slices: (hu (n, size, size), label index (n,)).

    Lesion scale is drawn from [min_lesion_scale, 1] so the set holds edge
    slices as well as central ones. Label indices refer to ``labels``.
    """
    rng = as_generator(seed)
    n = n_per_class * len(labels)
    order = rng.permutation(np.repeat(np.arange(len(labels)), n_per_class))
    hu = np.empty((n, size, size), dtype=np.float32)
    for i, index in enumerate(order):
        hu[i] = generate_slice(rng, labels[index], size, rng.uniform(min_lesion_scale, 1.0))[0]
    return hu, order.astype(np.int64)
