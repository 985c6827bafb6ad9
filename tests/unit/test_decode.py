"""Decoding any accepted transfer syntax to HU, in slice order."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, JPEG2000Lossless, JPEGLosslessSV1

from lungnode.dicom.decode import (
    PADDING_HU,
    DecodeError,
    load_image,
    load_series,
    stream_series,
)
from lungnode.errors import LungnodeError
from tests.support.synthetic import make_ct_series, write_series
from tests.support.synthetic_codecs import SUPPORTED_TRANSFER_SYNTAXES, pixel_format_for

SIZE = 32
N = 4
Phantom = Callable[[int, int, int], Callable[[int], np.ndarray]]

#: Largest HU error each lossy syntax may add (see test_synthetic); lossless adds none.
TOLERANCE_HU = {
    "1.2.840.10008.1.2.4.50": 100.0,
    "1.2.840.10008.1.2.4.51": 16.0,
    "1.2.840.10008.1.2.4.81": 2.0,
    "1.2.840.10008.1.2.4.91": 50.0,
}


def _expected(slice_hu: Callable[[int], np.ndarray], tsyntax: UID, n: int = N) -> np.ndarray:
    fmt = pixel_format_for(tsyntax, None)
    hu = np.stack([slice_hu(k) for k in range(n)])
    stored = np.clip(np.rint((hu - fmt.intercept) / fmt.slope), fmt.min_stored, fmt.max_stored)
    return stored * fmt.slope + fmt.intercept


def _shuffled(paths: list[Path]) -> list[Path]:
    shuffled = list(paths)
    random.Random(4).shuffle(shuffled)
    assert shuffled != paths
    return shuffled


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
@pytest.mark.parametrize("tsyntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda t: t.keyword)
def test_every_transfer_syntax_decodes_to_hu_in_order(
    tsyntax: UID, enhanced: bool, tmp_path: Path, integer_phantom: Phantom
) -> None:
    slice_hu = integer_phantom(N, SIZE, SIZE)
    datasets = make_ct_series(
        N,
        rows=SIZE,
        columns=SIZE,
        transfer_syntax=tsyntax,
        slice_hu=slice_hu,
        enhanced=enhanced,
        frame_order=[2, 0, 3, 1] if enhanced else None,
    )
    paths = write_series(datasets, tmp_path)
    volume = load_series(paths if enhanced else _shuffled(paths))
    assert volume.hu.dtype == np.float32
    assert volume.hu.shape == (N, SIZE, SIZE)
    error = np.abs(volume.hu - _expected(slice_hu, tsyntax)).max()
    assert error <= TOLERANCE_HU.get(tsyntax, 0.0)
    positions = [s.position_mm for s in volume.slices]
    assert positions == sorted(positions)  # type: ignore[type-var]
    assert volume.slice_spacing_mm == pytest.approx(1.25)
    assert volume.pixel_spacing_mm == pytest.approx((0.7, 0.7))
    if enhanced:
        assert [s.frame_number for s in volume.slices] == [2, 4, 1, 3]
    else:
        by_uid = {ds.SOPInstanceUID: k for k, ds in enumerate(datasets)}
        assert [by_uid[s.sop_instance_uid] for s in volume.slices] == list(range(N))


@pytest.mark.parametrize("signed", [True, False])
def test_signed_and_unsigned_give_the_same_hu(
    signed: bool, tmp_path: Path, integer_phantom: Phantom
) -> None:
    slice_hu = integer_phantom(N, SIZE, SIZE)
    paths = write_series(
        make_ct_series(N, rows=SIZE, columns=SIZE, slice_hu=slice_hu, signed=signed), tmp_path
    )
    expected = np.clip(np.stack([slice_hu(k) for k in range(N)]), -1024, 3071)
    assert np.array_equal(load_series(paths).hu, expected)


def test_monochrome1_does_not_invert_hu(tmp_path: Path, integer_phantom: Phantom) -> None:
    """MONOCHROME1 inverts the display only (PS3.3 C.7.6.3.1.2), never HU."""
    slice_hu = integer_phantom(N, SIZE, SIZE)
    mono1 = make_ct_series(N, rows=SIZE, columns=SIZE, slice_hu=slice_hu, monochrome1=True)
    mono2 = make_ct_series(N, rows=SIZE, columns=SIZE, slice_hu=slice_hu)
    assert mono1[0].PhotometricInterpretation == "MONOCHROME1"
    hu1 = load_series(write_series(mono1, tmp_path / "1")).hu
    hu2 = load_series(write_series(mono2, tmp_path / "2")).hu
    assert np.array_equal(hu1, hu2)
    assert hu1[0, 0, 0] < -900  # air is still air


@pytest.mark.parametrize(("signed", "padding"), [(True, -2000), (False, 0)])
@pytest.mark.parametrize("enhanced", [False, True])
def test_pixel_padding_becomes_air(
    signed: bool, padding: int, enhanced: bool, tmp_path: Path, integer_phantom: Phantom
) -> None:
    slice_hu = integer_phantom(N, SIZE, SIZE)
    datasets = make_ct_series(
        N,
        rows=SIZE,
        columns=SIZE,
        slice_hu=slice_hu,
        signed=signed,
        padding_value=padding,
        enhanced=enhanced,
    )
    volume = load_series(write_series(datasets, tmp_path))
    assert volume.hu[:, 0, 0].tolist() == [PADDING_HU] * N  # corner: outside the FOV circle
    centre = SIZE // 2
    expected = np.clip(np.stack([slice_hu(k) for k in range(N)]), -1024, 3071)
    assert np.array_equal(volume.hu[:, centre, :], expected[:, centre, :])


def test_pixel_padding_range_limit(tmp_path: Path) -> None:
    (ds,) = make_ct_series(
        1, rows=SIZE, columns=SIZE, slice_hu=lambda k: np.full((SIZE, SIZE), 50.0)
    )
    stored = ds.pixel_array.copy()
    stored[0, :] = -3000
    stored[1, :] = -2500
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = -3000
    ds.PixelPaddingRangeLimit = -2000
    (path,) = write_series([ds], tmp_path)
    hu = load_image(path).hu[0]
    assert (hu[:2] == PADDING_HU).all()
    assert (hu[2:] == 50.0).all()


@pytest.mark.parametrize("per_frame_rescale", [False, True])
def test_enhanced_frames_sorted_by_position_not_frame_number(
    per_frame_rescale: bool, tmp_path: Path, integer_phantom: Phantom
) -> None:
    n = 6
    slice_hu = integer_phantom(n, SIZE, SIZE)
    order = [5, 2, 0, 4, 1, 3]
    datasets = make_ct_series(
        n,
        rows=SIZE,
        columns=SIZE,
        slice_hu=slice_hu,
        enhanced=True,
        frame_order=order,
        per_frame_rescale=per_frame_rescale,
        signed=False,
        transfer_syntax=JPEG2000Lossless,
    )
    (path,) = write_series(datasets, tmp_path)
    volume = load_image(path)
    assert np.array_equal(
        volume.hu, np.clip(np.stack([slice_hu(k) for k in range(n)]), -1024, None)
    )
    assert [s.frame_number for s in volume.slices] == [order.index(k) + 1 for k in range(n)]
    assert {s.sop_instance_uid for s in volume.slices} == {datasets[0].SOPInstanceUID}


def test_sorting_follows_the_slice_normal(tmp_path: Path) -> None:
    """With the column direction flipped, the normal points to the feet (PS3.3 C.7.6.2.1.1)."""
    datasets = make_ct_series(N, rows=SIZE, columns=SIZE)
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
    volume = load_series(_shuffled(write_series(datasets, tmp_path)))
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    uids = [s.sop_instance_uid for s in volume.slices]
    assert uids == [
        ds.SOPInstanceUID for ds in sorted(datasets, key=lambda d: -z[datasets.index(d)])
    ]


def test_without_geometry_falls_back_to_instance_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    datasets = make_ct_series(N, rows=SIZE, columns=SIZE)
    for ds in datasets:
        del ds.ImagePositionPatient
    with caplog.at_level(logging.WARNING, logger="lungnode.dicom.decode"):
        volume = load_series(_shuffled(write_series(datasets, tmp_path)))
    assert [s.sop_instance_uid for s in volume.slices] == [ds.SOPInstanceUID for ds in datasets]
    assert all(s.position_mm is None for s in volume.slices)
    assert volume.slice_spacing_mm is None
    assert "Instance Number" in caplog.text


def test_missing_rescale_keeps_stored_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (ds,) = make_ct_series(1, rows=SIZE, columns=SIZE, signed=False)
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    (path,) = write_series([ds], tmp_path)
    with caplog.at_level(logging.WARNING, logger="lungnode.dicom.frames"):
        hu = load_image(path).hu
    assert np.array_equal(hu[0], ds.pixel_array.astype(np.float32))
    assert "no Rescale" in caplog.text
    assert "Phantom" not in caplog.text and "SYN0001" not in caplog.text  # no PHI in logs


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_streamed_batches_make_up_the_volume(batch_size: int, tmp_path: Path) -> None:
    classic = write_series(make_ct_series(5, rows=SIZE, columns=SIZE), tmp_path / "c")
    enhanced = write_series(
        make_ct_series(
            5,
            rows=SIZE,
            columns=SIZE,
            enhanced=True,
            frame_order=[4, 3, 2, 1, 0],
            transfer_syntax=JPEGLosslessSV1,
        ),
        tmp_path / "e",
    )
    for paths in (_shuffled(classic), enhanced):
        seen: dict[int, np.ndarray] = {}

        def sink(first: int, hu: np.ndarray, seen: dict[int, np.ndarray] = seen) -> None:
            assert hu.dtype == np.float32 and 1 <= len(hu) <= batch_size
            seen[first] = hu.copy()

        volume, decode_index = stream_series(paths, sink, batch_size=batch_size)
        streamed = np.concatenate([seen[k] for k in sorted(seen)])
        assert np.array_equal(streamed[decode_index], volume.hu)
        reference = load_series(paths)
        assert np.array_equal(volume.hu, reference.hu) and volume.slices == reference.slices


def test_full_size_slice(tmp_path: Path) -> None:
    (path,) = write_series(make_ct_series(1, transfer_syntax=JPEGLosslessSV1), tmp_path)
    volume = load_image(path)
    assert volume.hu.shape == (1, 512, 512)
    assert volume.slices[0].frame_number is None
    assert volume.slice_spacing_mm is None


def test_unreadable_input_raises_decode_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(DecodeError, match="junk.dcm") as info:
        load_image(junk)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LungnodeError)
    with pytest.raises(DecodeError):
        load_series([])
    with pytest.raises(DecodeError):
        load_image(tmp_path / "missing.dcm")
    with pytest.raises(ValueError):
        stream_series([junk], None, batch_size=0)


def test_mixed_sizes_and_color_are_refused(tmp_path: Path) -> None:
    small = write_series(make_ct_series(1, rows=16, columns=16), tmp_path / "a")
    large = write_series(make_ct_series(1, rows=SIZE, columns=SIZE), tmp_path / "b")
    with pytest.raises(DecodeError, match="differ in size"):
        load_series(small + large)
    ds = pydicom.dcmread(small[0])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.save_as(small[0])
    with pytest.raises(DecodeError, match="samples per pixel"):
        load_image(small[0])


def test_corrupt_pixel_data_raises_decode_error(tmp_path: Path) -> None:
    (ds,) = make_ct_series(1, rows=SIZE, columns=SIZE, transfer_syntax=JPEGLosslessSV1)
    (path,) = write_series([ds], tmp_path)
    raw = bytearray(path.read_bytes())
    start = raw.rfind(b"\xff\xd8")  # the frame's JPEG SOI marker
    raw[start + 2 : start + 200] = b"\x00" * 198
    path.write_bytes(bytes(raw))
    with pytest.raises(DecodeError, match="cannot decode"):
        load_image(path)


def test_stream_series_hands_every_slice_to_the_sink_once(tmp_path: Path) -> None:
    classic = write_series(make_ct_series(7, rows=SIZE, columns=SIZE), tmp_path / "c")
    enhanced = write_series(
        make_ct_series(5, rows=SIZE, columns=SIZE, enhanced=True, frame_order=[4, 2, 0, 1, 3]),
        tmp_path / "e",
    )
    for paths in (_shuffled(classic), enhanced):
        seen: dict[int, np.ndarray] = {}

        def sink(first: int, hu: np.ndarray, seen: dict[int, np.ndarray] = seen) -> None:
            assert len(hu) <= 3
            seen[first] = hu.copy()  # a view: only valid during the call

        volume, decode_index = stream_series(paths, sink, batch_size=3)
        streamed = np.concatenate([seen[k] for k in sorted(seen)])
        assert streamed.shape == volume.hu.shape
        assert sorted(decode_index) == list(range(len(decode_index)))
        assert np.array_equal(streamed[decode_index], volume.hu)
        assert np.array_equal(volume.hu, load_series(paths).hu)


def test_stream_series_restarts_the_sink_for_a_late_multiframe_instance(tmp_path: Path) -> None:
    single = write_series(make_ct_series(2, rows=SIZE, columns=SIZE), tmp_path / "s")
    multi = write_series(make_ct_series(3, rows=SIZE, columns=SIZE, enhanced=True), tmp_path / "m")
    calls: list[int] = []
    seen: dict[int, np.ndarray] = {}

    def sink(first: int, hu: np.ndarray) -> None:
        calls.append(first)
        seen[first] = hu.copy()

    volume, decode_index = stream_series(single + multi, sink, batch_size=1)
    assert calls.count(0) == 2  # the single-frame pass, then the sorted pass
    streamed = np.concatenate([seen[k] for k in sorted(seen)])
    assert np.array_equal(streamed[decode_index], volume.hu)
    assert volume.hu.shape[0] == 5


@pytest.mark.parametrize(
    ("signed", "bits_stored"),
    [(True, 16), (False, 16), (False, 12)],
    ids=["signed-16", "unsigned-16", "unsigned-12-stored"],
)
def test_plain_16_bit_series_match_pydicom(signed: bool, bits_stored: int, tmp_path: Path) -> None:
    """Plain slices take ``dicom.native_slice``; the HU must be pydicom's, through the LUT."""
    datasets = make_ct_series(3, rows=SIZE, columns=SIZE, signed=signed)
    for ds in datasets:
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    paths = write_series(datasets, tmp_path)
    expected = np.stack(
        [
            pydicom.dcmread(p).pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for p in sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
        ]
    )
    assert np.array_equal(load_series(_shuffled(paths)).hu, expected.astype(np.float32))


