"""The Grad-CAM maps as a Parametric Map, in the CT's Frame of Reference.

The Secondary Capture images (``writers.sc``) show the heatmaps to a person;
this object gives them to a machine, as IHE AI Results (AIR) asks of an AI
parametric result: a Parametric Map (PS3.3 A.75) whose float pixels are the
Grad-CAM values and whose geometry is the CT's, so that a viewer can fuse it
over the CT and a program can find where the model looked in patient
coordinates. It is built by :class:`highdicom.pm.ParametricMap`.

- One frame per key slice. Grad-CAM is computed for the key slices only
  (``pipeline.analyze``), so no other slice has a map; a frame of zeros
  would claim that the model paid no attention there, which nobody measured.
  highdicom orders the frames along the slice normal (PS3.3 C.7.6.17.3,
  Dimension Organization by plane position), not in key-slice order.
- Float Pixel Data (7FE0,0008), 32-bit (PS3.3 C.7.6.24, Floating Point Image
  Pixel module), at the slice's rows and columns, values in [0, 1].
- Geometry (PS3.3 C.7.6.16.2.3-4, Plane Position and Plane Orientation
  functional groups; C.7.6.16.2.1 Pixel Measures) and the Frame of Reference
  UID (C.7.4.1) are those of the CT slices beneath the frames, so pixel
  (r, c) of a frame lies where pixel (r, c) of its CT slice lies (the
  equation of PS3.3 C.7.6.2.1.1).
- Real World Value Mapping (PS3.3 C.7.6.16.2.11): stored values map 1:1 to
  unitless (UCUM "1") values in [0, 1], whose quantity is
  (130403, DCM, "Gradient-weighted class activation") of CID 217 "Visual
  Explanation", which names exactly this.
- Derivation (PS3.3 C.7.6.16.2.6): each frame's Derivation Image Sequence
  and the Source Image Sequence reference the CT instance (and frame) of its
  key slice, with a Derivation Description naming the model.
- Contributing Equipment (PS3.3 C.12.1) names the model; the demo model's
  synthetic notice is in Image Comments and in the Content Description.

A multi-frame (Enhanced CT) source works too: its key frames are found by
their per-frame plane positions, all in that one instance. highdicom reads
the orientation and pixel measures of such a source from its Shared
Functional Groups only (as Enhanced CT of one stack writes them); one that
has them per frame raises ``ValueError``. A result that
was not analysed, has no key slices or heatmaps, or whose slices lack
geometry raises ``ValueError``: a map that cannot be placed on the CT is no
map, and the caller then writes none.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from lungnode import __version__
from lungnode.dicom.uids import OutputSeries
from lungnode.dicom.writers.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    SYNTHETIC_NOTICE,
    algorithm_equipment,
    check_result,
    check_source,
    explained_class,
    model_text,
    resolve_created,
)
from lungnode.domain import AnalysisResult, SliceRef

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "LUNGNODE Grad-CAM map"
#: Content Label (CS, PS3.3 C.10.9): upper case, digits, space and underscore.
CONTENT_LABEL = "GRADCAM"
#: LUT Label (SH) of the one Real World Value Mapping.
LUT_LABEL = "GRADCAM"
#: (130403, DCM, "Gradient-weighted class activation"), CID 217.
QUANTITY = codes.DCM.GradientWeightedClassActivation
#: UCUM "1": a unitless ratio (CID 7181).
UNIT = codes.UCUM.NoUnits

_GEOMETRY = ("FrameOfReferenceUID", "Rows", "Columns")


def write_parametric_map(
    source_headers: Sequence[Dataset],
    result: AnalysisResult,
    *,
    analysis_version: int,
    created: _dt.datetime | None = None,
) -> Dataset:
    """A Parametric Map of the key slices' Grad-CAM maps; valid or raise.

    ``source_headers`` are the headers (pixel data not needed) of the CT
    instances of the key slices, in key-slice order; they are matched to
    ``result.key_slice_refs`` by SOP Instance UID, so repeats and extra
    headers of the same series do no harm. For an Enhanced CT source this is
    the one multi-frame instance.

    Raises:
        ValueError: not analysed, no key slices, a key slice without its
            header or geometry, a heatmap of the wrong size or not finite,
            or highdicom rejects the content.
    """
    check_result(result)
    if not result.analysed:
        raise ValueError("no Grad-CAM map for a series that was not analysed")
    if not result.key_slices:
        raise ValueError("no Grad-CAM map without key slices")
    if len(result.heatmaps) != len(result.key_slices):
        raise ValueError(f"{len(result.key_slices)} key slices but {len(result.heatmaps)} heatmaps")
    if not source_headers:
        raise ValueError("no source headers for the key slices")
    for header in source_headers:
        check_source(header)
    by_uid = {str(header.SOPInstanceUID): header for header in source_headers}
    frames = _frames(result, by_uid)
    instances = list(
        {ref.sop_instance_uid: by_uid[ref.sop_instance_uid] for ref, _ in frames}.values()
    )
    first = instances[0]
    _check_geometry(instances, frames)
    when = resolve_created(created)
    output = OutputSeries.for_model(
        str(first.SeriesInstanceUID), result.model, analysis_version, "pm"
    )
    explained = explained_class(result)
    derivation = f"Grad-CAM of {explained} by {model_text(result.model)}"[:1024]
    description = "Grad-CAM attention" + (
        ", synthetic phantom model" if result.model.synthetic else ""
    )
    mapping = RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation="Grad-CAM attention, 0 (none) to 1 (most)",
        unit=UNIT,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=QUANTITY,
    )
    pixels = np.stack([heat for _, heat in frames]).astype(np.float32)
    try:
        pm = ParametricMap(
            source_images=instances,
            pixel_array=pixels,
            series_instance_uid=output.series_instance_uid,
            series_number=output.series_number,
            sop_instance_uid=output.sop_instance_uid(0),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="lungnode",
            software_versions=__version__,
            # Type 1 in Enhanced General Equipment (PS3.3 C.7.5.2); software
            # has no serial number, so the release stands in for one.
            device_serial_number=f"{MANUFACTURER} {__version__}",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            content_label=CONTENT_LABEL,
            content_description=description,
            plane_positions=[
                _plane_position(by_uid[ref.sop_instance_uid], ref) for ref, _ in frames
            ],
            contributing_equipment=[
                algorithm_equipment(result.model, when, f"Grad-CAM attention map of {explained}")
            ],
            series_description=SERIES_DESCRIPTION,
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
        )
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        raise ValueError(f"cannot build the Parametric Map: {exc}") from exc
    _check_derivations(pm, len(frames))
    pm.InstanceCreationDate = DA(when.date())
    pm.InstanceCreationTime = TM(when.time())
    for group in pm.PerFrameFunctionalGroupsSequence:
        for item in group.DerivationImageSequence:
            item.DerivationDescription = derivation
    comments = f"{NOT_FOR_DIAGNOSTIC_USE}. {derivation}. Verdict: {result.verdict_text()}"
    if result.model.synthetic:
        comments += f". {SYNTHETIC_NOTICE}"
    pm.ImageComments = comments
    # General Series: the chest is no paired body part, so Laterality (type 2C,
    # PS3.3 C.7.3.1) stays absent, as in ``writers.sc``.
    pm.BodyPartExamined = first.get("BodyPartExamined") or "CHEST"
    logger.debug(
        "wrote a Grad-CAM map of %d frames for series %s", len(frames), first.SeriesInstanceUID
    )
    return pm


def _frames(
    result: AnalysisResult, by_uid: dict[str, Dataset]
) -> list[tuple[SliceRef, np.ndarray]]:
    """(reference, heatmap) of each distinct key slice, in key-slice order."""
    frames: dict[tuple[str, int | None], tuple[SliceRef, np.ndarray]] = {}
    for ref, heat in zip(result.key_slice_refs, result.heatmaps, strict=True):
        if ref.sop_instance_uid not in by_uid:
            raise ValueError(f"no source header for key slice instance {ref.sop_instance_uid}")
        header = by_uid[ref.sop_instance_uid]
        shape = (int(header.get("Rows") or 0), int(header.get("Columns") or 0))
        if heat.shape != shape:
            raise ValueError(f"a heatmap of {heat.shape} for a slice of {shape}")
        values = np.asarray(heat, dtype=np.float32)
        if not np.isfinite(values).all():
            raise ValueError("a heatmap holds values that are not finite")
        frames.setdefault(
            (ref.sop_instance_uid, ref.frame_number), (ref, np.clip(values, 0.0, 1.0))
        )
    return list(frames.values())


def _check_geometry(instances: list[Dataset], frames: list[tuple[SliceRef, np.ndarray]]) -> None:
    """Raise ``ValueError`` unless the slices can be placed in one Frame of Reference."""
    for header in instances:
        missing = [kw for kw in _GEOMETRY if not header.get(kw)]
        if _is_multiframe(header):
            if len(instances) > 1:
                raise ValueError("key slices in several multi-frame instances")
        else:
            missing += [
                kw
                # Slice Thickness is type 2 in a CT image, but the map's Pixel Measures
                # need a value (highdicom copies it from the source).
                for kw in (
                    "ImagePositionPatient",
                    "ImageOrientationPatient",
                    "PixelSpacing",
                    "SliceThickness",
                )
                if not header.get(kw)
            ]
        if missing:
            raise ValueError(f"a key slice has no geometry: {', '.join(missing)} missing")
    if len({str(h.FrameOfReferenceUID) for h in instances}) > 1:
        raise ValueError("the key slices are in more than one Frame of Reference")
    for ref, _ in frames:
        if _is_multiframe(instances[0]) and ref.frame_number is None:
            raise ValueError("a key slice of a multi-frame instance has no frame number")


def _plane_position(header: Dataset, ref: SliceRef) -> hd.PlanePositionSequence:
    """Plane Position (Patient) of the key slice (PS3.3 C.7.6.16.2.3)."""
    if _is_multiframe(header):
        assert ref.frame_number is not None  # _check_geometry
        number = int(header.NumberOfFrames)
        if not 1 <= ref.frame_number <= number:
            raise ValueError(f"frame {ref.frame_number} of an instance of {number} frames")
        group = header.PerFrameFunctionalGroupsSequence[ref.frame_number - 1]
        if "PlanePositionSequence" in group:
            position = group.PlanePositionSequence[0].ImagePositionPatient
        else:
            shared = header.SharedFunctionalGroupsSequence[0]
            position = shared.PlanePositionSequence[0].ImagePositionPatient
    else:
        position = header.ImagePositionPatient
    return hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in position],
    )


def _check_derivations(pm: Dataset, n_frames: int) -> None:
    """Raise unless highdicom tied every frame to its CT slice (same place, same grid).

    highdicom references the source per frame only when the frame's plane
    position, orientation, spacing and size match a source slice; without
    that the map would not lie on the CT.
    """
    groups = pm.PerFrameFunctionalGroupsSequence
    if len(groups) != n_frames or any("DerivationImageSequence" not in g for g in groups):
        raise ValueError("the Grad-CAM frames do not lie on the CT slices")
    for group in groups:
        if not group.DerivationImageSequence:
            raise ValueError("a Grad-CAM frame does not lie on a CT slice")


def _is_multiframe(header: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in header
