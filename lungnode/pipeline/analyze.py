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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from lungnode.domain import AnalysisResult, HUVolume, SliceRef, verdict_text
from lungnode.errors import DecodeError
from lungnode.imaging.windowing import picture_to_hu
from lungnode.ml.bundle import ModelBundle
from lungnode.ml.gradcam import heatmaps_for_slices
from lungnode.ml.inference import (
    DEFAULT_BATCH_SIZE,
    BackgroundScorer,
    aggregate,
    score_slices,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

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
    class on each key slice; for a Normal or Indeterminate verdict they
    explain the most likely lesion class of that slice instead, since "why
    normal" has no useful map.
    """
    started = time.perf_counter()
    if volume.hu.shape[0] == 0:
        return AnalysisResult.not_analysed("the volume has no slices", bundle.identity)
    timings: dict[str, float] = {}
    scores = score_slices(bundle, volume.hu, batch_size, timings)
    result = conclude(
        volume, bundle, scores, with_heatmaps=with_heatmaps, rule_overrides=rule_overrides
    )
    result.timings_s = {**timings, **result.timings_s}
    result.timings_s["total"] = time.perf_counter() - started
    return result


def conclude(
    volume: HUVolume,
    bundle: ModelBundle,
    scores: np.ndarray,
    *,
    with_heatmaps: bool = True,
    rule_overrides: Mapping[str, Any] | None = None,
) -> AnalysisResult:
    """Aggregate slice ``scores`` of ``volume`` into a verdict, with Grad-CAM on the key slices.

    ``timings_s`` holds ``aggregate``, ``gradcam`` and their ``total``.
    """
    started = time.perf_counter()
    rule = {**bundle.manifest.aggregation, **(rule_overrides or {})}
    verdict = aggregate(scores, bundle.manifest.labels, rule)
    timings = {"aggregate": time.perf_counter() - started}
    labels = bundle.manifest.labels
    heatmaps: list[np.ndarray] = []
    if with_heatmaps and verdict.key_slices:
        t0 = time.perf_counter()
        heatmaps = heatmaps_for_slices(
            bundle,
            np.stack([volume.pixels(i) for i in verdict.key_slices]),
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
        "analysed %d slices: %s with %s %s",
        volume.hu.shape[0],
        verdict_text(verdict.verdict, verdict.confidence, verdict.class_scores),
        bundle.identity.name,
        bundle.identity.version,
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
    # A lesion verdict explains its class; Normal and Indeterminate explain
    # what came closest to a lesion on each slice, since "why not" has no map.
    if verdict in labels and verdict != normal:
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


def analyze_series(
    paths: Sequence[Path],
    bundle: ModelBundle,
    *,
    with_heatmaps: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    check: Callable[[HUVolume], None] | None = None,
) -> tuple[HUVolume, AnalysisResult]:
    """Decode a series and analyse it, the model overlapping with decoding.

    Slices go to the model (``ml.inference.BackgroundScorer``) a batch at a
    time while later files are still being read, so the wall time is close
    to the slower of the two rather than their sum. ``check`` (optional)
    sees the decoded volume before the verdict; whatever it raises
    propagates, as do ``DecodeError`` and model failures.

    Timings: ``decode`` is the decoding thread's own time (reading, pixel
    decoding, HU; not windowing), ``preprocess`` the windowing and resizing,
    ``inference`` the model's (on its own thread, overlapping ``decode``),
    and ``total`` the wall time of the whole analysis.
    """
    from lungnode.dicom.decode import stream_series

    started = time.perf_counter()
    with BackgroundScorer(bundle) as scorer:
        volume, decode_index = stream_series(paths, scorer.submit, batch_size)
        decoded = time.perf_counter()
        in_decode_order = scorer.finish()
    if check is not None:
        check(volume)
    # Score rows follow decode order; the volume is sorted along the normal.
    scores = in_decode_order[np.asarray(decode_index, dtype=np.intp)]
    result = conclude(volume, bundle, scores, with_heatmaps=with_heatmaps)
    result.timings_s = {
        "decode": decoded - started - scorer.timings["preprocess"],
        **scorer.timings,
        **result.timings_s,
        "total": time.perf_counter() - started,
    }
    return volume, result


@dataclass
class PathAnalysis:
    """What ``analyze_path`` found and concluded, for the CLI's summary and report."""

    result: AnalysisResult
    volume: HUVolume
    #: Header of one DICOM instance of the input (patient and study facts); None for pictures.
    source: Dataset | None
    #: The files analysed (one for an image, every instance for a series folder).
    files: list[Path]


