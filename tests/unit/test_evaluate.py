"""``lungnode evaluate`` and the measures behind it (AUC with NumPy, no scikit-learn)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungnode import cli
from lungnode.domain import CLASS_LABELS
from lungnode.imaging.windowing import window_to_uint8
from lungnode.ml import phantoms
from lungnode.ml.evaluation import confusion_matrix, roc_auc, roc_curve

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"

#: Folder names as in the public chest CT-scan images set, mapped by ml.train.folder_label.
FOLDERS = {
    "Adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib",
    "Large Cell Carcinoma": "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
    "Normal": "normal",
    "Squamous Cell Carcinoma": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa",
}


def test_auc_matches_hand_counts() -> None:
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right.
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    # A tie between a positive and a negative counts half: (1 + 0.5) / 2.
    assert roc_auc(np.array([0.2, 0.5, 0.5]), np.array([0, 0, 1], bool)) == 0.75
    assert roc_auc(np.array([0.9, 0.1]), np.array([1, 0], bool)) == 1.0
    assert roc_auc(np.array([0.9, 0.1]), np.array([0, 1], bool)) == 0.0
    assert math.isnan(roc_auc(np.array([0.3, 0.4]), np.array([1, 1], bool)))


def test_roc_curve_runs_corner_to_corner_and_its_area_is_the_auc() -> None:
    rng = np.random.default_rng(3)
    positive = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + positive * 0.4, 2)  # rounding makes ties
    fpr, tpr = roc_curve(scores, positive)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert trapezoid == pytest.approx(roc_auc(scores, positive), abs=1e-12)


def test_confusion_matrix_rows_are_truth() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])


@pytest.fixture
def picture_set(tmp_path: Path) -> Path:
    """Five lung-window PNG phantoms per class, in the public set's folder names."""
    rng = np.random.default_rng(2024)
    root = tmp_path / "data"
    for label in CLASS_LABELS:
        folder = root / FOLDERS[label]
        folder.mkdir(parents=True)
        for k in range(5):
            hu, _ = phantoms.generate_slice(rng, label, 256, rng.uniform(0.8, 1.0))
            assert cv2.imwrite(str(folder / f"{k}.png"), window_to_uint8(hu, "lung"))
    return root


def test_evaluate_prints_measures_and_writes_the_plot(
    picture_set: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in [k for k in os.environ if k.startswith("LUNGNODE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LUNGNODE_STORAGE_DIR", str(tmp_path / "storage"))
    monkeypatch.setenv("LUNGNODE_MODELS_DIR", str(MODELS_DIR))
    monkeypatch.setenv("LUNGNODE_ENV", "testing")
    plot = tmp_path / "eval.png"

    assert cli.main(["evaluate", "--data", str(picture_set), "--plot", str(plot), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    matrix = np.array(answer["confusion_matrix"])
    assert answer["images"] == 20 and matrix.sum() == 20
    assert matrix.sum(axis=1).tolist() == [5, 5, 5, 5]  # rows are the true classes
    assert answer["accuracy"] == pytest.approx(np.trace(matrix) / 20)
    assert answer["accuracy"] >= 0.75  # the demo model knows its own phantoms, even as PNG
    assert set(answer["roc_auc"]) == set(CLASS_LABELS)
    assert all(0.0 <= auc <= 1.0 for auc in answer["roc_auc"].values())

    image = cv2.imread(str(plot))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 600
    assert (image.std(axis=2) > 30).any()  # coloured ROC curves were drawn

    assert cli.main(["evaluate", "--data", str(picture_set), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy (highest score): {answer['accuracy']:.4f}" in out
    assert "confusion matrix" in out and "ROC AUC" in out
    for label in CLASS_LABELS:
        assert label in out

    (picture_set / "emphysema").mkdir()
    cv2.imwrite(str(picture_set / "emphysema" / "0.png"), np.zeros((64, 64), np.uint8))
    assert cli.main(["evaluate", "--data", str(picture_set)]) == 2
    assert "emphysema" in capsys.readouterr().err
