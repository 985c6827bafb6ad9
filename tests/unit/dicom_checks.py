"""Checks shared by the writer tests: dciodvfy, a strict round trip, sample results."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from lungnode.domain import (
    CLASS_LABELS,
    INDETERMINATE,
    AnalysisResult,
    HUVolume,
    ModelIdentity,
    SliceRef,
)
from tests.conftest import require_tool
from tests.support.models import DEMO_MODEL as DEMO_MODEL

REAL_MODEL = ModelIdentity(name="site-cnn", version="3.1", sha256="f" * 64)


def require(tool: str) -> str:
    """Path of ``tool``; missing fails under CI=true and skips elsewhere."""
    return require_tool(tool)


def dciodvfy(ds: Dataset, directory: Path) -> tuple[list[str], list[str]]:
    """Write ``ds`` as a file, run dciodvfy on it; return (errors, warnings).

    The warnings are printed so that they show in the test output.
    """
    tool = require("dciodvfy")
    path = directory / f"{ds.SOPInstanceUID}.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    for line in warnings:
        print(f"dciodvfy {ds.SOPClassUID.name}: {line}")
    return errors, warnings


@pytest.fixture
def strict_reading() -> Iterator[None]:
    """pydicom raises on any invalid value it reads, for the test's duration."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode = saved


def round_trip(ds: Dataset) -> Dataset:
    """Write ``ds`` to bytes in the File Format and read it back, loading every element."""
    with DicomBytesIO() as buffer:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        data = buffer.getvalue()
    back = pydicom.dcmread(DicomBytesIO(data))
    for element in back.iterall():  # values are decoded (and validated) lazily
        _ = element.value
    return back


def blob_heatmap(rows: int, columns: int, centre: tuple[float, float]) -> np.ndarray:
    """A Gaussian blob in [0, 1], as Grad-CAM would give for a focal finding."""
    v, u = np.mgrid[:rows, :columns].astype(np.float32)
    cy, cx = centre[0] * rows, centre[1] * columns
    heat = np.exp(-((v - cy) ** 2 + (u - cx) ** 2) / (2 * (0.08 * rows) ** 2))
    result: np.ndarray = heat.astype(np.float32)
    return result


def make_result(
    series: list[Dataset],
    *,
    key_slices: tuple[int, ...] = (2, 1),
    verdict: str = "Adenocarcinoma",
    model: ModelIdentity = DEMO_MODEL,
    enhanced: bool = False,
) -> tuple[AnalysisResult, HUVolume]:
    """An analysed result for a synthetic series, with its volume, no model needed."""
    n = len(series) if not enhanced else int(series[0].NumberOfFrames)
    rows, columns = int(series[0].Rows), int(series[0].Columns)
    if enhanced:
        slices = [SliceRef(series[0].SOPInstanceUID, frame_number=k + 1) for k in range(n)]
    else:
        slices = [SliceRef(ds.SOPInstanceUID) for ds in series]
    hu = np.full((n, rows, columns), -860.0, dtype=np.float32)
    volume = HUVolume(hu=hu, slices=slices)
    scores = {"Adenocarcinoma": 0.05, "Large Cell Carcinoma": 0.07, "Normal": 0.08}
    scores["Squamous Cell Carcinoma"] = 0.06
    if verdict == INDETERMINATE:  # CT_small.dcm's pattern: no class over 0.8
        scores = {"Adenocarcinoma": 0.749, "Large Cell Carcinoma": 0.166, "Normal": 0.023}
        scores["Squamous Cell Carcinoma"] = 0.062
    else:
        scores[verdict] = 0.0
        scores[verdict] = round(1.0 - sum(scores.values()), 6)
    slice_scores = np.tile(
        np.array([scores[label] for label in CLASS_LABELS], dtype=np.float32), (n, 1)
    )
    result = AnalysisResult(
        verdict=verdict,
        confidence=scores.get(verdict),
        class_scores=scores,
        slice_scores=slice_scores,
        key_slices=list(key_slices),
        key_slice_refs=[slices[k] for k in key_slices],
        model=model,
        heatmaps=[
            blob_heatmap(rows, columns, (0.4, 0.3 + 0.1 * i)) for i in range(len(key_slices))
        ],
        timings_s={"decode": 0.21, "inference": 0.84, "gradcam": 0.15},
        lesion_slices=list(range(n)) if verdict not in ("Normal", INDETERMINATE) else [],
        rule={
            "rule": "lesion_slices",
            "normal_label": "Normal",
            "threshold": 0.8,
            "min_slices": 3,
            "min_slices_applied": min(3, n),
            "top_n": 4,
        },
    )
    return result, volume
