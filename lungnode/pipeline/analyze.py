"""One series or one image in, one ``AnalysisResult`` out.

The stages, each timed into ``AnalysisResult.timings_s``: decode (DICOM only),
preprocess (windows + resize), inference, aggregate, gradcam. Decoding
belongs to ``dicom.decode``; everything after it belongs to ``ml``. This
module only joins them, and imports ``dicom.decode`` lazily so that callers
that already hold a ``HUVolume`` never need it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungnode.domain import AnalysisResult, HUVolume, SliceRef
from lungnode.imaging.windowing import picture_to_hu
from lungnode.ml.bundle import ModelBundle
from lungnode.ml.gradcam import heatmaps_for_slices
from lungnode.ml.inference import DEFAULT_BATCH_SIZE, classify

logger = logging.getLogger(__name__)

PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def analyze_volume(
    volume: HUVolume,
    bundle: ModelBundle,
    *,
    with_heatmaps: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rule_overrides: Mapping[str, Any] | None = None,
) -> AnalysisResult:
    """Classify a HU volume and explain its key slices with Grad-CAM.

    The volume is scored ``batch_size`` slices at a time, so memory beyond
    the volume itself is bounded by one batch. Heatmaps explain the verdict
    class on each key slice; for a Normal verdict they explain the most
    likely lesion class of that slice instead, since "why normal" has no
    useful map.
    """
    started = time.perf_counter()
    if volume.hu.shape[0] == 0:
        return AnalysisResult.not_analysed("the volume has no slices", bundle.identity)
    scores, verdict, timings = classify(bundle, volume.hu, batch_size, rule_overrides)
    labels = bundle.manifest.labels
    heatmaps: list[np.ndarray] = []
    if with_heatmaps and verdict.key_slices:
        t0 = time.perf_counter()
        heatmaps = heatmaps_for_slices(
            bundle,
            volume.hu[verdict.key_slices],
            _explained_classes(
                scores,
                verdict.key_slices,
                verdict.verdict,
                labels,
                str(verdict.rule["normal_label"]),
            ),
        )
        timings["gradcam"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    logger.info(
        "analysed %d slices: %s (%.3f) with %s %s in %.2f s",
        volume.hu.shape[0],
        verdict.verdict,
        verdict.confidence,
        bundle.identity.name,
        bundle.identity.version,
        timings["total"],
    )
    return AnalysisResult(
        verdict=verdict.verdict,
        confidence=verdict.confidence,
        class_scores=verdict.class_scores,
        slice_scores=scores,
        key_slices=verdict.key_slices,
        key_slice_refs=[volume.slices[i] for i in verdict.key_slices],
        model=bundle.identity,
        heatmaps=heatmaps,
        timings_s=timings,
        labels=labels,
        lesion_slices=verdict.lesion_slices,
        rule=dict(verdict.rule),
    )


def _explained_classes(
    scores: np.ndarray,
    key_slices: Sequence[int],
    verdict: str,
    labels: tuple[str, ...],
    normal: str,
) -> list[int]:
    if verdict != normal:
        return [labels.index(verdict)] * len(key_slices)
    lesion = np.array([i for i, label in enumerate(labels) if label != normal])
    return [int(lesion[np.argmax(scores[i, lesion])]) for i in key_slices]


def _is_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble (PS3.10 7.1)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with path.open("rb") as stream:
        head = stream.read(132)
    return head[128:132] == b"DICM"


def load_picture(path: Path) -> HUVolume:
    """A PNG/JPEG as a one-slice HU volume.

    A picture has no Rescale Slope/Intercept, so we assume it was saved in
    the lung window (as public CT picture sets are) and map grey 0..255 back
    onto that window's HU range, -1350 to +150 HU. Anything outside that
    range was clipped when the picture was made and cannot be recovered.
    """
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path.name} is not a readable PNG or JPEG image")
    hu = picture_to_hu(image)
    return HUVolume(hu=hu[np.newaxis], slices=[SliceRef(sop_instance_uid="")])


def analyze_image(
    path: Path,
    bundle: ModelBundle,
    *,
    with_heatmaps: bool = True,
) -> AnalysisResult:
    """Classify one PNG/JPEG picture or one DICOM image (single or multi-frame).

    DICOM goes through ``dicom.decode.load_image`` and keeps its real HU.
    For a one-slice input the rule needs that one slice to be a lesion slice
    (see ``ml.inference``); a multi-frame image is treated like a series.
    """
    path = Path(path)
    t0 = time.perf_counter()
    if path.suffix.lower() in PICTURE_SUFFIXES:
        volume = load_picture(path)
    elif _is_dicom(path):
        from lungnode.dicom.decode import load_image

        volume = load_image(path)
    else:
        raise ValueError(f"{path.name}: expected a PNG, JPEG or DICOM file")
    decode_s = time.perf_counter() - t0
    result = analyze_volume(volume, bundle, with_heatmaps=with_heatmaps)
    result.timings_s["decode"] = decode_s
    result.timings_s["total"] = result.timings_s.get("total", 0.0) + decode_s
    return result


def analyze_series(
    paths: Sequence[Path],
    bundle: ModelBundle,
    *,
    with_heatmaps: bool = True,
) -> AnalysisResult:
    """Decode the instances of one series with ``dicom.decode.load_series`` and analyse them."""
    from lungnode.dicom.decode import load_series

    t0 = time.perf_counter()
    volume = load_series(paths)
    decode_s = time.perf_counter() - t0
    result = analyze_volume(volume, bundle, with_heatmaps=with_heatmaps)
    result.timings_s["decode"] = decode_s
    result.timings_s["total"] = result.timings_s.get("total", 0.0) + decode_s
    return result
