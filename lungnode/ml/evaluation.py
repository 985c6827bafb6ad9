"""Measure a bundle on a labelled folder: accuracy, confusion matrix, one-vs-rest ROC AUC.

The folder is laid out as for ``lungnode train --data`` (one folder per class,
names mapped by ``ml.train.folder_label``). Every image is scored as one
slice; the predicted class is the highest score (argmax). The accuracy under
the bundle's series rule, as ``lungnode predict`` gives a verdict for one
image, is reported beside it, because the rule's threshold turns an image
that no class scores confidently into Indeterminate, which counts as a miss.

ROC AUC is computed here with NumPy (the Mann-Whitney U statistic, ties
counted half) so the node does not depend on scikit-learn. The plot is drawn
with OpenCV, which the node already needs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungnode.domain import INDETERMINATE
from lungnode.imaging.windowing import build_model_input
from lungnode.ml.bundle import ModelBundle
from lungnode.ml.inference import aggregate
from lungnode.ml.train import read_image_hu, scan_class_folders

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Scores and labels of a labelled image set, and the measures derived from them."""

    labels: tuple[str, ...]
    #: Softmax scores (images, classes) in ``labels`` order.
    scores: np.ndarray
    #: True class index of each image.
    truth: np.ndarray
    #: Class index the series rule gives each image on its own; -1 for Indeterminate.
    rule_verdicts: np.ndarray
    files: list[Path]

    @property
    def predicted(self) -> np.ndarray:
        return np.asarray(self.scores.argmax(axis=1))

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.truth).mean()) if self.truth.size else 0.0

    @property
    def rule_accuracy(self) -> float:
        return float((self.rule_verdicts == self.truth).mean()) if self.truth.size else 0.0

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.truth, self.predicted, len(self.labels))

    def auc(self) -> dict[str, float]:
        """One-vs-rest ROC AUC per label; NaN where the set lacks positives or negatives."""
        return {
            label: roc_auc(self.scores[:, i], self.truth == i)
            for i, label in enumerate(self.labels)
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "images": int(self.truth.size),
            "labels": list(self.labels),
            "accuracy": self.accuracy,
            "rule_accuracy": self.rule_accuracy,
            "confusion_matrix": self.confusion.tolist(),
            "roc_auc": {k: (None if np.isnan(v) else v) for k, v in self.auc().items()},
        }


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (n, n): row = true class, column = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties half).

    Computed from average ranks (Mann-Whitney U), exact for any ties. NaN when
    there are no positives or no negatives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    # Average rank (1-based) over each run of tied scores.
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
    ends = np.r_[starts[1:], scores.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate), from (0, 0) to (1, 1), one point per threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    hits = positive[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores[order]) != 0), scores.size - 1]
    tp = np.cumsum(hits)[distinct]
    fp = (distinct + 1) - tp
    tpr = np.r_[0.0, tp / max(1, int(positive.sum()))]
    fpr = np.r_[0.0, fp / max(1, int((~positive).sum()))]
    return fpr, tpr


def evaluate_folder(data_dir: Path, bundle: ModelBundle, batch_size: int = 32) -> Evaluation:
    """Score every image of a folder-per-class set with ``bundle``.

    Raises ``ValueError`` when the folder has no class folder with images, or
    a class the model does not know.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir} is not a folder")
    root = data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    files_by_label = scan_class_folders(root)
    labels = bundle.manifest.labels
    unknown = sorted(set(files_by_label) - set(labels))
    if unknown:
        raise ValueError(f"classes {unknown} in {root} are not labels of the model {list(labels)}")
    if not files_by_label:
        raise ValueError(f"{root} has no class folder with images")
    pairs = [
        (path, labels.index(label)) for label, paths in files_by_label.items() for path in paths
    ]
    manifest = bundle.manifest
    scores = np.empty((len(pairs), len(labels)), dtype=np.float32)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = np.concatenate(
            [
                build_model_input(
                    read_image_hu(path)[np.newaxis], manifest.windows, manifest.input_size
                )
                for path, _ in chunk
            ]
        )
        scores[start : start + len(chunk)] = bundle.predict(batch)
    rule = manifest.aggregation
    verdicts = np.array(
        [
            _label_index(aggregate(scores[i : i + 1], labels, rule).verdict, labels)
            for i in range(len(pairs))
        ],
        dtype=np.int64,
    )
    truth = np.array([index for _, index in pairs], dtype=np.int64)
    logger.info("evaluated %s on %d images from %s", manifest.name, truth.size, root)
    return Evaluation(labels, scores, truth, verdicts, [path for path, _ in pairs])


def _label_index(verdict: str, labels: tuple[str, ...]) -> int:
    """The verdict's column, or -1 for Indeterminate (no class)."""
    return labels.index(verdict) if verdict != INDETERMINATE else -1


