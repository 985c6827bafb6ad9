"""Pixel data of any accepted transfer syntax -> Hounsfield units.

The model needs HU, not stored values, and a series arrives in whatever order
and encoding the sender chose. A series of single-frame
instances (the usual CT series) is read once: each file's pixels are turned
into HU in one preallocated float32 volume in arrival order, and the slices
are then put in order along the slice normal in place. Multi-frame instances
are read twice instead (geometry of every frame from the headers first, then
the pixels straight into their sorted place), so a series never exists twice
in memory either way.

Decoding itself is pydicom's, with its pylibjpeg, pyjpegls and openjpeg
plugins; what is added here is the CT-specific part: slice order
(PS3.3 C.7.6.2.1.1), and the Modality LUT (C.11.1) and pixel padding
(C.7.5.1.1.2) applied to the pixels. What places and rescales each frame,
the functional groups of multi-frame images (C.7.6.16) included, is read
from the headers by ``dicom.frames``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.utils import iter_pixels, pixel_array

from lungnode.dicom import page_cache
from lungnode.dicom.frames import Frame, frames_of, native_frame
from lungnode.dicom.native_slice import read_native_slice
from lungnode.domain import HUVolume, SliceRef
from lungnode.errors import DecodeError
from lungnode.imaging.geometry import SliceStack, slice_stack

logger = logging.getLogger(__name__)

__all__ = [
    "PADDING_HU",
    "DecodeError",
    "SliceSink",
    "decode_slice",
    "load_image",
    "load_series",
    "order_frames",
    "slice_ref",
    "stream_series",
    "volume_of",
]

#: HU written where Pixel Padding Value marks a pixel as outside the image
#: (PS3.3 C.7.5.1.1.2): air, so padding looks like what surrounds the patient.
PADDING_HU = -1024.0


def load_series(paths: Sequence[Path]) -> HUVolume:
    """Decode a series into one HU volume, sorted along the slice normal.

    Accepts single-frame and multi-frame instances (or a mix); each frame
    becomes one slice.

    Raises:
        DecodeError: no input, an unreadable file, unsupported pixel data, or
            frames of different sizes.
    """
    return stream_series(paths, None)[0]


#: Receives decoded HU slices as ``sink(first, hu)``: ``hu`` (k, rows, cols)
#: are slices ``first .. first + k - 1`` in decode order. ``hu`` is a view
#: into the volume being built, valid only during the call.
SliceSink = Callable[[int, np.ndarray], None]


def stream_series(
    paths: Sequence[Path], sink: SliceSink | None, batch_size: int = 32
) -> tuple[HUVolume, list[int]]:
    """``load_series`` that also hands slices to ``sink`` as soon as they are decoded.

    A consumer (the model) can then work on the first slices while later
    files are still being read. Slices reach ``sink`` ``batch_size`` at a
    time in *decode order*, which is the order of ``paths`` for single-frame
    instances; returned with the sorted volume is ``decode_index``: sorted
    slice ``k`` is slice ``decode_index[k]`` of what the sink saw.

    A series with a multi-frame instance is decoded in sorted order instead.
    Where one turns up after single-frame instances, decoding starts over and
    the sink sees slices from 0 again: a sink should key what it keeps on
    ``first``, so that the second pass replaces the first.

    Raises:
        DecodeError: as ``load_series``; and whatever ``sink`` raises.
    """
    if not paths:
        raise DecodeError("no DICOM files given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    single = _load_single_frames([Path(p) for p in paths], sink, batch_size)
    if single is not None:
        return single
    frames, stack = _sorted_frames(paths)
    rows, columns = frames[0].shape
    volume = np.empty((len(frames), rows, columns), dtype=np.float32)
    by_path: dict[Path, list[tuple[int, Frame]]] = {}
    for out_index, frame in enumerate(frames):
        by_path.setdefault(frame.path, []).append((out_index, frame))
    for path, placed in by_path.items():
        ds = _read(path, pixels=True)
        if placed[0][1].frame_index is None:
            out_index, frame = placed[0]
            _to_hu(_decode(ds, path, None), frame, volume[out_index])
            continue
        wanted = {frame.frame_index: (out_index, frame) for out_index, frame in placed}
        for frame_index, stored in enumerate(_decode_frames(ds, path)):
            if frame_index in wanted:
                out_index, frame = wanted[frame_index]
                _to_hu(stored, frame, volume[out_index])
    # Multi-frame pixels land in sorted places, so the sink sees sorted order.
    if sink is not None:
        for start in range(0, len(frames), batch_size):
            sink(start, volume[start : start + batch_size])
    return volume_of(volume, frames, stack), list(range(len(frames)))


def load_image(path: Path) -> HUVolume:
    """Decode one DICOM file (single-frame or multi-frame) into HU."""
    return load_series([path])


# -- headers and order -------------------------------------------------------


def _sorted_frames(paths: Sequence[Path]) -> tuple[list[Frame], SliceStack]:
    """Every frame of every file (headers only), in slice order (see ``_slice_order``)."""
    if not paths:
        raise DecodeError("no DICOM files given")
    frames: list[Frame] = []
    for path in paths:
        frames.extend(frames_of(Path(path), _read(Path(path), pixels=False)))
    stack = _slice_order(frames)
    return _placed(frames, stack), stack


def _load_single_frames(
    paths: Sequence[Path], sink: SliceSink | None, batch_size: int
) -> tuple[HUVolume, list[int]] | None:
    """One read per file for a series of single-frame instances; None on a multi-frame one.

    Reading headers and pixels in one go halves the parsing of a series
    (measured: header parsing was half of the decode time of a 300-slice
    series), and plain uncompressed slices skip pydicom altogether
    (``dicom.native_slice``). Slices are decoded in the order given, handed
    to ``sink`` a batch at a time, and then permuted in place along the
    slice normal, one slice of scratch memory at a time.
    """
    frames: list[Frame] = []
    volume: np.ndarray | None = None
    flushed = 0
    for index, path in enumerate(paths):
        read = _read_single_frame(path)
        if read is None:
            return None
        frame, stored = read
        if volume is None:
            volume = np.empty((len(paths), *frame.shape), dtype=np.float32)
        elif frame.shape != volume.shape[1:]:
            shapes = sorted({frame.shape, (int(volume.shape[1]), int(volume.shape[2]))})
            raise DecodeError(f"frames differ in size {shapes}; they cannot form one volume")
        _to_hu(stored, frame, volume[index])
        frames.append(frame)
        if sink is not None and (index + 1 - flushed == batch_size or index + 1 == len(paths)):
            sink(flushed, volume[flushed : index + 1])
            flushed = index + 1
    assert volume is not None  # paths is not empty
    stack = _slice_order(frames)
    _permute_in_place(volume, stack.order)
    ordered = _placed(frames, stack)
    return volume_of(volume, ordered, stack), list(stack.order)


def _read_single_frame(path: Path) -> tuple[Frame, np.ndarray] | None:
    """(frame, stored values) of a single-frame instance; None for a multi-frame one.

    The file is read whole, so its pages leave the page cache (``dicom.page_cache``).
    """
    try:
        native = read_native_slice(path)
        if native is not None:
            return native_frame(path, native), native.pixels
        ds = _read(path, pixels=True)
    finally:
        page_cache.drop(path)
    found = frames_of(path, ds)
    if len(found) != 1 or found[0].frame_index is not None:
        return None
    return found[0], _decode(ds, path, None)


def decode_slice(path: Path) -> tuple[Frame, np.ndarray] | None:
    """One single-frame instance as (its frame, its HU slice, float32); None for a
    multi-frame instance.

    The same reading and Modality LUT as ``load_series``: a slice decoded here
    alone holds exactly the HU it holds in its series' volume.

    Raises:
        DecodeError: an unreadable file or undecodable pixel data.
    """
    read = _read_single_frame(path)
    if read is None:
        return None
    frame, stored = read
    hu = np.empty(frame.shape, dtype=np.float32)
    _to_hu(stored, frame, hu)
    return frame, hu


def order_frames(frames: Sequence[Frame]) -> tuple[list[Frame], SliceStack]:
    """``frames`` in slice order, each with its position along the normal, and their stack.

    The order ``load_series`` sorts a volume in (``_slice_order``): sorted
    frame ``k`` is ``frames[stack.order[k]]``.

    Raises:
        DecodeError: frames of different sizes.
    """
    stack = _slice_order(frames)
    return _placed(frames, stack), stack


def volume_of(
    hu: np.ndarray,
    ordered: Sequence[Frame],
    stack: SliceStack,
    decoded_slices: frozenset[int] | None = None,
) -> HUVolume:
    """The HU volume of ``ordered`` frames (in slice order) with their stack's geometry."""
    return HUVolume(
        hu=hu,
        slices=[slice_ref(frame) for frame in ordered],
        pixel_spacing_mm=ordered[0].pixel_spacing,
        slice_spacing_mm=stack.spacing_mm,
        slice_normal=stack.normal,
        decoded_slices=decoded_slices,
    )


