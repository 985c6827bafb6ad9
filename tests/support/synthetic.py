"""Synthetic CT series with realistic geometry, for tests, benchmarks and demos.

A real scanner is not needed to exercise the node: these functions build CT
Image Storage instances (or one Enhanced CT Image Storage instance) that carry
the same modules a scanner writes - patient, study, series, frame of
reference, equipment, image plane, image pixel, CT image, VOI LUT and SOP
common (PS3.3 A.3 and A.38) - in any transfer syntax the node accepts.

The pixel values come from a small chest-like phantom (or from a caller's
function), so a test can compare what ``dicom.decode`` returns with the HU
values that went in.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import CTImageStorage, generate_uid

from lungnode import __version__
from tests.support.synthetic_codecs import (
    PixelFormat,
    encode_pixel_data,
    pixel_format_for,
    resolve_transfer_syntax,
)
from tests.support.synthetic_enhanced import build_enhanced_ct

logger = logging.getLogger(__name__)

__all__ = [
    "chest_phantom_hu",
    "dataset_bytes",
    "make_ct_series",
    "write_series",
]

#: The lung window (PS3.3 C.11.2) written into every synthetic image.
LUNG_WINDOW_CENTER = -600.0
LUNG_WINDOW_WIDTH = 1500.0


def chest_phantom_hu(
    index: int, n_slices: int, rows: int, columns: int, *, seed: int = 0
) -> np.ndarray:
    """One axial slice of a crude chest phantom, in HU (float32).

    Why a phantom and not noise: the pipeline windows the lungs and the model
    looks at them, so a test image needs air outside the body, soft tissue,
    dark lungs whose size changes along z, a spine and some vessels. The
    shapes are defined as fractions of the field of view, so a 64x64 test
    image looks like a small 512x512 one.
    """
    rng = np.random.default_rng([seed, index])
    v, u = np.meshgrid(
        (np.arange(rows, dtype=np.float32) + 0.5) / rows * 2.0 - 1.0,
        (np.arange(columns, dtype=np.float32) + 0.5) / columns * 2.0 - 1.0,
        indexing="ij",
    )
    t = index / max(n_slices - 1, 1)
    # The lungs are small at the apex and the base and widest in between.
    lung_scale = 0.55 + 0.45 * float(np.sin(np.pi * (0.1 + 0.8 * t)))

    hu = np.full((rows, columns), -1000.0, dtype=np.float32)
    body = (u / 0.86) ** 2 + (v / 0.64) ** 2 <= 1.0
    hu[body] = -100.0  # subcutaneous fat
    hu[(u / 0.80) ** 2 + (v / 0.58) ** 2 <= 1.0] = 40.0  # muscle and mediastinum
    for side in (-1.0, 1.0):
        lung = ((u - side * 0.36) / (0.27 * lung_scale)) ** 2 + (
            (v + 0.04) / (0.42 * lung_scale)
        ) ** 2 <= 1.0
        hu[lung] = -860.0
        # A few vessels, fixed per seed so they run through neighbouring slices.
        vessel_rng = np.random.default_rng([seed, 7919, int(side > 0)])
        for cu, cv in vessel_rng.uniform(-0.5, 0.5, size=(6, 2)):
            vessel = (
                (u - side * 0.36 - cu * 0.3 * lung_scale) ** 2 + (v - cv * 0.6 * lung_scale) ** 2
            ) <= 0.02**2
            hu[vessel & lung] = 30.0
    hu[(u**2 + (v - 0.44) ** 2) <= 0.09**2] = 700.0  # vertebral body
    hu[body] += rng.normal(0.0, 12.0, size=int(body.sum())).astype(np.float32)
    return hu


def make_ct_series(
    n_slices: int = 20,
    *,
    rows: int = 512,
    columns: int = 512,
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
    slice_spacing_mm: float = 1.25,
    pixel_spacing_mm: float = 0.7,
    study_uid: str | None = None,
    series_uid: str | None = None,
    declared_count: bool = True,
    slice_hu: Callable[[int], np.ndarray] | None = None,
    seed: int = 0,
    patient_name: str = "Phantom^Synthetic",
    patient_id: str = "SYN0001",
    first_instance_number: int = 1,
    enhanced: bool = False,
    signed: bool | None = None,
    monochrome1: bool = False,
    padding_value: int | None = None,
    frame_order: Sequence[int] | None = None,
    per_frame_rescale: bool = False,
) -> list[Dataset]:
    """Build one synthetic axial CT series, ready to write or send.

    Slices step along +z (feet to head) from a position centred on zero;
    ``datasets[k]`` holds slice ``k``. With ``enhanced=True`` the series is a
    single Enhanced CT Image Storage instance whose frames carry their
    geometry in functional groups (PS3.3 C.7.6.16).

    Args:
        signed: Pixel Representation 1 (stored value = HU, 16 bits stored)
            or 0 (stored value = HU + 1024, 12 bits stored). None means
            signed, except for the lossy JPEG processes, whose samples are
            unsigned only (PS3.5 8.2.1); asking for signed there raises.
        monochrome1: write Photometric Interpretation MONOCHROME1 (classic CT
            only). Only the display inverts (PS3.3 C.7.6.3.1.2); stored values
            and HU do not.
        padding_value: stored value written outside the circular
            reconstruction field of view and declared as Pixel Padding Value
            (PS3.3 C.7.5.1.1.2).
        frame_order: for ``enhanced``, the order of slice indices in the
            frames (to test that readers sort by position, not by frame).
        per_frame_rescale: for ``enhanced``, put the Pixel Value
            Transformation in each per-frame group instead of the shared one.

    Raises:
        ValueError: a parameter the standard or the codec cannot honour.
        DcmtkMissingError: a JPEG (ISO 10918) syntax without DCMTK's dcmcjpeg.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    if rows < 1 or columns < 1:
        raise ValueError(f"rows and columns must be positive, got {rows}x{columns}")
    if enhanced and monochrome1:
        raise ValueError("Enhanced CT allows MONOCHROME2 only (PS3.3 C.8.15.2.1)")
    tsyntax = resolve_transfer_syntax(transfer_syntax)
    fmt = pixel_format_for(tsyntax, signed)
    if padding_value is not None and not fmt.min_stored <= padding_value <= fmt.max_stored:
        raise ValueError(
            f"padding_value {padding_value} does not fit {fmt.bits_stored} bits stored "
            f"({'signed' if fmt.signed else 'unsigned'})"
        )

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    now = _dt.datetime.now()
    common = _common_dataset(
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=generate_uid(),
        patient_name=patient_name,
        patient_id=patient_id,
        seed=seed,
        when=now,
    )
    stored = [
        _to_stored(_slice_hu(slice_hu, k, n_slices, rows, columns, seed), fmt, padding_value)
        for k in range(n_slices)
    ]
    z0 = -(n_slices - 1) * slice_spacing_mm / 2.0
    x0 = -(columns - 1) * pixel_spacing_mm / 2.0
    y0 = -(rows - 1) * pixel_spacing_mm / 2.0
    positions = [[x0, y0, z0 + k * slice_spacing_mm] for k in range(n_slices)]

    _set_pixel_module(common, rows, columns, fmt, monochrome1, padding_value)
    if enhanced:
        order = list(frame_order) if frame_order is not None else list(range(n_slices))
        if sorted(order) != list(range(n_slices)):
            raise ValueError("frame_order must be a permutation of range(n_slices)")
        ds = build_enhanced_ct(
            common,
            frames=[stored[k] for k in order],
            positions=[positions[k] for k in order],
            pixel_spacing_mm=pixel_spacing_mm,
            slice_thickness_mm=slice_spacing_mm,
            fmt=fmt,
            instance_number=first_instance_number,
            per_frame_rescale=per_frame_rescale,
            window=(LUNG_WINDOW_CENTER, LUNG_WINDOW_WIDTH),
            when=now,
        )
        datasets = [ds]
    else:
        if frame_order is not None or per_frame_rescale:
            raise ValueError("frame_order and per_frame_rescale apply to enhanced=True only")
        datasets = []
        for k in range(n_slices):
            ds = _copy(common)
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = first_instance_number + k
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient = [_ds_number(p) for p in positions[k]]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [_ds_number(pixel_spacing_mm)] * 2
            ds.SliceThickness = _ds_number(slice_spacing_mm)
            ds.SliceLocation = _ds_number(positions[k][2])
            ds.RescaleIntercept = _ds_number(fmt.intercept)
            ds.RescaleSlope = _ds_number(fmt.slope)
            ds.RescaleType = "HU"
            ds.KVP = 120
            ds.XRayTubeCurrent = 200
            ds.ConvolutionKernel = "LUNG"
            ds.ReconstructionDiameter = _ds_number(columns * pixel_spacing_mm)
            ds.WindowCenter = _ds_number(LUNG_WINDOW_CENTER)
            ds.WindowWidth = _ds_number(LUNG_WINDOW_WIDTH)
            ds.WindowCenterWidthExplanation = "LUNG"
            if declared_count:
                ds.ImagesInAcquisition = n_slices
            ds.PixelData = stored[k].tobytes()
            datasets.append(ds)
    for ds in datasets:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    encode_pixel_data(datasets, tsyntax, fmt)
    logger.debug(
        "built synthetic series %s: %d slices, %dx%d, %s%s",
        series_uid,
        n_slices,
        rows,
        columns,
        tsyntax.name,
        " (enhanced)" if enhanced else "",
    )
    return datasets


