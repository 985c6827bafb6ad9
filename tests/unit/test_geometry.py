"""imaging.geometry.slice_stack: the one slice-geometry function, as properties."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lungnode.config import Settings
from lungnode.imaging.geometry import SPACING_TOLERANCE, SliceStack, slice_stack
from lungnode.series.assembler import CompletionRules

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

angles = st.floats(min_value=-math.pi, max_value=math.pi, allow_nan=False)
spacings = st.floats(min_value=0.3, max_value=10.0)
starts = st.floats(min_value=-1000.0, max_value=1000.0)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """A rotation matrix; its columns are the row cosine, column cosine and normal."""
    cy, sy, cp, sp, cr, sr = (f(a) for a in (yaw, pitch, roll) for f in (math.cos, math.sin))
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return rz @ ry @ rx


def stack_along(
    frame: np.ndarray, offsets: list[float], shift: tuple[float, float] = (0.0, 0.0)
) -> tuple[list[tuple[float, ...]], list[tuple[float, ...]]]:
    """Positions ``offsets`` along ``frame``'s normal, each moved in-plane by ``shift``."""
    row, column, normal = frame[:, 0], frame[:, 1], frame[:, 2]
    in_plane = shift[0] * row + shift[1] * column
    positions = [tuple(float(v) for v in in_plane + d * normal) for d in offsets]
    orientation = tuple(float(v) for v in (*row, *column))
    return positions, [orientation] * len(offsets)


def shuffled(
    positions: list[tuple[float, ...]], orientations: list[tuple[float, ...]], seed: int
) -> tuple[list[tuple[float, ...]], list[tuple[float, ...]]]:
    pairs = list(zip(positions, orientations, strict=True))
    random.Random(seed).shuffle(pairs)
    return [p for p, _ in pairs], [o for _, o in pairs]


@given(
    n=st.integers(min_value=2, max_value=300),
    spacing=spacings,
    start=starts,
    yaw=angles,
    pitch=angles,
    roll=angles,
    shift=st.tuples(st.floats(-200, 200), st.floats(-200, 200)),
    seed=seeds,
)
def test_an_even_stack_in_any_orientation_and_order(
    n: int,
    spacing: float,
    start: float,
    yaw: float,
    pitch: float,
    roll: float,
    shift: tuple[float, float],
    seed: int,
) -> None:
    frame = rotation(yaw, pitch, roll)
    positions, orientations = stack_along(frame, [start + k * spacing for k in range(n)], shift)
    positions, orientations = shuffled(positions, orientations, seed)
    stack = slice_stack(positions, orientations)
    assert stack.even, stack.reason
    assert stack.spacing_mm == pytest.approx(spacing, rel=1e-6)
    assert np.allclose(stack.normal, frame[:, 2], atol=1e-9)
    assert sorted(stack.order) == list(range(n))
    assert stack.positions_mm is not None
    assert list(stack.positions_mm) == sorted(stack.positions_mm)
    # positions_mm is each input position, projected, in stack order.
    projected = [float(np.dot(positions[i], frame[:, 2])) for i in stack.order]
    assert np.allclose(stack.positions_mm, projected)


@given(
    n=st.integers(min_value=2, max_value=60),
    spacing=spacings,
    jitter=st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=60, max_size=60),
    seed=seeds,
)
def test_arrival_order_changes_nothing(
    n: int, spacing: float, jitter: list[float], seed: int
) -> None:
    offsets = [k * spacing + 0.3 * spacing * jitter[k] for k in range(n)]
    positions, orientations = stack_along(np.eye(3), offsets)
    first = slice_stack(positions, orientations)
    again = slice_stack(*shuffled(positions, orientations, seed))
    assert again.positions_mm == pytest.approx(first.positions_mm)
    assert again.spacing_mm == pytest.approx(first.spacing_mm)
    assert again.normal == first.normal and again.even == first.even


@given(n=st.integers(min_value=4, max_value=300), spacing=spacings, data=st.data())
def test_any_missing_inner_slice_is_a_gap(n: int, spacing: float, data: st.DataObject) -> None:
    missing = data.draw(st.integers(min_value=1, max_value=n - 2))
    offsets = [k * spacing for k in range(n) if k != missing]
    stack = slice_stack(*stack_along(np.eye(3), offsets))
    assert not stack.even
    assert "gap" in stack.reason or "uneven" in stack.reason


