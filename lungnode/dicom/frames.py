"""The frames of a CT instance, from its headers alone: what places each one in
the series and what turns its stored values into HU.

Per frame, the position and orientation (PS3.3 C.7.6.2.1.1) and the pixel
spacing, with the functional groups of a multi-frame image (C.7.6.16)
taken per frame over shared; the Rescale Slope and Intercept of the Modality
LUT (C.11.1.1.2); and Pixel Padding Value and Range Limit (C.7.5.1.1.2). A
plain slice that ``native_slice`` has read gives the same :class:`Frame` as
the pydicom ``Dataset`` of the same file. ``decode`` orders the frames and
decodes their pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from lungnode.dicom.native_slice import NativeSlice
from lungnode.errors import DecodeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """Everything needed to place and rescale one frame, read from headers only."""

    path: Path
    #: 0-based frame index in a multi-frame instance; None for single-frame.
    frame_index: int | None
    sop_instance_uid: str
    instance_number: int | None
    shape: tuple[int, int]
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slope: float | None
    intercept: float | None
    padding: tuple[int, int] | None
    #: Position along the slice normal in mm, set once the series is sorted.
    position_mm: float | None = None


def frames_of(path: Path, ds: Dataset) -> list[Frame]:
    """The frames of one instance, with per-frame values over shared ones.

    Raises:
        DecodeError: a header that does not describe a grey image, or a value that
            does not decode (pydicom converts each value when it is first read).
    """
    try:
        return _frames_of(path, ds)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:  # a damaged value can fail anywhere in its conversion
        raise DecodeError(f"{path.name}: a header value cannot be read: {exc}") from exc


def _frames_of(path: Path, ds: Dataset) -> list[Frame]:
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DecodeError(f"{path.name}: {ds.SamplesPerPixel} samples per pixel; CT is grayscale")
    try:
        shape = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError(f"{path.name}: Rows/Columns missing or invalid") from exc
    uid = str(ds.get("SOPInstanceUID", path.stem))
    instance_number = _int_or_none(ds.get("InstanceNumber"))
    padding = _padding(ds)
    n_frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if n_frames > 1 and n_frames > _most_frames(path, ds, shape):
        raise DecodeError(f"{path.name}: Number of Frames {n_frames} is more than the file holds")
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames == 1 and per_frame is None:
        slope, intercept = _rescale(ds, path)
        return [
            Frame(
                path,
                None,
                uid,
                instance_number,
                shape,
                _position(ds.get("ImagePositionPatient")),
                _floats(ds.get("ImageOrientationPatient"), 6),
                _spacing(ds.get("PixelSpacing")),
                slope,
                intercept,
                padding,
            )
        ]
    out = []
    for i in range(n_frames):
        item = per_frame[i] if per_frame is not None and i < len(per_frame) else None
        groups = [g for g in (item, shared) if g is not None]
        position = _group_value(groups, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _group_value(groups, "PixelMeasuresSequence", "PixelSpacing")
        transform = next(
            (
                _first_item(g, "PixelValueTransformationSequence")
                for g in groups
                if "PixelValueTransformationSequence" in g
            ),
            None,
        )
        slope, intercept = _rescale(transform if transform is not None else ds, path)
        out.append(
            Frame(
                path,
                i,
                uid,
                instance_number,
                shape,
                _position(position),
                _floats(
                    orientation if orientation is not None else ds.get("ImageOrientationPatient"), 6
                ),
                _spacing(spacing if spacing is not None else ds.get("PixelSpacing")),
                slope,
                intercept,
                padding,
            )
        )
    return out


def _most_frames(path: Path, ds: Dataset, shape: tuple[int, int]) -> int:
    """The most frames the file can hold: its size over the least size of one frame,
    the frame's pixels (native; deflate shrinks them at most 1032 times), or one 8-byte
    item header (encapsulated, PS3.5 A.4).

    A Number of Frames damaged into millions would otherwise make as many frames.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    known = syntax.is_transfer_syntax
    bits = _int_or_none(ds.get("BitsAllocated")) or 1
    least = max(1, shape[0] * shape[1] * bits // 8)
    if known and syntax.is_encapsulated:
        least = 8
    elif known and syntax.is_deflated:
        least = max(1, least // 1032)
    return path.stat().st_size // least


def native_frame(path: Path, native: NativeSlice) -> Frame:
    """The ``Frame`` of a slice read by ``native_slice``: what ``frames_of`` gives for it."""
    slope, intercept = _rescale_values(native.slope, native.intercept, native.rescale_type, path)
    return Frame(
        path,
        None,
        native.sop_instance_uid if native.sop_instance_uid is not None else path.stem,
        native.instance_number,
        (int(native.pixels.shape[0]), int(native.pixels.shape[1])),
        _position(native.position),
        _floats(native.orientation, 6),
        _spacing(native.pixel_spacing),
        slope,
        intercept,
        _padding_range(
            native.padding_value, native.padding_range_limit, signed=native.signed, bits=16
        ),
    )


def _rescale(source: Dataset, path: Path) -> tuple[float | None, float | None]:
    """Rescale Slope and Intercept (PS3.3 C.11.1.1.2), or None when absent."""
    slope, intercept = source.get("RescaleSlope"), source.get("RescaleIntercept")
    try:
        numbers = (
            None if slope is None else float(slope),
            None if intercept is None else float(intercept),
        )
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{path.name}: Rescale Slope/Intercept is not a number") from exc
    rescale_type = None if source.get("RescaleType") is None else str(source.RescaleType)
    return _rescale_values(*numbers, rescale_type, path)


def _rescale_values(
    slope: float | None, intercept: float | None, rescale_type: str | None, path: Path
) -> tuple[float | None, float | None]:
    if slope is None or intercept is None:
        logger.warning("%s: no Rescale Slope/Intercept; taking stored values as HU", path.name)
        return None, None
    if (rescale_type or "HU").upper() not in ("HU", ""):
        logger.warning("%s: Rescale Type is %s, not HU", path.name, rescale_type)
    return slope, intercept


def _padding(ds: Dataset) -> tuple[int, int] | None:
    """Pixel Padding Value (and Range Limit) in stored-value units (PS3.3 C.7.5.1.1.2)."""
    return _padding_range(
        _int_or_none(ds.get("PixelPaddingValue")),
        _int_or_none(ds.get("PixelPaddingRangeLimit")),
        signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
        bits=int(ds.get("BitsAllocated", 16) or 16),
    )


def _padding_range(
    value: int | None, limit: int | None, *, signed: bool, bits: int
) -> tuple[int, int] | None:
    """The padding range, low to high; a value read with the wrong one of US/SS is folded.

    The VR is US or SS by Pixel Representation; a value read as unsigned
    for signed pixels is folded back into the signed range.
    """
    if value is None:
        return None

    def fold(v: int) -> int:
        return v - (1 << bits) if signed and v >= 1 << (bits - 1) else v

    low, high = fold(value), fold(limit if limit is not None else value)
    return (min(low, high), max(low, high))


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group_value(groups: Sequence[Dataset], sequence: str, keyword: str) -> Any:
    for group in groups:
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _position(value: Any) -> tuple[float, float, float] | None:
    numbers = _floats(value, 3)
    return None if numbers is None else (numbers[0], numbers[1], numbers[2])


def _spacing(value: Any) -> tuple[float, float] | None:
    numbers = _floats(value, 2)
    return None if numbers is None else (numbers[0], numbers[1])


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
