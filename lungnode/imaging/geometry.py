"""Slice geometry: where each slice of a stack lies, how far apart, and how evenly.

One function, ``slice_stack``, answers this for the whole node, so that the
parts that look at a series cannot disagree about it:

- ``dicom.decode`` sorts a series along the normal and records its spacing;
- ``series.assembler`` judges whether a receiving series is one even stack
  with no gap (completion rules 1 and 2);
- ``pipeline.series_job`` checks that the volume is axial, with the normal
  that decoding sorted it along.

Geometry follows PS3.3 C.7.6.2.1.1 (Image Plane Module): Image Orientation
(Patient) holds the row and column direction cosines of a slice; their cross
product is the slice normal; Image Position (Patient), the centre of the first
pixel, projected onto that normal is the slice's place in the stack.

It is pure numpy, below both ``dicom`` and ``series`` in the layers, so both
may import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ORIENTATION_TOLERANCE",
    "ORTHONORMAL_TOLERANCE",
    "SAME_POSITION_MM",
    "SPACING_TOLERANCE",
    "SliceStack",
    "slice_stack",
]

#: The one spacing tolerance, and the default of the ``series_spacing_tolerance``
#: setting (docs/configuration.md): the largest relative deviation of a step
#: between neighbouring slices from the median step for the stack to count as
#: even. At 0.1 a 1.25 mm stack is even while every step lies within
#: 1.125-1.375 mm; a step beyond that is a gap (a missing slice doubles it).
SPACING_TOLERANCE = 0.1

# The three allowances below are not tunable tolerances: they absorb the
# rounding of Decimal String values (at most 16 characters, PS3.5 6.2) that
# writers apply to positions and cosines.

#: Direction cosines of two slices that differ by no more than this are one orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Two slices closer than this along the normal (mm) share one position.
SAME_POSITION_MM = 1e-3
#: How far |row|, |column| may be from 1, and row . column from 0, before the
#: cosines are not orthonormal (PS3.3 C.7.6.2.1.1 requires unit vectors at right angles).
ORTHONORMAL_TOLERANCE = 0.01

#: Below this |row x column| the cosines are parallel or zero: there is no normal.
_DEGENERATE = 1e-6


@dataclass(frozen=True)
class SliceStack:
    """Where the slices lie along the normal of the first one, and whether evenly."""

    #: Input indices in stack order (ascending along the normal; stable for ties).
    #: The input order when a slice has no position or no normal exists.
    order: tuple[int, ...]
    #: Each slice's position along the normal (mm), in ``order``; None without geometry.
    positions_mm: tuple[float, ...] | None
    #: The unit normal of the first slice; None when a slice has no orientation.
    normal: tuple[float, float, float] | None
    #: The median step between neighbouring slices (mm); None below two located slices.
    spacing_mm: float | None
    #: One evenly spaced stack of parallel slices, no gap and no shared position.
    even: bool
    #: Why (not) even, in words for logs and for the completion decision.
    reason: str
    #: Every slice has the first slice's orientation (within ORIENTATION_TOLERANCE).
    orientations_agree: bool = True
    #: How many neighbouring pairs share one position (within SAME_POSITION_MM).
    shared_positions: int = 0


def slice_stack(
    positions: Sequence[Sequence[float] | None],
    orientations: Sequence[Sequence[float] | None],
    tolerance: float = SPACING_TOLERANCE,
) -> SliceStack:
    """Order, positions, spacing and evenness of a stack of slices (PS3.3 C.7.6.2.1.1).

    ``positions[i]`` is slice i's Image Position (Patient) (3 values) and
    ``orientations[i]`` its Image Orientation (Patient) (6 values), or None
    where the slice lacks one. All slices are projected onto the unit normal
    of the first slice, so a stack sorts (and a tilted or mixed one still
    sorts, best effort) the same way wherever this is called.

    The stack is even when every slice has a position and the first slice's
    orientation, the cosines are orthonormal, no two slices share a position,
    and every step lies within ``tolerance`` (relative) of the median step:
    ``spacing * (1 - tolerance) <= step <= spacing * (1 + tolerance)``. A
    single slice is even. ``tolerance`` is the one spacing tolerance of the
    node: ``SPACING_TOLERANCE``, or the ``series_spacing_tolerance`` setting.

    Raises:
        ValueError: ``positions`` and ``orientations`` differ in length, or
            ``tolerance`` is not between 0 and 1.
    """
    count = len(positions)
    if len(orientations) != count:
        raise ValueError(f"{count} positions but {len(orientations)} orientations")
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance must be between 0 and 1, got {tolerance}")
    as_given = tuple(range(count))
    if count == 0:
        return SliceStack(as_given, None, None, None, False, "no slices")
    cosines = _vectors(orientations, 6)
    if cosines is None:
        return _unlocated(as_given, None, "a slice has no orientation")
    row, column = cosines[0, :3], cosines[0, 3:]
    cross = np.cross(row, column)
    length = float(np.linalg.norm(cross))
    if length < _DEGENERATE:
        return _unlocated(as_given, None, "orientation cosines are parallel or zero")
    unit = cross / length
    normal = (float(unit[0]), float(unit[1]), float(unit[2]))
    agree = bool(np.abs(cosines - cosines[0]).max() <= ORIENTATION_TOLERANCE)
    points = _vectors(positions, 3)
    if points is None:
        return _unlocated(as_given, normal, "a slice has no position", agree)

    keys = points @ unit
    order = tuple(int(i) for i in np.argsort(keys, kind="stable"))
    located = keys[list(order)]
    steps = np.diff(located)
    shared = int(np.count_nonzero(steps < SAME_POSITION_MM))
    spacing = float(np.median(steps)) if count > 1 else None
    orthonormal = (
        abs(float(np.linalg.norm(row)) - 1.0) <= ORTHONORMAL_TOLERANCE
        and abs(float(np.linalg.norm(column)) - 1.0) <= ORTHONORMAL_TOLERANCE
        and abs(float(np.dot(row, column))) <= ORTHONORMAL_TOLERANCE
    )
    even, reason = _evenness(steps, spacing, tolerance, agree, orthonormal, shared)
    return SliceStack(
        order=order,
        positions_mm=tuple(float(k) for k in located),
        normal=normal,
        spacing_mm=spacing,
        even=even,
        reason=reason,
        orientations_agree=agree,
        shared_positions=shared,
    )


def _evenness(
    steps: np.ndarray,
    spacing: float | None,
    tolerance: float,
    agree: bool,
    orthonormal: bool,
    shared: int,
) -> tuple[bool, str]:
    if spacing is None:
        return True, "one slice"
    if not agree:
        return False, "slices differ in orientation"
    if not orthonormal:
        return False, "orientation cosines are not orthonormal"
    if shared:
        return False, f"{shared} pair(s) of slices share one position"
    for index, step in enumerate(steps.tolist()):
        if step > spacing * (1 + tolerance):
            return False, f"gap of {step:.2f} mm after slice {index + 1} (spacing {spacing:.2f} mm)"
        if step < spacing * (1 - tolerance):
            return False, f"uneven spacing: {step:.2f} mm vs {spacing:.2f} mm"
    return True, f"{len(steps) + 1} slices, {spacing:.2f} mm apart"


def _unlocated(
    as_given: tuple[int, ...],
    normal: tuple[float, float, float] | None,
    reason: str,
    agree: bool = True,
) -> SliceStack:
    """A stack whose slices cannot be placed: input order, no positions, not even.

    A single slice is still even (there is nothing to be uneven with).
    """
    single = len(as_given) == 1
    return SliceStack(
        as_given, None, normal, None, single, "one slice" if single else reason, agree
    )


def _vectors(values: Sequence[Sequence[float] | None], width: int) -> np.ndarray | None:
    """``values`` as a finite (n, width) float64 array; None if any is missing or malformed."""
    if any(v is None or len(v) != width for v in values):
        return None
    array = np.asarray(values, dtype=np.float64)
    return array if bool(np.isfinite(array).all()) else None