@given(
    n=st.integers(min_value=3, max_value=200),
    spacing=spacings,
    tolerance=st.floats(min_value=0.02, max_value=0.5),
    jitter=st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=200, max_size=200),
)
def test_jitter_well_inside_the_tolerance_is_even(
    n: int, spacing: float, tolerance: float, jitter: list[float]
) -> None:
    # Each step within tolerance/3 of the spacing: every step is then within the
    # tolerance of the median step, whatever the median turns out to be.
    steps = [spacing * (1 + tolerance / 3 * jitter[k]) for k in range(n - 1)]
    offsets = [0.0, *np.cumsum(steps).tolist()]
    stack = slice_stack(*stack_along(np.eye(3), offsets), tolerance)
    assert stack.even, stack.reason


@given(
    n=st.integers(min_value=5, max_value=200),
    spacing=spacings,
    tolerance=st.floats(min_value=0.02, max_value=0.5),
    excess=st.floats(min_value=0.01, max_value=1.0),
    data=st.data(),
)
def test_one_step_beyond_the_tolerance_is_a_gap(
    n: int, spacing: float, tolerance: float, excess: float, data: st.DataObject
) -> None:
    at = data.draw(st.integers(min_value=0, max_value=n - 2))
    steps = [spacing] * (n - 1)
    steps[at] = spacing * (1 + tolerance) * (1 + excess)
    offsets = [0.0, *np.cumsum(steps).tolist()]
    stack = slice_stack(*stack_along(np.eye(3), offsets), tolerance)
    assert not stack.even and f"after slice {at + 1}" in stack.reason
    assert stack.spacing_mm == pytest.approx(spacing)


@given(n=st.integers(min_value=2, max_value=50), spacing=spacings, scale=st.floats(0.5, 2.0))
def test_positions_use_the_unit_normal(n: int, spacing: float, scale: float) -> None:
    """Cosines of the wrong length place slices as unit ones do; the stack is not even."""
    positions, _ = stack_along(np.eye(3), [k * spacing for k in range(n)])
    scaled = [tuple(scale * v for v in AXIAL)] * n
    stack = slice_stack(positions, scaled)
    assert stack.normal == pytest.approx((0.0, 0.0, 1.0))
    assert stack.spacing_mm == pytest.approx(spacing)
    if abs(scale - 1.0) > 0.01:
        assert not stack.even and "orthonormal" in stack.reason


def test_shared_positions_and_mixed_orientations() -> None:
    positions, orientations = stack_along(np.eye(3), [0.0, 1.0, 1.0, 2.0])
    shared = slice_stack(positions, orientations)
    assert not shared.even and shared.shared_positions == 1 and "share" in shared.reason
    mixed = slice_stack(positions[:2] + [(0.0, 0.0, 5.0)], [*orientations[:2], (0, 1, 0, 0, 0, -1)])
    assert not mixed.even and not mixed.orientations_agree and "orientation" in mixed.reason


def test_missing_geometry_keeps_the_input_order() -> None:
    positions, orientations = stack_along(np.eye(3), [2.0, 0.0, 1.0])
    no_position = slice_stack([positions[0], None, positions[2]], orientations)
    assert no_position == SliceStack(
        (0, 1, 2), None, (0.0, 0.0, 1.0), None, False, "a slice has no position"
    )
    no_orientation = slice_stack(positions, [None, *orientations[1:]])
    assert no_orientation.normal is None and not no_orientation.even
    degenerate = slice_stack(positions, [(1, 0, 0, 1, 0, 0)] * 3)
    assert degenerate.normal is None and "parallel" in degenerate.reason
    assert slice_stack([], []).reason == "no slices"
    assert slice_stack([None], [None]).even  # one slice is a stack


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="orientations"):
        slice_stack([(0.0, 0.0, 0.0)], [])
    with pytest.raises(ValueError, match="tolerance"):
        slice_stack([], [], tolerance=1.5)


def test_the_one_tolerance_is_the_settings_default() -> None:
    assert Settings.model_fields["series_spacing_tolerance"].default == SPACING_TOLERANCE
    assert CompletionRules().spacing_tolerance == SPACING_TOLERANCE
