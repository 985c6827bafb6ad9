"""Slice scoring and the series verdict.

A series is scored one batch of slices at a time (windowing, resizing and
the model all work on the batch), so memory stays bounded by the batch and
not by the series length. The verdict comes from the manifest's aggregation
rule; the only rule today is ``lesion_slices``:

- a slice is a *lesion slice* when its highest lesion-class score (any class
  but ``normal_label``) is at least ``threshold``;
- when at least ``min_slices`` slices are lesion slices (for inputs with
  fewer slices than ``min_slices``, all of them must be: a single image needs
  one), the verdict is the lesion class with the highest mean score over the
  ``top_n`` most suspicious slices;
- otherwise the series is ``normal_label`` when the mean Normal score over
  all slices is at least ``threshold`` too;
- otherwise no class cleared its bar, and the verdict is
  :data:`~lungnode.domain.INDETERMINATE`, with no confidence.

One lesion slice is not enough because a real lesion spans several
contiguous slices, while an isolated false positive (a vessel seen end-on)
does not. Normal must clear the same bar as a lesion class because "no
lesion slice passed" is not the same as "normal": a slice that scores 0.75
Adenocarcinoma and 0.02 Normal is not a normal slice, and calling it Normal
with a 2% confidence would tell a reader nothing they can act on.
Indeterminate says what happened: the model was not sure, so read the
images as usual.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lungnode.domain import INDETERMINATE
from lungnode.imaging.windowing import build_model_input
from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


@dataclass
class SeriesVerdict:
    """The outcome of the aggregation rule over slice scores."""

    verdict: str
    #: The verdict's class score; None for Indeterminate.
    confidence: float | None
    class_scores: dict[str, float]
    key_slices: list[int]
    lesion_slices: list[int]
    rule: dict[str, Any] = field(default_factory=dict)


def score_slices(
    bundle: ModelBundle,
    hu: np.ndarray,
    batch_size: int = DEFAULT_BATCH_SIZE,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Softmax scores (slices, classes) float32 for a HU stack (slices, rows, cols).

    ``timings`` (if given) accumulates seconds under ``preprocess`` and
    ``inference``.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected HU of shape (slices, rows, cols), got {hu.shape}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    manifest = bundle.manifest
    n = hu.shape[0]
    scores = np.empty((n, len(manifest.labels)), dtype=np.float32)
    spent = {"preprocess": 0.0, "inference": 0.0}
    for start in range(0, n, batch_size):
        t0 = time.perf_counter()
        batch = build_model_input(
            hu[start : start + batch_size], manifest.windows, manifest.input_size
        )
        t1 = time.perf_counter()
        scores[start : start + batch.shape[0]] = bundle.predict(batch)
        t2 = time.perf_counter()
        spent["preprocess"] += t1 - t0
        spent["inference"] += t2 - t1
    if timings is not None:
        for key, value in spent.items():
            timings[key] = timings.get(key, 0.0) + value
    logger.debug("scored %d slices: %s", n, spent)
    return scores


class BackgroundScorer:
    """Scores HU batches on a worker thread while the caller produces the next ones.

    The caller (the decoder) hands over HU slices with ``submit(first, hu)``:
    they are windowed and resized at once, in the caller's thread, so ``hu``
    may be a view that changes afterwards; the model then runs on the worker
    thread. TensorFlow releases the GIL while it computes, so reading and
    decoding the next files overlaps with the model on a multi-core machine.
    At most ``depth`` batches wait, which bounds memory when the model is
    the slower side. ``finish()`` returns every score, in ``first`` order.

    Use as a context manager, or call ``finish()`` (or ``close()`` on error)
    exactly once: the worker thread lives until then.
    """

    def __init__(self, bundle: ModelBundle, depth: int = 2) -> None:
        self._bundle = bundle
        self._pending: queue.Queue[tuple[int, np.ndarray] | None] = queue.Queue(maxsize=depth)
        self._scores: dict[int, np.ndarray] = {}
        self._error: BaseException | None = None
        self.timings: dict[str, float] = {"preprocess": 0.0, "inference": 0.0}
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="lungnode-scorer", daemon=True)
        self._worker.start()

    def __enter__(self) -> BackgroundScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, first: int, hu: np.ndarray) -> None:
        """Window and resize ``hu`` (slices, rows, cols) now, and queue it for the model.

        A later batch with the same ``first`` replaces the earlier one.

        Raises:
            RuntimeError: the model failed on an earlier batch (the cause is chained).
        """
        if self._closed:
            raise RuntimeError("submit() after finish() or close()")
        self._raise_if_failed()
        manifest = self._bundle.manifest
        t0 = time.perf_counter()
        batch = build_model_input(hu, manifest.windows, manifest.input_size)
        self.timings["preprocess"] += time.perf_counter() - t0
        self._pending.put((first, batch))

    def finish(self) -> np.ndarray:
        """Wait for the model and return the scores (slices, classes), in ``first`` order."""
        self.close()
        self._raise_if_failed()
        if not self._scores:
            return np.empty((0, len(self._bundle.manifest.labels)), dtype=np.float32)
        return np.concatenate([self._scores[k] for k in sorted(self._scores)])

    def close(self) -> None:
        """Stop the worker after the batches already queued; idempotent."""
        if not self._closed:
            self._closed = True
            self._pending.put(None)
            self._worker.join()

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            if self._error is not None:
                continue  # drain, so that submit() never blocks on a dead worker
            first, batch = item
            try:
                t0 = time.perf_counter()
                self._scores[first] = self._bundle.predict(batch)
                self.timings["inference"] += time.perf_counter() - t0
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the model failed: {self._error}") from self._error


def aggregate(
    slice_scores: np.ndarray,
    labels: tuple[str, ...],
    rule: Mapping[str, Any],
) -> SeriesVerdict:
    """Apply the ``lesion_slices`` rule (module docstring) to slice scores.

    ``class_scores`` is the mean softmax vector over the slices that decide:
    the ``top_n`` most suspicious slices for a lesion verdict, every slice for
    a Normal or Indeterminate verdict. Both are means of probability vectors,
    so they sum to 1. ``confidence`` is the verdict's class score, None for
    Indeterminate (which is no class).

    ``key_slices`` are always the ``top_n`` slices with the highest lesion
    score, most suspicious first, also for a Normal verdict: a reader checking
    a negative result wants to see what came closest to positive.
    """
    if rule.get("rule", "lesion_slices") != "lesion_slices":
        raise ValueError(f"unsupported aggregation rule {rule.get('rule')!r}")
    n, k = slice_scores.shape if slice_scores.ndim == 2 else (0, 0)
    if n == 0 or k != len(labels):
        raise ValueError(
            f"need scores of shape (slices>0, {len(labels)}), got {slice_scores.shape}"
        )
    normal_label = str(rule.get("normal_label", "Normal"))
    threshold = float(rule.get("threshold", 0.5))
    min_slices = max(1, int(rule.get("min_slices", 1)))
    top_n = max(1, int(rule.get("top_n", 4)))
    normal_index = labels.index(normal_label)
    lesion_columns = [i for i in range(k) if i != normal_index]

    lesion_score = slice_scores[:, lesion_columns].max(axis=1)
    lesion_slices = np.flatnonzero(lesion_score >= threshold)
    # Stable sort, so ties keep slice order and results are reproducible.
    ranked = np.argsort(-lesion_score, kind="stable")[:top_n]
    needed = min(min_slices, n)
    applied = {
        "rule": "lesion_slices",
        "normal_label": normal_label,
        "threshold": threshold,
        "min_slices": min_slices,
        "min_slices_applied": needed,
        "top_n": top_n,
        "lesion_slice_count": int(lesion_slices.size),
    }
    verdict_index: int | None
    if lesion_slices.size >= needed:
        mean = slice_scores[ranked].mean(axis=0, dtype=np.float64)
        mean = mean / mean.sum()
        verdict_index = lesion_columns[int(np.argmax(mean[lesion_columns]))]
    else:
        mean = slice_scores.mean(axis=0, dtype=np.float64)
        mean = mean / mean.sum()
        verdict_index = normal_index if mean[normal_index] >= threshold else None
    class_scores = {label: float(mean[i]) for i, label in enumerate(labels)}
    return SeriesVerdict(
        verdict=labels[verdict_index] if verdict_index is not None else INDETERMINATE,
        confidence=float(mean[verdict_index]) if verdict_index is not None else None,
        class_scores=class_scores,
        key_slices=[int(i) for i in ranked],
        lesion_slices=[int(i) for i in lesion_slices],
        rule=applied,
    )
