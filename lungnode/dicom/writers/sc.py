"""Secondary Capture images of the Grad-CAM heatmaps, one per key slice.

Each image is the key slice in the lung window with the heatmap blended over
it and a colour bar (:func:`lungnode.imaging.heatmap.overlay`), under a banner with
burned-in text: "NOT FOR DIAGNOSTIC USE", the verdict worded as every output
words it (:meth:`~lungnode.domain.AnalysisResult.verdict_text`), the slice's
score, the model, and the synthetic-model notice for the demo model. A viewer shows it in the
source study, next to the CT, as a new series "LUNGNODE Grad-CAM".

The object is a Secondary Capture Image (PS3.3 A.8.1) built by highdicom's
:class:`highdicom.sc.SCImage`, which copies the Patient and General Study
modules from the source instance and checks what it writes. On top we set:

- Burned In Annotation YES (PS3.3 C.7.6.1.1.11), as the pixels carry text;
- Conversion Type WSD, "workstation" (PS3.3 C.8.6.1);
- Source Image Sequence (PS3.3 C.7.6.1, Table C.7-9) to the CT instance of the
  key slice, with purpose (121322, DCM, "Source image for image processing
  operation") from CID 7202;
- Contributing Equipment Sequence (PS3.3 C.12.1) naming the model.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from lungnode import __version__
from lungnode.dicom.uids import OutputSeries
from lungnode.dicom.writers.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    algorithm_equipment,
    check_result,
    check_source,
    explained_class,
    model_text,
    resolve_created,
    sop_instance_reference,
)
from lungnode.domain import AnalysisResult, HUVolume, ModelIdentity, SliceRef
from lungnode.imaging.heatmap import overlay

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "LUNGNODE Grad-CAM"
#: Images narrower than this are enlarged so that the burned-in text is legible.
MIN_WIDTH = 512

_WHITE = (255, 255, 255)
_RED = (255, 80, 80)
_YELLOW = (255, 220, 0)


def render_key_image(
    hu_slice: np.ndarray,
    heatmap: np.ndarray,
    *,
    verdict: str,
    slice_score: float | None,
    model: ModelIdentity,
    min_width: int = MIN_WIDTH,
) -> np.ndarray:
    """The RGB uint8 picture of one key slice: banner of text over the overlay.

    ``verdict`` is the series verdict in words (``AnalysisResult.verdict_text()``),
    so the picture says what the report and the SR say. The overlay keeps the
    slice's aspect ratio; it is enlarged (never shrunk) to ``min_width``
    columns so that the text stays legible on small slices.
    """
    if hu_slice.ndim != 2:
        raise ValueError(f"a key slice must be 2D, got shape {hu_slice.shape}")
    if heatmap.shape != hu_slice.shape:
        raise ValueError(f"heatmap {heatmap.shape} and slice {hu_slice.shape} differ in size")
    rows, cols = hu_slice.shape
    hu: np.ndarray = hu_slice.astype(np.float32)
    heat: np.ndarray = heatmap.astype(np.float32)
    if cols < min_width:
        # Enlarge before blending so that the colour bar is drawn sharp.
        size = (min_width, max(1, round(rows * min_width / cols)))
        hu = cv2.resize(hu, size, interpolation=cv2.INTER_LINEAR)
        heat = np.clip(cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    rgb = overlay(hu, heat, legend=True)
    width = rgb.shape[1]
    font_scale = max(0.45, width / 1100)
    lines = [
        (line, colour)
        for text, colour in banner_text(verdict, slice_score, model)
        for line in _wrap(text, width - 16, font_scale)
    ]
    line_h = int(28 * font_scale) + 8
    banner = np.zeros((line_h * len(lines) + 8, width, 3), dtype=np.uint8)
    for i, (text, colour) in enumerate(lines):
        cv2.putText(
            banner,
            _ascii(text),
            (8, line_h * (i + 1)),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            colour,
            1,
            cv2.LINE_AA,
        )
    picture: np.ndarray = np.ascontiguousarray(np.vstack([banner, rgb]))
    return picture


def banner_text(
    verdict: str, slice_score: float | None, model: ModelIdentity
) -> list[tuple[str, tuple[int, int, int]]]:
    """The burned-in lines of a key image, with their colours, before wrapping."""
    grad_cam = f"Grad-CAM heatmap of this key slice{slice_score_text(slice_score)}"
    lines: list[tuple[str, tuple[int, int, int]]] = [
        (NOT_FOR_DIAGNOSTIC_USE, _RED),
        (f"Verdict: {verdict}", _WHITE),
        (grad_cam, _WHITE),
        (f"Model: {model_text(model)}", _WHITE),
    ]
    if model.synthetic:
        lines.append(("Synthetic phantom model - trained on synthetic phantoms", _YELLOW))
    return lines


def slice_score_text(slice_score: float | None) -> str:
    """How a key image words its slice score: two key images whose words agree
    (and whose slice, heatmap, verdict and model agree) are the same picture."""
    return "" if slice_score is None else f", slice score {slice_score:.3f}"


def _wrap(text: str, width: int, font_scale: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels, as drawn."""

    def fits(candidate: str) -> bool:
        (w, _h), _ = cv2.getTextSize(_ascii(candidate), cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        return bool(w <= width)

    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and not fits(candidate):
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return lines


def write_sc_image(
    source: Dataset,
    result: AnalysisResult,
    *,
    hu_slice: np.ndarray,
    heatmap: np.ndarray,
    slice_ref: SliceRef,
    index: int,
    analysis_version: int,
    slice_score: float | None = None,
    created: _dt.datetime | None = None,
    picture: np.ndarray | None = None,
) -> Dataset:
    """One Secondary Capture image for the ``index``-th key slice; valid or raise.

    ``source`` is any instance of the analysed series (its header is enough);
    ``slice_ref`` names the CT instance (and frame) the key slice came from.
    ``picture`` is :func:`render_key_image` of the same slice, heatmap, verdict,
    model and ``slice_score``, when the caller has it already; else it is drawn.

    Raises:
        ValueError: the result was not analysed, or an input is inconsistent.
    """
    check_source(source)
    check_result(result)
    if not result.analysed:
        raise ValueError("no Grad-CAM image for a series that was not analysed")
    when = resolve_created(created)
    output = OutputSeries.for_model(
        str(source.SeriesInstanceUID), result.model, analysis_version, "sc"
    )
    if picture is None:
        picture = render_key_image(
            hu_slice,
            heatmap,
            verdict=result.verdict_text(),
            slice_score=slice_score,
            model=result.model,
        )
    explained = explained_class(result)
    equipment = algorithm_equipment(
        result.model, when, f"Grad-CAM heatmap of {explained} burned into the key slice"
    )
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=picture,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=output.series_instance_uid,
            series_number=output.series_number,
            sop_instance_uid=output.sop_instance_uid(index),
            instance_number=index + 1,
            manufacturer=MANUFACTURER,
            patient_orientation=patient_orientation(source),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[equipment],
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name="lungnode",
            software_versions=__version__,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    except (TypeError, AttributeError) as exc:  # highdicom's way to reject an input
        raise ValueError(f"cannot build the Secondary Capture image: {exc}") from exc
    sc.BurnedInAnnotation = "YES"
    # General Series: a lung CT shows the chest, which is not a paired body
    # part, so Laterality (type 2C, PS3.3 C.7.3.1) stays absent.
    sc.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
    sc.ConversionType = "WSD"
    sc.DateOfSecondaryCapture = DA(when.date())
    sc.TimeOfSecondaryCapture = TM(when.time())
    sc.DerivationDescription = (
        f"Grad-CAM of {explained} by {model_text(result.model)} over the lung window"
    )[:1024]
    reference = sop_instance_reference(source, slice_ref)
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    sc.ImageComments = (
        f"{NOT_FOR_DIAGNOSTIC_USE}. Key slice {index + 1}. Verdict: {result.verdict_text()}"
    )
    if result.model.synthetic:
        sc.ImageComments += ". Synthetic phantom model, trained on synthetic phantoms"
    return sc


def write_sc_images(
    source: Dataset,
    result: AnalysisResult,
    volume: HUVolume,
    *,
    analysis_version: int,
    created: _dt.datetime | None = None,
    pictures: Sequence[np.ndarray | None] = (),
) -> list[Dataset]:
    """One Secondary Capture image per key slice, most suspicious first.

    ``volume`` is the analysed volume; ``result.key_slices`` index into it and
    ``result.heatmaps`` line up with them. ``pictures``, when given, line up
    with them too: each is the key slice's picture drawn already, with the
    slice score of :func:`sc_slice_scores`, or None to draw it here.

    Raises:
        ValueError: not analysed, or key slices, references and heatmaps disagree.
    """
    check_key_slices(result, volume)
    if pictures and len(pictures) != len(result.key_slices):
        raise ValueError(f"{len(result.key_slices)} key slices but {len(pictures)} pictures")
    when = resolve_created(created)
    scores = sc_slice_scores(result)
    images = []
    for index, (slice_index, ref, heatmap) in enumerate(
        zip(result.key_slices, result.key_slice_refs, result.heatmaps, strict=True)
    ):
        images.append(
            write_sc_image(
                source,
                result,
                hu_slice=volume.pixels(slice_index),
                heatmap=heatmap,
                slice_ref=ref,
                index=index,
                analysis_version=analysis_version,
                slice_score=scores[index],
                created=when,
                picture=pictures[index] if pictures else None,
            )
        )
    logger.debug("wrote %d Grad-CAM images for series %s", len(images), source.SeriesInstanceUID)
    return images


def check_key_slices(result: AnalysisResult, volume: HUVolume) -> None:
    """Raise ``ValueError`` unless ``result`` has a Grad-CAM image to make of each key slice.

    Analysed, key slices inside ``volume``, one heatmap per key slice.
    """
    check_result(result)
    if not result.analysed:
        raise ValueError("no Grad-CAM images for a series that was not analysed")
    if len(result.heatmaps) != len(result.key_slices):
        raise ValueError(f"{len(result.key_slices)} key slices but {len(result.heatmaps)} heatmaps")
    for slice_index in result.key_slices:
        if not 0 <= slice_index < volume.hu.shape[0]:
            raise ValueError(f"key slice {slice_index} is outside the volume")


def patient_orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) of the rows and columns of the slice.

    From Image Orientation (Patient) of the source, classic or in the shared
    functional groups of an enhanced instance; an axial slice in the usual
    orientation gives ("L", "P"). Without geometry we assume that one, since
    only axial series are analysed.
    """
    iop = _image_orientation(source)
    if iop is None:
        return ("L", "P")
    return (_direction_letters(iop[:3]), _direction_letters(iop[3:]))


def _image_orientation(source: Dataset) -> list[float] | None:
    if "ImageOrientationPatient" in source:
        return [float(v) for v in source.ImageOrientationPatient]
    try:
        shared = source.SharedFunctionalGroupsSequence[0]
        return [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    except (AttributeError, IndexError, KeyError):
        return None


def _direction_letters(cosines: Sequence[float]) -> str:
    """The letter of the strongest axis of a direction (PS3.3 C.7.6.1.1.1).

    The standard allows several letters for oblique directions; highdicom
    accepts one, so an oblique slice is named by its main axis.
    """
    letters = [("L", "R"), ("P", "A"), ("H", "F")]
    axis = max(range(3), key=lambda a: abs(cosines[a]))
    return letters[axis][0 if cosines[axis] > 0 else 1]


def sc_slice_scores(result: AnalysisResult) -> list[float | None]:
    """The slice score each key image shows, in key-slice order: the verdict's
    column; Indeterminate has none, so each slice then shows its highest score."""
    column = result.labels.index(result.verdict) if result.verdict in result.labels else None
    return [_slice_score(result, slice_index, column) for slice_index in result.key_slices]


def _slice_score(result: AnalysisResult, slice_index: int, column: int | None) -> float | None:
    scores = result.slice_scores
    if scores.ndim != 2 or slice_index >= scores.shape[0]:
        return None
    if column is None:
        return float(scores[slice_index].max())
    return float(scores[slice_index, column]) if column < scores.shape[1] else None


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return text.encode("ascii", "replace").decode("ascii")