def test_a_rescale_that_is_not_a_number_is_a_decode_error(tmp_path: Path) -> None:
    """The series' fault, so a "not analysed" answer; a bare ValueError would be a bug's."""
    (path,) = write_series(make_ct_series(1, rows=SIZE, columns=SIZE), tmp_path)
    raw = path.read_bytes()
    slope = raw.index(b"\x28\x00\x53\x10DS\x04\x00")  # (0028,1053) Rescale Slope, 4 bytes
    path.write_bytes(raw[: slope + 8] + b"abc " + raw[slope + 12 :])
    with pytest.raises(DecodeError, match="Rescale Slope/Intercept is not a number"):
        load_image(path)


@pytest.mark.parametrize("enhanced", [False, True])
def test_out_of_memory_while_decoding_is_not_the_files_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enhanced: bool
) -> None:
    """MemoryError is the node's fault: it must not become a DecodeError ("not analysed")."""
    from pydicom.uid import RLELossless

    import lungnode.dicom.decode as decode

    def exhausted(*args: object, **kwargs: object) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(decode, "pixel_array", exhausted)
    monkeypatch.setattr(decode, "iter_pixels", exhausted)
    paths = write_series(
        make_ct_series(2, rows=SIZE, columns=SIZE, transfer_syntax=RLELossless, enhanced=enhanced),
        tmp_path,
    )
    with pytest.raises(MemoryError):
        load_series(paths)


