"""The three places that look at slice geometry agree on the same borderline stacks.

``dicom.decode`` (order, spacing, normal), ``series.assembler`` (one even stack,
no gap?) and ``pipeline.series_job.check_analysable`` (axial?) all go through
``imaging.geometry.slice_stack``. Each stack is written as DICOM files and read
as the node reads it: intake's parse feeds the assembler, ``load_series`` the
job. Before they shared one function they disagreed here: the assembler took
the upper median step and decoding the mean of the two middle ones, and the
job looked for the orientation only at the top level and in the shared
functional groups.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from lungnode.config import Settings
from lungnode.dicom.decode import load_series
from lungnode.dicom.intake import parse_instance
from lungnode.pipeline.series_job import NotAnalysable, check_analysable
from lungnode.series.assembler import InstanceGeometry, StackCheck, check_stack
from tests.support.synthetic import make_ct_series, write_series

SPACING = 1.25
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
TOLERANCE = Settings.model_fields["series_spacing_tolerance"].default


@dataclass(frozen=True)
class Case:
    #: Offsets of the slices along the normal (mm), in stack order.
    offsets: list[float]
    #: Tilt of the slices about the patient's x axis (degrees; 0 is axial).
    tilt: float
    even: bool
    axial: bool
    #: The median step the assembler and decoding must both report.
    spacing: float


def _steps(*steps: float) -> list[float]:
    offsets = [0.0]
    for step in steps:
        offsets.append(round(offsets[-1] + step, 4))
    return offsets


UNDER = SPACING * (1 + TOLERANCE - 0.01)
OVER = SPACING * (1 + TOLERANCE + 0.01)
CASES = {
    "even": Case(_steps(*[SPACING] * 7), tilt=0.0, even=True, axial=True, spacing=SPACING),
    "one gap": Case(
        _steps(SPACING, SPACING, 2 * SPACING, SPACING, SPACING),
        tilt=0.0, even=False, axial=True, spacing=SPACING,
    ),
    "jitter just under": Case(
        _steps(SPACING, SPACING, UNDER, SPACING, SPACING),
        tilt=0.0, even=True, axial=True, spacing=SPACING,
    ),
    "jitter just over": Case(
        _steps(SPACING, SPACING, OVER, SPACING, SPACING),
        tilt=0.0, even=False, axial=True, spacing=SPACING,
    ),
    # Positions written to 0.1 mm: steps of 1.2 and 1.3 mm, an even number of them.
    "rounded to 0.1 mm": Case(
        [0.0, 1.2, 2.5, 3.8, 5.0], tilt=0.0, even=True, axial=True, spacing=1.25
    ),
    "tilted 20 degrees": Case(
        _steps(*[SPACING] * 5), tilt=20.0, even=True, axial=True, spacing=SPACING
    ),
    "tilted 30 degrees": Case(
        _steps(*[SPACING] * 5), tilt=30.0, even=True, axial=False, spacing=SPACING
    ),
}  # fmt: skip


def _cosines(tilt_degrees: float) -> list[float]:
    """Row along x, column tilted about x: the normal is (0, sin t, cos t)."""
    t = math.radians(tilt_degrees)
    return [1.0, 0.0, 0.0, 0.0, round(math.cos(t), 6), round(-math.sin(t), 6)]


def _write(case: Case, directory: Path) -> list[Path]:
    cosines = _cosines(case.tilt)
    t = math.radians(case.tilt)
    datasets = make_ct_series(len(case.offsets), rows=16, columns=16)
    for ds, d in zip(datasets, case.offsets, strict=True):
        ds.ImageOrientationPatient = cosines
        ds.ImagePositionPatient = [-5.0, round(d * math.sin(t), 4), round(d * math.cos(t), 4)]
    paths = write_series(datasets, directory)
    random.Random(7).shuffle(paths)  # arrival order is not stack order
    return paths


def _assembler(paths: list[Path]) -> StackCheck:
    """The completion rules' view: the facts intake keeps of each received file."""
    instances = []
    for path in paths:
        _, facts = parse_instance(path.read_bytes())
        instances.append(
            InstanceGeometry(
                tuple(facts.position) if facts.position else None,  # type: ignore[arg-type]
                tuple(facts.orientation) if facts.orientation else None,  # type: ignore[arg-type]
                facts.number_of_frames,
            )
        )
    return check_stack(instances, TOLERANCE)


def _is_axial(paths: list[Path]) -> bool:
    try:
        check_analysable(load_series(paths), min_slices=1)
    except NotAnalysable as exc:
        assert "not axial" in str(exc)
        return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_decode_assembler_and_job_agree(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    paths = _write(case, tmp_path)
    check = _assembler(paths)
    volume = load_series(paths)
    assert check.even is case.even, check.reason
    assert check.spacing_mm == pytest.approx(case.spacing, abs=1e-3)
    assert volume.slice_spacing_mm == pytest.approx(check.spacing_mm, rel=1e-12)
    positions = [ref.position_mm for ref in volume.slices]
    assert positions == pytest.approx(case.offsets, abs=1e-3)
    assert _is_axial(paths) is case.axial


def test_per_frame_orientation_of_an_enhanced_ct_is_seen(tmp_path: Path) -> None:
    """An Enhanced CT may put Plane Orientation in each frame's functional group
    (PS3.3 C.7.6.16.2.4); a sagittal one is then still not axial."""
    (ds,) = make_ct_series(4, rows=16, columns=16, enhanced=True)
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        orientation = Dataset()
        orientation.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
        item.PlaneOrientationSequence = DicomSequence([orientation])
        item.PlanePositionSequence[0].ImagePositionPatient = [k * SPACING, -5.0, 5.0]
    paths = write_series([ds], tmp_path)
    volume = load_series(paths)
    assert volume.slice_spacing_mm == pytest.approx(SPACING)
    assert volume.slice_normal == pytest.approx((-1.0, 0.0, 0.0))
    assert _assembler(paths).even  # one multi-frame instance: frame geometry not at intake
    assert not _is_axial(paths)