def _permute_in_place(volume: np.ndarray, order: Sequence[int]) -> None:
    """Make ``volume[k]`` the old ``volume[order[k]]`` without a copy of the volume.

    Follows each cycle of the permutation with one slice of scratch memory.
    """
    done = np.zeros(len(order), dtype=bool)
    scratch = np.empty(volume.shape[1:], dtype=volume.dtype)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        scratch[...] = volume[start]
        k = start
        while order[k] != start:
            volume[k] = volume[order[k]]
            done[k] = True
            k = order[k]
        volume[k] = scratch
        done[k] = True


def _slice_order(frames: Sequence[Frame]) -> SliceStack:
    """The frames as one stack (``imaging.geometry.slice_stack``), in slice order.

    Order is the projection of Image Position (Patient) on the slice normal,
    the cross product of the row and column direction cosines (PS3.3
    C.7.6.2.1.1): ascending, so an axial series runs feet to head. Without
    geometry on every frame the order falls back to Instance Number, then
    frame number, and there are no positions.
    """
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise DecodeError(f"frames differ in size {sorted(shapes)}; they cannot form one volume")
    stack = slice_stack([f.position for f in frames], [f.orientation for f in frames])
    if stack.positions_mm is not None:
        if not stack.orientations_agree:
            logger.warning("orientation differs between slices; sorting on the first normal")
        if stack.shared_positions:
            logger.warning("series has %d slices at duplicate positions", stack.shared_positions)
        return stack
    if len(frames) > 1:
        logger.warning("slice geometry missing; ordering %d frames by Instance Number", len(frames))
    big = 1 << 62
    order = sorted(
        range(len(frames)),
        key=lambda i: (
            frames[i].instance_number if frames[i].instance_number is not None else big,
            frames[i].frame_index or 0,
        ),
    )
    return dataclasses.replace(stack, order=tuple(order))