def _rle_overrun(tmp_path: Path, enhanced: bool) -> list[Path]:
    """RLE Lossless whose second segment holds a literal run far longer than the frame."""
    import struct

    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    datasets = make_ct_series(
        2 if enhanced else 1, rows=2, columns=2, transfer_syntax=RLELossless, enhanced=enhanced
    )
    # Two segments (high and low bytes of 4 pixels): 4 literal bytes, then 128 of them.
    header = struct.pack("<16I", 2, 64, 69, *([0] * 13))
    frame = header + b"\x03" + bytes(4) + b"\x7f" + bytes(128)
    for ds in datasets:
        ds.PixelData = encapsulate([frame] * int(ds.get("NumberOfFrames", 1)))
    return write_series(datasets, tmp_path)


@pytest.mark.parametrize("enhanced", [False, True])
def test_a_codec_panic_is_a_decode_error(tmp_path: Path, enhanced: bool) -> None:
    """Found by the fuzzing drill: on this RLE data pylibjpeg-rle (Rust) panics, which
    pyo3 raises as a BaseException: it went through ``except Exception`` and ended the
    worker thread (or the API's request) instead of answering "not analysed"."""
    paths = _rle_overrun(tmp_path, enhanced)
    with pytest.raises(DecodeError, match="cannot decode pixel data") as info:
        load_series(paths)
    assert type(info.value.__cause__).__name__ == "PanicException"


