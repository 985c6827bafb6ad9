"""Pixel formats and encoders for synthetic CT, one per accepted transfer syntax.

pydicom 3 encodes RLE Lossless, JPEG-LS and JPEG 2000 itself (through
pylibjpeg-rle, pyjpegls and pylibjpeg-openjpeg). No Python package that the
node already needs encodes the ISO 10918 processes (Baseline, Extended,
Lossless, Lossless SV1), so those go through DCMTK's ``dcmcjpeg``; only the
encapsulated frames are kept, so the header stays the one built here.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

logger = logging.getLogger(__name__)

#: Every transfer syntax a synthetic series can be written in.
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

#: Lossy syntaxes, with the Lossy Image Compression Method each one records
#: (PS3.3 C.7.6.1.1.5.1).
LOSSY_METHODS: dict[UID, str] = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}

#: dcmcjpeg's option for each ISO 10918 process.
_DCMTK_PROCESS: dict[UID, list[str]] = {
    JPEGBaseline8Bit: ["+eb", "+q", "95"],
    JPEGExtended12Bit: ["+ee", "+q", "95"],
    JPEGLossless: ["+el", "+sv", "6"],
    JPEGLosslessSV1: ["+e1"],
}

#: Maximum error in stored values that JPEG-LS near-lossless may introduce.
JLS_NEAR_ERROR = 2
#: Target PSNR in dB for lossy JPEG 2000: visually lossless for CT.
J2K_PSNR_DB = 80.0


class DcmtkMissingError(RuntimeError):
    """DCMTK's dcmcjpeg is needed for the JPEG (ISO 10918) transfer syntaxes."""


@dataclass(frozen=True)
class PixelFormat:
    """How HU become stored values for one transfer syntax (PS3.3 C.7.6.3, C.11.1)."""

    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float

    @property
    def dtype(self) -> np.dtype[np.integer]:
        code = {8: "u1", 16: "u2"}[self.bits_allocated]
        if self.signed:
            code = code.replace("u", "i")
        return np.dtype("<" + code)

    @property
    def min_stored(self) -> int:
        return -(1 << (self.bits_stored - 1)) if self.signed else 0

    @property
    def max_stored(self) -> int:
        return (1 << (self.bits_stored - 1)) - 1 if self.signed else (1 << self.bits_stored) - 1


def resolve_transfer_syntax(name_or_uid: str) -> UID:
    """A supported transfer syntax from its UID, keyword or name.

    Raises:
        ValueError: unknown or unsupported transfer syntax.
    """
    wanted = name_or_uid.strip()
    for uid in SUPPORTED_TRANSFER_SYNTAXES:
        if wanted == uid or wanted.lower() in (uid.keyword.lower(), uid.name.lower()):
            return uid
    known = ", ".join(uid.keyword for uid in SUPPORTED_TRANSFER_SYNTAXES)
    raise ValueError(f"unsupported transfer syntax {name_or_uid!r}; use one of: {known}")


def pixel_format_for(tsyntax: UID, signed: bool | None) -> PixelFormat:
    """The stored-value layout that ``tsyntax`` allows for CT.

    The lossy JPEG processes take unsigned samples only (PS3.5 8.2.1).
    Process 1 is 8-bit (PS3.5 A.4.1): its 8-bit samples are scaled to HU by a
    Rescale Slope of 8, which covers -1024..1016 HU. That is the only way to
    carry CT in Process 1, and it breaks the CT Image module's rule of 16
    bits allocated (PS3.3 C.8.2.1.1.4); it exists to test readers.
    Process 2 (Extended) is 12-bit.
    """
    lossy_jpeg = tsyntax in (JPEGBaseline8Bit, JPEGExtended12Bit)
    if lossy_jpeg and signed:
        raise ValueError(f"{tsyntax.name} encodes unsigned samples only (PS3.5 8.2.1)")
    if signed is None:
        signed = not lossy_jpeg
    if tsyntax == JPEGBaseline8Bit:
        return PixelFormat(8, 8, False, 8.0, -1024.0)
    if signed:
        return PixelFormat(16, 16, True, 1.0, 0.0)
    return PixelFormat(16, 12, False, 1.0, -1024.0)