def _placed(frames: Sequence[Frame], stack: SliceStack) -> list[Frame]:
    """``frames`` in stack order, each with its position along the normal (if known)."""
    positions = stack.positions_mm or (None,) * len(stack.order)
    return [
        frames[i] if k is None else dataclasses.replace(frames[i], position_mm=k)
        for i, k in zip(stack.order, positions, strict=True)
    ]


# -- pixels -----------------------------------------------------------------


def _read(path: Path, *, pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except MemoryError:
        raise
    except Exception as exc:  # a damaged file can fail anywhere in the parser
        raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from exc


def _codec_failure(exc: BaseException) -> bool:
    """Whether ``exc`` from a codec is the file's fault: any Exception but MemoryError
    (the node's: the job is retried, not answered), and the panic of a codec written in
    Rust (pylibjpeg-rle), which pyo3 raises as a BaseException on corrupt data."""
    if isinstance(exc, MemoryError):
        return False
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _decode(ds: Dataset, path: Path, frame_index: int | None) -> np.ndarray:
    try:
        return pixel_array(ds, index=frame_index)
    except BaseException as exc:
        if not _codec_failure(exc):
            raise
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DecodeError(f"{path.name}: cannot decode pixel data ({ts}): {exc}") from exc


def _decode_frames(ds: Dataset, path: Path) -> Iterator[np.ndarray]:
    """The frames of a multi-frame instance one at a time; codec failures as ``_decode``."""
    try:
        yield from iter_pixels(ds)
    except BaseException as exc:  # GeneratorExit (closed early) is no codec failure
        if not _codec_failure(exc):
            raise
        raise DecodeError(f"{path.name}: cannot decode pixel data: {exc}") from exc


def _to_hu(stored: np.ndarray, frame: Frame, out: np.ndarray) -> None:
    """Stored values -> HU into ``out`` (float32), through the Modality LUT.

    Photometric Interpretation is not applied: MONOCHROME1 inverts the display
    after the VOI LUT (PS3.3 C.7.6.3.1.2), while HU come from the Modality
    LUT alone, so they are the same for MONOCHROME1 and MONOCHROME2.
    """
    if stored.shape != out.shape:
        raise DecodeError(f"{frame.path.name}: decoded shape {stored.shape}, expected {out.shape}")
    if frame.slope is None or frame.intercept is None:
        out[...] = stored
    elif frame.slope == 1.0:  # the usual CT case: one pass over the slice
        np.add(stored, np.float32(frame.intercept), out=out, casting="unsafe")
    else:
        np.multiply(stored, np.float32(frame.slope), out=out, casting="unsafe")
        out += np.float32(frame.intercept)
    if frame.padding is not None:
        low, high = frame.padding
        out[(stored >= low) & (stored <= high)] = PADDING_HU


# -- small helpers ------------------------------------------------------------


def slice_ref(frame: Frame) -> SliceRef:
    """The reference results keep to the slice ``frame`` is."""
    return SliceRef(
        sop_instance_uid=frame.sop_instance_uid,
        frame_number=None if frame.frame_index is None else frame.frame_index + 1,
        position_mm=frame.position_mm,
    )
