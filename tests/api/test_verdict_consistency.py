"""The API, the CLI, the SR, the PDF and the SC images say the same verdict and confidence.

pydicom's CT_small.dcm scores Adenocarcinoma 0.75 (under the 0.8 threshold)
and Normal 0.02 with the demo model. Every output used to call that "Normal,
confidence 0.023"; now every output says Indeterminate and names the highest
score. A one-slice phantom with a large cell lesion checks a class verdict,
whose confidence must be the same number everywhere.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungnode import cli
from lungnode.dicom.writers.sc import banner_text, write_sc_images
from lungnode.dicom.writers.sr import class_code, write_sr
from lungnode.ml import phantoms
from lungnode.ml.bundle import load_bundle
from lungnode.pipeline.analyze import analyze_path
from lungnode.report.pdf import ReportInput, StudyFacts, build_report
from tests.api.conftest import API, upload_form
from tests.conftest import require_tool
from tests.support.synthetic import make_ct_series, write_series
from tests.unit.dicom_checks import dciodvfy

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DEMO = MODELS_DIR / "lung-ct-demo"


def _ct_small(_: Path) -> Path:
    return Path(str(get_testdata_file("CT_small.dcm")))


def _large_cell_slice(directory: Path) -> Path:
    hu, _ = phantoms.generate_slice(11, phantoms.LARGE_CELL, 256)
    (path,) = write_series(
        make_ct_series(1, rows=256, columns=256, slice_hu=lambda _: hu), directory / "lcc"
    )
    return path


def _pdf_text(pdf: bytes, directory: Path) -> str:
    path = directory / "text.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(
        [require_tool("pdftotext"), str(path), "-"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return " ".join(text.split())


def _items(group: Dataset, code_value: str) -> list[Dataset]:
    return [
        i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _verdict_group(sr: Dataset) -> Dataset:
    measurements = next(
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    return measurements.ContentSequence[0]


@pytest.mark.parametrize(
    ("make_input", "expected"),
    [(_ct_small, "Indeterminate"), (_large_cell_slice, "Large Cell Carcinoma")],
    ids=["CT_small", "large-cell-phantom"],
)
def test_every_output_says_the_same_verdict(
    make_api: Callable[..., API],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_input: Callable[[Path], Path],
    expected: str,
) -> None:
    source_path = make_input(tmp_path)

    # The API: the answer, then its PDF report.
    api = make_api(model=str(DEMO))
    headers = api.headers("radiologist")
    response = api.client.post(
        "/api/v1/predict",
        data=upload_form(source_path.read_bytes(), filename="slice.dcm"),
        headers=headers,
        content_type="multipart/form-data",
    )
    assert response.status_code == 201, response.json
    body = response.json
    assert body["prediction"] == expected
    scores: dict[str, float] = body["confidence_scores"]
    if expected == "Indeterminate":
        assert body["confidence"] is None
        top = max(scores, key=scores.__getitem__)
        said = (
            f"Indeterminate (no class reached its threshold; highest score {top} {scores[top]:.3f})"
        )
    else:
        assert body["confidence"] == pytest.approx(scores[expected]) and body["confidence"] >= 0.8
        said = f"{expected} (confidence {body['confidence']:.3f})"
    with api.client.get(body["report_url"], headers=headers) as download:
        assert download.status_code == 200
        assert f"Verdict: {said}" in _pdf_text(download.data, tmp_path)

    # The CLI: the summary and its PDF report.
    for name in [k for k in os.environ if k.startswith("LUNGNODE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LUNGNODE_STORAGE_DIR", str(tmp_path / "cli-storage"))
    monkeypatch.setenv("LUNGNODE_MODELS_DIR", str(MODELS_DIR))
    monkeypatch.setenv("LUNGNODE_ENV", "testing")
    cli_report = tmp_path / "cli.pdf"
    assert cli.main(["predict", str(source_path), "--report", str(cli_report)]) == 0
    assert f"Verdict: {said}\n" in capsys.readouterr().out
    assert f"Verdict: {said}" in _pdf_text(cli_report.read_bytes(), tmp_path)

    # The objects a series job sends to the PACS: SR, SC images and the PDF.
    analysis = analyze_path(source_path, load_bundle(DEMO))
    result = analysis.result
    assert result.verdict_text() == said
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    sr = write_sr(source, result, analysis_version=1)
    errors, _ = dciodvfy(sr, tmp_path)
    assert errors == []
    group = _verdict_group(sr)
    impression = _items(group, "121073")[0].ConceptCodeSequence[0]
    certainty = _items(group, "111012")
    if expected == "Indeterminate":
        assert impression.CodeValue == codes.SCT.Indeterminate.value
        assert certainty == []
        assert _items(group, "121106")[0].TextValue.startswith(f"{said}. ")
    else:
        assert impression.CodeValue == class_code(expected).value
        value = float(certainty[0].MeasuredValueSequence[0].NumericValue)
        assert value == pytest.approx(100 * body["confidence"], abs=1e-3)
    images = write_sc_images(source, result, analysis.volume, analysis_version=1)
    assert images and all(f"Verdict: {said}" in sc.ImageComments for sc in images)
    burned: list[Any] = banner_text(result.verdict_text(), None, result.model)
    assert (f"Verdict: {said}", (255, 255, 255)) in burned
    pdf = build_report(ReportInput(result, StudyFacts.from_dataset(source)))
    assert f"Verdict: {said}" in _pdf_text(pdf, tmp_path)