def test_a_stream_the_parser_cannot_read_is_a_decode_error(tmp_path: Path) -> None:
    """Found by the fuzzing drill: a truncated deflated data set made pydicom raise
    zlib.error, which went past DecodeError."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    series = make_ct_series(
        1, rows=SIZE, columns=SIZE, transfer_syntax=DeflatedExplicitVRLittleEndian
    )
    (path,) = write_series(series, tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(DecodeError, match="not a readable DICOM file"):
        load_image(path)


def test_a_header_value_the_parser_cannot_convert_is_a_decode_error(tmp_path: Path) -> None:
    """Found by the fuzzing drill: Pixel Spacing with an unknown VR made pydicom raise
    NotImplementedError when frames_of read it, which went past DecodeError. (Implicit
    VR Big Endian is no syntax the fast native reader takes, so pydicom reads it.)"""
    from pydicom.uid import ExplicitVRBigEndian

    series = make_ct_series(1, rows=SIZE, columns=SIZE, transfer_syntax=ExplicitVRBigEndian)
    (path,) = write_series(series, tmp_path)
    raw = path.read_bytes()
    spacing = raw.index(b"\x00\x28\x00\x30DS")  # (0028,0030) Pixel Spacing, big endian
    path.write_bytes(raw[: spacing + 4] + b"H\x02" + raw[spacing + 6 :])
    with pytest.raises(DecodeError, match="a header value cannot be read"):
        load_image(path)


@pytest.mark.parametrize("enhanced", [False, True])
def test_a_number_of_frames_beyond_the_file_is_a_decode_error(
    tmp_path: Path, enhanced: bool
) -> None:
    """Found while fuzzing: Number of Frames damaged into millions made frames_of build
    as many frames (minutes, gigabytes) before decoding found the pixels short; an
    upload could do that to the API."""
    (ds,) = make_ct_series(3 if enhanced else 1, rows=16, columns=16, enhanced=enhanced)
    ds.NumberOfFrames = 20_000_000
    (path,) = write_series([ds], tmp_path)
    with pytest.raises(DecodeError, match="Number of Frames 20000000 is more than the file"):
        load_image(path)