def encode_pixel_data(datasets: Sequence[Dataset], tsyntax: UID, fmt: PixelFormat) -> None:
    """Put each dataset's native little-endian Pixel Data into ``tsyntax``.

    Sets the Transfer Syntax UID in the file meta and, for lossy syntaxes,
    the Lossy Image Compression attributes (PS3.3 C.7.6.1.1.5).
    """
    if tsyntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        for ds in datasets:
            _set_native(ds, tsyntax)
    elif tsyntax == ExplicitVRBigEndian:
        # pydicom writes OW values as given; they must be big endian already.
        for ds in datasets:
            pixels = np.frombuffer(ds.PixelData, dtype=fmt.dtype)
            ds.PixelData = pixels.astype(fmt.dtype.newbyteorder(">")).tobytes()
            _set_native(ds, tsyntax)
    elif tsyntax in _DCMTK_PROCESS:
        _encode_with_dcmtk(datasets, tsyntax)
    else:
        options: dict[str, object] = {}
        if tsyntax == JPEGLSNearLossless:
            options["jls_error"] = JLS_NEAR_ERROR
        elif tsyntax == JPEG2000:
            options["j2k_psnr"] = [J2K_PSNR_DB]
        for ds in datasets:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            native_size = len(ds.PixelData)
            ds.compress(tsyntax, generate_instance_uid=False, **options)  # type: ignore[arg-type]
            _record_lossy(ds, tsyntax, native_size)
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = tsyntax


def _set_native(ds: Dataset, tsyntax: UID) -> None:
    ds["PixelData"].VR = (
        "OB" if ds.BitsAllocated <= 8 and tsyntax != ImplicitVRLittleEndian else "OW"
    )
    ds.file_meta.TransferSyntaxUID = tsyntax


def _record_lossy(ds: Dataset, tsyntax: UID, native_size: int) -> None:
    if tsyntax not in LOSSY_METHODS:
        ds.LossyImageCompression = "00"
        return
    encoded_size = sum(len(f) for f in _frames(ds))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = round(native_size / max(encoded_size, 1), 2)
    ds.LossyImageCompressionMethod = LOSSY_METHODS[tsyntax]


def _frames(ds: Dataset) -> list[bytes]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    return list(generate_frames(ds.PixelData, number_of_frames=n_frames))


def _encode_with_dcmtk(datasets: Sequence[Dataset], tsyntax: UID) -> None:
    """Encode with ``dcmcjpeg`` and keep only the encapsulated frames.

    The temporary input is a Secondary Capture without a Modality LUT, and
    ``+sr`` scales by the range of Bits Stored: together they keep DCMTK
    from rescaling the stored values.
    """
    dcmcjpeg = shutil.which("dcmcjpeg")
    if dcmcjpeg is None:
        raise DcmtkMissingError(
            f"{tsyntax.name} needs DCMTK's dcmcjpeg on PATH (install the 'dcmtk' package)"
        )
    with tempfile.TemporaryDirectory(prefix="lungnode-jpeg-") as tmp:
        for i, ds in enumerate(datasets):
            src, dst = Path(tmp) / f"{i}-in.dcm", Path(tmp) / f"{i}-out.dcm"
            pydicom.dcmwrite(src, _pixel_only(ds), enforce_file_format=True)
            cmd = [dcmcjpeg, *_DCMTK_PROCESS[tsyntax], "+sr", "+un", "-q", str(src), str(dst)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0 or not dst.exists():
                raise RuntimeError(
                    f"dcmcjpeg failed for {tsyntax.name} (exit {result.returncode}): "
                    f"{result.stderr.strip()}"
                )
            encoded = pydicom.dcmread(dst)
            frames = _frames(encoded)
            native_size = len(ds.PixelData)
            ds.PixelData = encapsulate(frames, has_bot=len(frames) > 1)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            _record_lossy(ds, tsyntax, native_size)


def _pixel_only(ds: Dataset) -> Dataset:
    """A minimal Secondary Capture holding ``ds``'s Image Pixel module."""
    out = Dataset()
    out.SOPClassUID = SecondaryCaptureImageStorage
    out.SOPInstanceUID = generate_uid()
    out.Modality = "OT"
    for keyword in (
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    ):
        if keyword in ds:
            # Copy values, not elements: elements are shared objects.
            setattr(out, keyword, ds[keyword].value)
    # The JPEG stream holds stored values either way; MONOCHROME2 keeps
    # DCMTK's rendering path from inverting anything.
    out.PhotometricInterpretation = "MONOCHROME2"
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return out
