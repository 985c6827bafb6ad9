"""Fixtures for unit tests: synthetic HU slices and dciodvfy."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.conftest import require_tool
from tests.support.synthetic import chest_phantom_hu

PhantomFactory = Callable[[int, int, int], Callable[[int], np.ndarray]]


def _integer_phantom(n_slices: int, rows: int, columns: int) -> Callable[[int], np.ndarray]:
    def slice_hu(index: int) -> np.ndarray:
        hu: np.ndarray = np.rint(chest_phantom_hu(index, n_slices, rows, columns))
        return hu.astype(np.float32)

    return slice_hu


@pytest.fixture
def integer_phantom() -> PhantomFactory:
    """``(n_slices, rows, columns) -> slice_hu``: phantom slices in whole HU.

    Whole HU survive the HU -> stored -> HU round trip exactly, so a lossless
    codec must give them back bit for bit.
    """
    return _integer_phantom


@pytest.fixture
def dciodvfy(tmp_path: Path) -> Callable[[Path], list[str]]:
    """Run dciodvfy on a file and return its ``Error`` lines.

    dciodvfy cannot read the deflated transfer syntax, so a deflated file is
    first inflated with DCMTK's dcmconv; the data set is the same.
    """
    require_tool("dciodvfy")

    def run(path: Path) -> list[str]:
        if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
            DeflatedExplicitVRLittleEndian
        ):
            require_tool("dcmconv")
            inflated = tmp_path / f"inflated-{path.name}"
            subprocess.run(["dcmconv", "+te", str(path), str(inflated)], check=True)
            path = inflated
        result = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False, timeout=60
        )
        output = result.stdout + result.stderr
        return [line for line in output.splitlines() if line.startswith("Error")]

    return run
