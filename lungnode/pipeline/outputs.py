"""What one analysis becomes, in memory: the DICOM objects, the key pictures, the report.

The series job writes and queues these (``pipeline.series_job``); the model's
warm-up at start builds them once and throws them away (``pipeline.warmup``),
so that every writer the first job needs has already run. One function for
both, so that the warm-up warms exactly what a job runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydicom import Dataset

from lungnode.domain import AnalysisResult, HUVolume, PreviousVersion

if TYPE_CHECKING:
    from lungnode.config import Settings

logger = logging.getLogger(__name__)

SRStorage = Literal["comprehensive-3d", "comprehensive"]


@dataclass(frozen=True)
class OutputOptions:
    """What the settings choose about the objects written."""

    #: The SR's storage class: Comprehensive 3D SR, as IHE AIR asks, or
    #: Comprehensive SR for viewers that read only that (``sr_storage``).
    sr_storage: SRStorage = "comprehensive-3d"

    @classmethod
    def from_settings(cls, settings: Settings) -> OutputOptions:
        return cls(sr_storage=settings.sr_storage)


@dataclass
class RenderedResults:
    #: (kind, dataset) in sending order: "sc" per key slice, "pdf", "sr", "pm", "kos".
    datasets: list[tuple[str, Dataset]] = field(default_factory=list)
    #: The RGB key-slice pictures (heatmap over the slice, with the banner), in order.
    key_pictures: list[np.ndarray] = field(default_factory=list)
    #: The PDF report.
    pdf: bytes = b""


def render_results(
    source: Dataset,
    volume: HUVolume | None,
    result: AnalysisResult,
    version: int,
    *,
    previous: PreviousVersion | None = None,
    options: OutputOptions | None = None,
    key_headers: Sequence[Dataset] = (),
) -> RenderedResults:
    """Every object of an analysis, as IHE AI Results has an Evidence Creator send them.

    When analysed: the Secondary Captures and the Grad-CAM Parametric Map;
    always the PDF report as Encapsulated PDF and the SR; when analysed, last,
    the Key Object Selection of the key slices, the SR and the map.

    ``source`` is a slice of the series (patient and study are copied from it);
    ``version`` is the analysis version, which the output UIDs derive from;
    ``previous`` is the analysis this one supersedes, which the report and the
    SR name; ``key_headers`` are the headers of the key slices' instances,
    whose geometry the map takes (without them, or without geometry, no map).
    """
    from lungnode.dicom.writers.key_objects import write_key_object_selection
    from lungnode.dicom.writers.parametric_map import write_parametric_map

    options = options or OutputOptions()
    from lungnode.dicom.writers.pdf import write_pdf_document
    from lungnode.dicom.writers.sc import (
        check_key_slices,
        render_key_image,
        sc_slice_scores,
        slice_score_text,
        write_sc_images,
    )
    from lungnode.dicom.writers.sr import write_sr
    from lungnode.report.pdf import KeyImage, ReportInput, StudyFacts, build_report

    rendered = RenderedResults()
    key_images: list[KeyImage] = []
    if result.analysed and volume is not None:
        # The key pictures (report, PNG) show each slice's highest score, the
        # Secondary Captures the verdict's; where the two read the same, the
        # picture is the same, and is drawn once.
        check_key_slices(result, volume)
        sc_scores = sc_slice_scores(result)
        shared: list[np.ndarray | None] = []
        for n, (index, heatmap) in enumerate(zip(result.key_slices, result.heatmaps, strict=True)):
            score = float(result.slice_scores[index].max())
            picture = render_key_image(
                volume.pixels(index),
                heatmap,
                verdict=result.verdict_text(),
                slice_score=score,
                model=result.model,
            )
            rendered.key_pictures.append(picture)
            key_images.append(KeyImage(picture, f"slice {index + 1}"))
            same = slice_score_text(sc_scores[n]) == slice_score_text(score)
            shared.append(picture if same else None)
        rendered.datasets += [
            ("sc", ds)
            for ds in write_sc_images(
                source, result, volume, analysis_version=version, pictures=shared
            )
        ]
    parametric_map = None
    if result.analysed and result.key_slices:
        try:
            parametric_map = write_parametric_map(key_headers, result, analysis_version=version)
        except ValueError as exc:
            logger.warning("no Grad-CAM parametric map: %s", exc)
    rendered.pdf = build_report(
        ReportInput(
            result=result,
            facts=StudyFacts.from_dataset(source),
            key_images=key_images,
            version=version,
            replaces=previous,
        )
    )
    rendered.datasets.append(
        ("pdf", write_pdf_document(source, result, rendered.pdf, analysis_version=version))
    )
    rendered.datasets.append(
        (
            "sr",
            write_sr(
                source,
                result,
                analysis_version=version,
                predecessor=previous,
                comprehensive_3d=options.sr_storage == "comprehensive-3d",
            ),
        )
    )
    # After what a radiologist reads (heatmaps, report, SR): the map is the largest object.
    if parametric_map is not None:
        rendered.datasets.append(("pm", parametric_map))
    if result.analysed and result.key_slices:
        sr = next(ds for kind, ds in rendered.datasets if kind == "sr")
        references = [sr] if parametric_map is None else [sr, parametric_map]
        rendered.datasets.append(
            (
                "kos",
                write_key_object_selection(
                    source, result, analysis_version=version, references=references
                ),
            )
        )
    return rendered


def dataset_bytes(dataset: Dataset) -> bytes:
    """The dataset as a DICOM file (PS3.10: preamble, file meta), in memory."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
