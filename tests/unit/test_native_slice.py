"""The fast reader of plain CT slices agrees with pydicom, or hands the file to it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, JPEGLosslessSV1, RLELossless

from lungnode.dicom import decode, frames
from lungnode.dicom.native_slice import read_native_slice
from tests.support.synthetic import make_ct_series, write_series

SIZE = 24


def _nested_sequence() -> Sequence:
    """A two-level sequence, which pydicom writes with undefined lengths."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x" * 7
    outer = Dataset()
    outer.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    outer.ReferencedSOPInstanceUID = "1.2.3.4"
    outer.PurposeOfReferenceCodeSequence = Sequence([inner])
    return Sequence([outer, outer])


def _variant(name: str, tsyntax: str = pydicom.uid.ExplicitVRLittleEndian) -> list[Dataset]:
    signed = name not in ("unsigned", "unsigned-12-dirty")
    datasets = make_ct_series(3, rows=SIZE, columns=SIZE, transfer_syntax=tsyntax, signed=signed)
    for ds in datasets:
        ds.ReferencedImageSequence = _nested_sequence()
        if name == "padding":
            ds.PixelPaddingValue = int(ds.pixel_array.min())
            ds.PixelPaddingRangeLimit = int(ds.pixel_array.min()) + 20
        elif name == "no-rescale":
            del ds.RescaleSlope, ds.RescaleIntercept
        elif name == "slope":
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 0.5, -1000, "US"
        elif name == "no-geometry":
            del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
        elif name in ("unsigned-12-dirty", "signed-12-dirty"):
            # Values fit in 12 bits; the unused high bits hold garbage that
            # decoding must ignore (PS3.5 8.1.1).
            stored = ds.pixel_array.astype(np.int32) & 0x0FFF
            if name == "signed-12-dirty":
                stored = np.where(stored >= 0x800, stored - 0x1000, stored)
            dirty = (stored & 0x0FFF) | 0x5000
            ds.PixelData = dirty.astype(np.uint16).tobytes()
            ds.BitsStored, ds.HighBit = 12, 11
    return datasets


VARIANTS = [
    "signed",
    "unsigned",
    "padding",
    "no-rescale",
    "slope",
    "no-geometry",
    "unsigned-12-dirty",
    "signed-12-dirty",
]


@pytest.mark.parametrize("tsyntax", [pydicom.uid.ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("variant", VARIANTS)
def test_native_reader_agrees_with_pydicom(variant: str, tsyntax: str, tmp_path: Path) -> None:
    paths = write_series(_variant(variant, tsyntax), tmp_path)
    for path in paths:
        native = read_native_slice(path)
        assert native is not None, f"{variant} should take the fast path"
        ds = pydicom.dcmread(path)
        (expected,) = frames.frames_of(path, ds)
        assert frames.native_frame(path, native) == expected
        assert native.pixels.dtype == ds.pixel_array.dtype
        assert np.array_equal(native.pixels, ds.pixel_array)


def test_a_series_of_plain_slices_never_calls_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_series(_variant("padding"), tmp_path)
    expected = decode.load_series(paths)

    def refuse(*args: object, **kwargs: object) -> Dataset:
        raise AssertionError("pydicom.dcmread was called for a plain slice")

    monkeypatch.setattr(decode.pydicom, "dcmread", refuse)
    volume = decode.load_series(paths)
    assert np.array_equal(volume.hu, expected.hu)
    assert volume.slices == expected.slices


@pytest.mark.parametrize(
    "change",
    ["jpeg-lossless", "rle", "enhanced", "eight-bit", "truncated", "no-preamble", "bad-number"],
)
def test_anything_else_goes_to_pydicom(change: str, tmp_path: Path) -> None:
    tsyntax = {"jpeg-lossless": JPEGLosslessSV1, "rle": RLELossless}.get(
        change, pydicom.uid.ExplicitVRLittleEndian
    )
    datasets = make_ct_series(
        2, rows=SIZE, columns=SIZE, transfer_syntax=tsyntax, enhanced=change == "enhanced"
    )
    if change == "eight-bit":
        for ds in datasets:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = np.zeros((SIZE, SIZE), np.uint8).tobytes()
    path = write_series(datasets, tmp_path)[0]
    if change == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    if change == "bad-number":  # Image Position (Patient) whose first digit is not one
        data = bytearray(path.read_bytes())
        value = data.index(b"\x20\x00\x32\x00DS") + 8
        data[value] = ord("x")
        path.write_bytes(bytes(data))
    if change == "no-preamble":  # file meta and dataset, without the 128 bytes and "DICM"
        path.write_bytes(path.read_bytes()[132:])
    assert read_native_slice(path) is None
    assert read_native_slice(tmp_path / "missing.dcm") is None


def test_private_un_element_of_undefined_length_is_skipped(tmp_path: Path) -> None:
    """An undefined-length UN holds implicit VR items (PS3.5 6.2.2); skip them whole."""
    path = write_series(make_ct_series(1, rows=SIZE, columns=SIZE), tmp_path)[0]
    data = path.read_bytes()
    at = data.index(b"\x10\x00\x10\x00PN")  # Patient Name opens group 0010
    private = (
        b"\x09\x00\x10\x00LO\x02\x00X "  # private creator
        + b"\x09\x00\x01\x10UN\x00\x00\xff\xff\xff\xff"  # UN, undefined length
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # item, undefined length
        + b"\x08\x00\x00\x01\x02\x00\x00\x00AB"  # implicit VR element inside
        + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # item delimitation
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # sequence delimitation
    )
    path.write_bytes(data[:at] + private + data[at:])
    native = read_native_slice(path)
    assert native is not None
    ds = pydicom.dcmread(path)
    assert (0x0009, 0x1001) in ds
    assert frames.native_frame(path, native) == frames.frames_of(path, ds)[0]
    assert np.array_equal(native.pixels, ds.pixel_array)


def _pydicom_test_files() -> list[Path]:
    import pydicom.data

    root = Path(pydicom.data.__file__).parent
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in ("", ".dcm"))


def test_every_file_pydicom_ships_that_the_fast_path_takes_decodes_the_same() -> None:
    """The real-world files bundled with pydicom (exports of several vendors' scanners)."""
    taken = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of these files carry invalid values on purpose
        for path in _pydicom_test_files():
            native = read_native_slice(path)
            if native is None:
                continue
            taken += 1
            ds = pydicom.dcmread(path)
            found = frames.frames_of(path, ds)
            assert found == [frames.native_frame(path, native)], path.name
            assert np.array_equal(native.pixels, ds.pixel_array), path.name
    assert taken >= 10  # CT_small.dcm, MR_small.dcm and their kin


def test_a_compressed_file_is_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its file meta says so; pydicom then reads it once, not after a full read here."""
    path = write_series(
        make_ct_series(1, rows=256, columns=256, transfer_syntax=RLELossless), tmp_path
    )[0]
    read: list[int] = []
    real_open = Path.open

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        stream = real_open(self, *args, **kwargs)
        real_read = stream.read

        def counted(size: int = -1) -> bytes:
            chunk = real_read(size)
            read.append(len(chunk))
            return chunk

        stream.read = counted
        return stream

    monkeypatch.setattr(Path, "open", counting_open)
    assert read_native_slice(path) is None
    assert sum(read) <= 4096 < path.stat().st_size