def write_series(datasets: Sequence[Dataset], directory: Path) -> list[Path]:
    """Write each dataset as a DICOM file named ``<SOPInstanceUID>.dcm``.

    The files carry a preamble and a complete File Meta Information group
    (PS3.10 7.1), as a PACS would send them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(ds: Dataset) -> bytes:
    """The dataset in the DICOM File Format, as bytes (for upload tests)."""
    with DicomBytesIO() as buffer:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()


# -- helpers ---------------------------------------------------------------


def _slice_hu(
    slice_hu: Callable[[int], np.ndarray] | None,
    index: int,
    n_slices: int,
    rows: int,
    columns: int,
    seed: int,
) -> np.ndarray:
    if slice_hu is None:
        return chest_phantom_hu(index, n_slices, rows, columns, seed=seed)
    hu = np.asarray(slice_hu(index), dtype=np.float32)
    if hu.shape != (rows, columns):
        raise ValueError(f"slice_hu({index}) returned shape {hu.shape}, expected {(rows, columns)}")
    return hu


def _to_stored(hu: np.ndarray, fmt: PixelFormat, padding_value: int | None) -> np.ndarray:
    """HU -> stored values: the inverse of the Modality LUT (PS3.3 C.11.1)."""
    stored = np.rint((hu - fmt.intercept) / fmt.slope)
    np.clip(stored, fmt.min_stored, fmt.max_stored, out=stored)
    out = stored.astype(fmt.dtype)
    if padding_value is not None:
        rows, columns = hu.shape
        v, u = np.ogrid[:rows, :columns]
        outside = ((u + 0.5) / columns * 2 - 1) ** 2 + ((v + 0.5) / rows * 2 - 1) ** 2 > 1.0
        out[outside] = padding_value
    return out


def _common_dataset(
    *,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    patient_name: str,
    patient_id: str,
    seed: int,
    when: _dt.datetime,
) -> Dataset:
    """Patient, study, series, frame of reference and equipment modules."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds = Dataset()
    if not (patient_name + patient_id).isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = f"SYN{seed:07d}"[-16:]
    ds.StudyDescription = "Synthetic chest CT phantom"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = "Synthetic axial lung"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "lungnode"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = __version__
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.BurnedInAnnotation = "NO"
    return ds


def _set_pixel_module(
    ds: Dataset,
    rows: int,
    columns: int,
    fmt: PixelFormat,
    monochrome1: bool,
    padding_value: int | None,
) -> None:
    """Image Pixel module (PS3.3 C.7.6.3) and Pixel Padding (C.7.5.1.1.2)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = fmt.bits_allocated
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = int(fmt.signed)
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value


def _copy(ds: Dataset) -> Dataset:
    # A deep copy: Dataset.update() would share DataElement objects between
    # instances, and a later assignment to one would change them all.
    return copy.deepcopy(ds)


def _ds_number(value: float) -> float | int:
    """A value that fits a DS of 16 characters (PS3.5 6.2)."""
    rounded = round(float(value), 6)
    return int(rounded) if rounded.is_integer() else rounded