# -- the plot ------------------------------------------------------------------

_COLOURS_BGR = ((31, 119, 180), (44, 160, 44), (214, 39, 40), (255, 127, 14), (148, 103, 189))
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(
    img: np.ndarray,
    text: str,
    xy: tuple[int, int],
    scale: float = 0.45,
    colour: tuple[int, int, int] = (0, 0, 0),
) -> None:
    cv2.putText(img, text, xy, _FONT, scale, colour, 1, cv2.LINE_AA)


def plot_evaluation(evaluation: Evaluation, path: Path) -> Path:
    """Write a PNG: the confusion matrix (left) and one-vs-rest ROC curves (right)."""
    panel = 420
    img = np.full((panel + 80, 2 * panel + 60, 3), 255, dtype=np.uint8)
    _text(
        img,
        f"{evaluation.truth.size} images, accuracy {evaluation.accuracy:.3f}",
        (20, 24),
        0.6,
    )
    _draw_confusion(img, evaluation.confusion, evaluation.labels, (20, 50), panel)
    _draw_roc(img, evaluation, (panel + 50, 50), panel - 10)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write PNG {path}")
    return path


def _short(label: str) -> str:
    return "".join(word[0] for word in label.split()) if " " in label else label[:6]


def _draw_confusion(
    img: np.ndarray, matrix: np.ndarray, labels: Sequence[str], origin: tuple[int, int], size: int
) -> None:
    x0, y0 = origin[0] + 60, origin[1] + 20
    n = len(labels)
    cell = (size - 80) // n
    peak = max(1, int(matrix.max()))
    for i in range(n):
        for j in range(n):
            shade = int(255 - 200 * matrix[i, j] / peak)
            top_left = (x0 + j * cell, y0 + i * cell)
            bottom_right = (x0 + (j + 1) * cell, y0 + (i + 1) * cell)
            cv2.rectangle(img, top_left, bottom_right, (255, shade, shade), -1)
            cv2.rectangle(img, top_left, bottom_right, (160, 160, 160), 1)
            colour = (255, 255, 255) if shade < 140 else (0, 0, 0)
            centre = (top_left[0] + cell // 3, top_left[1] + cell // 2)
            _text(img, str(matrix[i, j]), centre, 0.5, colour)
        _text(img, _short(labels[i]), (origin[0], y0 + i * cell + cell // 2))
        _text(img, _short(labels[i]), (x0 + i * cell + cell // 4, y0 - 6))
    _text(img, "true (rows) / predicted (columns)", (x0, y0 + n * cell + 20))


def _draw_roc(img: np.ndarray, evaluation: Evaluation, origin: tuple[int, int], size: int) -> None:
    x0, y0 = origin[0] + 30, origin[1] + 10
    side = size - 60

    def point(fpr: float, tpr: float) -> tuple[int, int]:
        return int(x0 + fpr * side), int(y0 + (1.0 - tpr) * side)

    cv2.rectangle(img, (x0, y0), (x0 + side, y0 + side), (0, 0, 0), 1)
    cv2.line(img, point(0, 0), point(1, 1), (190, 190, 190), 1, cv2.LINE_AA)
    _text(img, "false positive rate", (x0 + side // 3, y0 + side + 20))
    _text(img, "TPR", (origin[0] - 10, y0 + side // 2))
    for i, (label, auc) in enumerate(evaluation.auc().items()):
        colour = _COLOURS_BGR[i % len(_COLOURS_BGR)][::-1]
        legend = f"{_short(label)} AUC " + ("n/a" if np.isnan(auc) else f"{auc:.3f}")
        _text(img, legend, (x0 + side // 2, y0 + side - 12 - 18 * i), 0.45, colour)
        if np.isnan(auc):
            continue
        fpr, tpr = roc_curve(evaluation.scores[:, i], evaluation.truth == i)
        points = np.array([point(f, t) for f, t in zip(fpr, tpr, strict=True)], dtype=np.int32)
        cv2.polylines(img, [points], False, colour, 2, cv2.LINE_AA)