def series_files(folder: Path) -> list[Path]:
    """The DICOM files of the one series in ``folder`` (searched recursively).

    Files that are not DICOM Part 10 (no "DICM" marker and no .dcm suffix) are
    skipped, so a DICOMDIR export or notes beside the images do no harm.

    Raises:
        DecodeError: no DICOM file, or files of more than one series (the
            Series Instance UIDs are named, so the user can split them).
        NotCTError: a file is not a CT image in HU (``dicom.modality``).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from lungnode.dicom.modality import RULE_KEYWORDS, require_ct

    by_series: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == "DICOMDIR" or not _is_dicom(path):
            continue
        try:
            header = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", *RULE_KEYWORDS],
            )
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc
        require_ct(header, path.name)
        by_series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(path)
    if not by_series:
        raise DecodeError(f"{folder} holds no DICOM file")
    if len(by_series) > 1:
        listed = ", ".join(
            f"{uid or '(none)'} ({len(files)} files)" for uid, files in by_series.items()
        )
        raise DecodeError(
            f"{folder} holds {len(by_series)} series; give one series folder or file: {listed}"
        )
    return next(iter(by_series.values()))


def analyze_path(path: Path, bundle: ModelBundle, *, with_heatmaps: bool = True) -> PathAnalysis:
    """Analyse what a user points at: a DICOM file, a folder of one series, a PNG or a JPEG.

    A DICOM input must be a CT image in HU, by the rule every route applies
    (``dicom.modality``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DecodeError: unreadable input, or a folder of several series.
        NotCTError: DICOM that is not CT, or has no Hounsfield units.
        ValueError: a file that is neither a picture nor DICOM.
    """
    import pydicom

    from lungnode.dicom.modality import require_ct_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() in PICTURE_SUFFIXES and not path.is_dir():
        t0 = time.perf_counter()
        volume = load_picture(path)
        decode_s = time.perf_counter() - t0
        result = analyze_volume(volume, bundle, with_heatmaps=with_heatmaps)
        result.timings_s = {
            "decode": decode_s,
            **{k: v for k, v in result.timings_s.items() if k != "total"},
            "total": result.timings_s.get("total", 0.0) + decode_s,
        }
        return PathAnalysis(result=result, volume=volume, source=None, files=[path])
    if path.is_dir():
        files = series_files(path)
    elif _is_dicom(path):
        require_ct_file(path)
        files = [path]
    else:
        raise ValueError(f"{path.name}: expected a PNG, JPEG or DICOM file, or a series folder")
    volume, result = analyze_series(files, bundle, with_heatmaps=with_heatmaps)
    # Read only now: analyze_series has turned an unreadable file into a DecodeError.
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    return PathAnalysis(result=result, volume=volume, source=source, files=files)


def result_json(result: AnalysisResult) -> dict[str, Any]:
    """The JSON form of a result, as ``lungnode predict --json`` prints it.

    ``prediction`` is a label or "Indeterminate"; ``confidence`` is its class
    score, null for Indeterminate (see ``ml.inference``).
    ``confidence_scores`` maps every label to its probability (they sum to 1);
    ``key_slices`` name each key slice by index and SOP Instance UID (empty
    for a picture), so a reader can find it in the PACS.
    """
    model = result.model
    return {
        "analysed": result.analysed,
        "not_analysed_reason": result.not_analysed_reason,
        "prediction": result.verdict,
        "confidence": result.confidence,
        "confidence_scores": {
            label: float(result.class_scores.get(label, 0.0)) for label in result.labels
        }
        if result.analysed
        else {},
        "key_slices": [
            {
                "index": int(index),
                "sop_instance_uid": ref.sop_instance_uid,
                "frame_number": ref.frame_number,
                "slice_score": float(result.slice_scores[index].max()),
            }
            for index, ref in zip(result.key_slices, result.key_slice_refs, strict=True)
        ],
        "lesion_slices": list(result.lesion_slices),
        "slices": int(result.slice_scores.shape[0]),
        "model": {
            "name": model.name,
            "version": model.version,
            "sha256": model.sha256,
            "intended_use": model.intended_use,
            "trained_on": model.trained_on,
        },
        "synthetic_model": model.synthetic,
        "timings_s": {
            stage: round(float(seconds), 4) for stage, seconds in result.timings_s.items()
        },
    }


def report_pdf(analysis: PathAnalysis) -> bytes:
    """The PDF report of an analysis, with the key-slice heatmaps as the series job draws them."""
    from lungnode.dicom.writers.sc import render_key_image
    from lungnode.report.pdf import KeyImage, ReportInput, StudyFacts, build_report

    result = analysis.result
    key_images = []
    for index, heatmap in zip(result.key_slices, result.heatmaps, strict=False):
        picture = render_key_image(
            analysis.volume.hu[index],
            heatmap,
            verdict=result.verdict_text(),
            slice_score=float(result.slice_scores[index].max()),
            model=result.model,
        )
        key_images.append(KeyImage(picture, f"slice {index + 1}"))
    facts = (
        StudyFacts.from_dataset(analysis.source) if analysis.source is not None else StudyFacts()
    )
    return build_report(ReportInput(result=result, facts=facts, key_images=key_images))
