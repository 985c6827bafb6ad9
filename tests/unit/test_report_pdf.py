"""The PDF report: what it says, on every page, read back with poppler."""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset

from lungnode.domain import AnalysisResult
from lungnode.report.pdf import KeyImage, ReportInput, StudyFacts, build_report
from tests.support.synthetic import make_ct_series
from tests.unit.dicom_checks import DEMO_MODEL, REAL_MODEL, make_result, require

WHEN = _dt.datetime(2025, 3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return make_ct_series(4, rows=16, columns=16, patient_name="Doe^Jane", patient_id="PID42")


def _pages(pdf: bytes, tmp_path: Path) -> list[str]:
    """The text of each page, as pdftotext extracts it (pages end with a form feed)."""
    tool = require("pdftotext")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(
        [tool, "-layout", str(path), "-"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    pages = text.split("\f")
    return [" ".join(page.split()) for page in pages if page.strip()]


def _picture(label: str) -> np.ndarray:
    picture = np.zeros((300, 300, 3), dtype=np.uint8)
    picture[100:200, 100:200] = (255, 0, 0)
    cv2.putText(picture, label, (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
    return picture


def test_analysed_report_says_what_was_found(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series)
    facts = StudyFacts.from_dataset(series[0])
    pdf = build_report(ReportInput(result, facts, created=WHEN))
    text = " ".join(_pages(pdf, tmp_path))
    assert f"Verdict: Adenocarcinoma (confidence {result.confidence:.3f})" in text
    assert f"Verdict: {result.verdict_text()}" in text
    assert "reached the lesion threshold" in result.explanation()
    assert result.explanation() in text
    for label in result.labels:  # the bar chart's categories
        assert label in text
    assert "Doe Jane" in text and "PID42" in text
    assert "2025-03-04 05:06:07" in text
    assert "Trained on synthetic phantoms" in text and "not for diagnostic use" in text
    assert f"{DEMO_MODEL.name} {DEMO_MODEL.version}" in text
    assert DEMO_MODEL.sha256 in text
    assert "inference" in text and "0.840 s" in text and "1.200 s" in text  # timing + total


def test_watermark_on_every_page(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series)
    images = [KeyImage(_picture(f"slice {i}"), f"Key slice {i + 1}") for i in range(9)]
    pdf = build_report(ReportInput(result, key_images=images, created=WHEN))
    pages = _pages(pdf, tmp_path)
    assert len(pages) >= 2
    for number, page in enumerate(pages, start=1):
        assert "For Research Use Only" in page, f"page {number}"


def test_not_analysed_report_says_why(series: list[Dataset], tmp_path: Path) -> None:
    result = AnalysisResult.not_analysed("the series has only 4 slices", DEMO_MODEL)
    pdf = build_report(ReportInput(result, StudyFacts.from_dataset(series[0])))
    text = " ".join(_pages(pdf, tmp_path))
    assert "Not analysed" in text
    assert "not analysed, because the series has only 4 slices" in text
    assert "Verdict" not in text
    assert "For Research Use Only" in text


def test_real_model_has_no_synthetic_notice(series: list[Dataset], tmp_path: Path) -> None:
    result, _ = make_result(series, model=REAL_MODEL)
    text = " ".join(_pages(build_report(ReportInput(result)), tmp_path))
    assert "synthetic" not in text.lower()
    assert "Patient and study" not in text  # no facts given, no empty table


def test_first_page_renders_with_heatmaps(series: list[Dataset], tmp_path: Path) -> None:
    tool = require("pdftoppm")
    result, _ = make_result(series)
    ok, png = cv2.imencode(".png", _picture("png"))
    assert ok
    images = [KeyImage(png.tobytes(), "from PNG"), KeyImage(_picture("rgb"), "from RGB")]
    (tmp_path / "r.pdf").write_bytes(build_report(ReportInput(result, key_images=images)))
    subprocess.run(
        [tool, "-r", "40", "-png", "-f", "1", "-l", "1", "-singlefile", "r.pdf", "page"],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    page = cv2.imread(str(tmp_path / "page.png"))
    assert page is not None and page.shape[0] > page.shape[1]
    assert float(page.std()) > 5.0  # not blank
    # Images are binary streams: ASCII85 cost a third of a second per report. The
    # picture given as an array is embedded as JPEG (DCTDecode), not deflated here.
    pdf = (tmp_path / "r.pdf").read_bytes()
    assert b"/ASCII85Decode" not in pdf
    assert b"/DCTDecode" in pdf


def test_bad_key_images_raise(series: list[Dataset]) -> None:
    result, _ = make_result(series)
    for picture in (
        b"GIF89a",
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4, 4), np.uint8),
    ):
        with pytest.raises(ValueError):
            build_report(ReportInput(result, key_images=[KeyImage(picture)]))


def test_not_analysed_without_reason_raises() -> None:
    result = AnalysisResult.not_analysed("", DEMO_MODEL)
    with pytest.raises(ValueError, match="not_analysed_reason"):
        build_report(ReportInput(result))


def test_study_facts_tolerate_missing_attributes() -> None:
    facts = StudyFacts.from_dataset(Dataset())
    assert facts == StudyFacts()
