"""Synthetic CT series: every transfer syntax, both pixel representations, valid IODs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    RLELossless,
)

from tests.support.synthetic import dataset_bytes, make_ct_series, write_series
from tests.support.synthetic_codecs import (
    LOSSY_METHODS,
    SUPPORTED_TRANSFER_SYNTAXES,
    PixelFormat,
    pixel_format_for,
    resolve_transfer_syntax,
)

#: Largest HU error each lossy syntax may add on the phantom; lossless adds none.
LOSSY_TOLERANCE_HU = {
    JPEGBaseline8Bit: 100.0,  # 8-bit samples at 8 HU each, then quality 95
    JPEGExtended12Bit: 16.0,
    JPEGLSNearLossless: 2.0,
    JPEG2000: 50.0,
}

SIZE = 32


def _quantized(hu: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """What the stored values can represent of ``hu``: the lossless answer."""
    stored = np.clip(np.rint((hu - fmt.intercept) / fmt.slope), fmt.min_stored, fmt.max_stored)
    return stored * fmt.slope + fmt.intercept


@pytest.mark.parametrize("tsyntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda t: t.keyword)
def test_every_transfer_syntax_round_trips_through_a_file(
    tsyntax: UID, tmp_path: Path, integer_phantom: Callable[..., Callable[[int], np.ndarray]]
) -> None:
    slice_hu = integer_phantom(3, SIZE, SIZE)
    datasets = make_ct_series(
        3, rows=SIZE, columns=SIZE, transfer_syntax=tsyntax, slice_hu=slice_hu
    )
    fmt = pixel_format_for(tsyntax, None)
    for k, path in enumerate(write_series(datasets, tmp_path)):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == tsyntax
        assert ds.SOPInstanceUID == datasets[k].SOPInstanceUID
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        error = np.abs(hu - _quantized(slice_hu(k), fmt)).max()
        assert error <= LOSSY_TOLERANCE_HU.get(tsyntax, 0.0)
        if tsyntax in LOSSY_METHODS:
            assert ds.LossyImageCompression == "01"
            assert ds.LossyImageCompressionMethod == LOSSY_METHODS[tsyntax]
        else:
            assert ds.get("LossyImageCompression", "00") == "00"


@pytest.mark.parametrize(
    ("signed", "representation", "bits_stored", "intercept"),
    [(True, 1, 16, 0.0), (False, 0, 12, -1024.0)],
)
def test_signed_and_unsigned_pixels(
    signed: bool, representation: int, bits_stored: int, intercept: float
) -> None:
    (ds,) = make_ct_series(1, rows=SIZE, columns=SIZE, signed=signed)
    assert (ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored) == (
        representation,
        16,
        bits_stored,
    )
    assert ds.HighBit == bits_stored - 1
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, intercept)
    assert ds.pixel_array.min() >= (-(1 << 15) if signed else 0)


@pytest.mark.parametrize("tsyntax", [JPEGBaseline8Bit, JPEGExtended12Bit])
def test_lossy_jpeg_refuses_signed_samples(tsyntax: UID) -> None:
    with pytest.raises(ValueError, match="unsigned"):
        make_ct_series(1, rows=SIZE, columns=SIZE, transfer_syntax=tsyntax, signed=True)
    (ds,) = make_ct_series(1, rows=SIZE, columns=SIZE, transfer_syntax=tsyntax)
    assert ds.PixelRepresentation == 0


def test_series_geometry_and_identity() -> None:
    datasets = make_ct_series(
        4,
        rows=SIZE,
        columns=SIZE,
        slice_spacing_mm=2.5,
        pixel_spacing_mm=0.8,
        study_uid="1.2.3.4",
        series_uid="1.2.3.4.5",
        first_instance_number=10,
    )
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), 2.5)
    assert [float(ds.SliceLocation) for ds in datasets] == z
    assert [ds.InstanceNumber for ds in datasets] == [10, 11, 12, 13]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    for ds in datasets:
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.4.5")
        assert ds.Modality == "CT"
        assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.8]
        assert float(ds.SliceThickness) == 2.5
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.ImagesInAcquisition == 4
        assert float(ds.WindowCenter) == -600.0
    assert (
        "ImagesInAcquisition" not in make_ct_series(1, rows=8, columns=8, declared_count=False)[0]
    )


def test_fresh_uids_per_call() -> None:
    first = make_ct_series(1, rows=8, columns=8)[0]
    second = make_ct_series(1, rows=8, columns=8)[0]
    assert first.StudyInstanceUID != second.StudyInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID


def test_default_series_is_a_512_chest_phantom() -> None:
    datasets = make_ct_series(2)
    ds = datasets[0]
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (512, 512, 16)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lung = (hu > -950) & (hu < -700)
    assert 0.05 < lung.mean() < 0.4, "the phantom has lungs"
    assert (hu > 400).any(), "and a spine"
    assert hu[0, 0] < -900, "and air around the body"


def test_enhanced_series_is_one_multiframe_instance() -> None:
    (ds,) = make_ct_series(5, rows=SIZE, columns=SIZE, enhanced=True, frame_order=[4, 0, 3, 1, 2])
    assert ds.SOPClassUID == EnhancedCTImageStorage
    assert ds.NumberOfFrames == 5
    z = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    assert np.argsort(z).tolist() == [1, 3, 4, 2, 0]
    assert [
        f.FrameContentSequence[0].InStackPositionNumber for f in ds.PerFrameFunctionalGroupsSequence
    ] == [5, 1, 4, 2, 3]
    assert ds.pixel_array.shape == (5, SIZE, SIZE)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_slices": 0},
        {"padding_value": 5000, "signed": False},
        {"slice_hu": lambda k: np.zeros((3, 3))},
        {"transfer_syntax": "MPEG2"},
        {"enhanced": True, "frame_order": [0, 0]},
        {"frame_order": [1, 0]},
        {"enhanced": True, "monochrome1": True},
    ],
)
def test_bad_parameters_raise_value_error(kwargs: dict[str, object]) -> None:
    params: dict[str, object] = {"n_slices": 2, "rows": 8, "columns": 8, **kwargs}
    with pytest.raises(ValueError):
        make_ct_series(**params)  # type: ignore[arg-type]


def test_transfer_syntax_by_keyword_name_or_uid() -> None:
    assert resolve_transfer_syntax("jpeglosslesssv1") == JPEGLosslessSV1
    assert resolve_transfer_syntax("1.2.840.10008.1.2.5") == RLELossless
    assert resolve_transfer_syntax("Explicit VR Big Endian") == ExplicitVRBigEndian


def test_dataset_bytes_is_a_dicom_file() -> None:
    (ds,) = make_ct_series(1, rows=8, columns=8, transfer_syntax=DeflatedExplicitVRLittleEndian)
    raw = dataset_bytes(ds)
    assert raw[128:132] == b"DICM"


# dciodvfy ------------------------------------------------------------------

VALIDATED = [
    (ExplicitVRLittleEndian, False),
    (ExplicitVRBigEndian, False),
    (DeflatedExplicitVRLittleEndian, False),
    (JPEGExtended12Bit, False),
    (JPEGLosslessSV1, False),
    (JPEGLSNearLossless, False),
    (JPEG2000, False),
    (RLELossless, False),
    (ExplicitVRLittleEndian, True),
    (JPEGLosslessSV1, True),
    (JPEG2000, True),
]


@pytest.mark.parametrize(
    ("tsyntax", "enhanced"),
    VALIDATED,
    ids=[f"{t.keyword}{'-enhanced' if e else ''}" for t, e in VALIDATED],
)
def test_dciodvfy_finds_no_errors(
    tsyntax: UID, enhanced: bool, tmp_path: Path, dciodvfy: Callable[[Path], list[str]]
) -> None:
    datasets = make_ct_series(
        2,
        rows=SIZE,
        columns=SIZE,
        transfer_syntax=tsyntax,
        enhanced=enhanced,
        padding_value=-2000 if tsyntax != JPEGExtended12Bit else 0,
    )
    for path in write_series(datasets, tmp_path):
        assert dciodvfy(path) == []


@pytest.mark.parametrize(
    ("monochrome1", "signed", "enhanced"),
    [(True, True, False), (False, False, False), (False, False, True)],
)
def test_dciodvfy_variants(
    monochrome1: bool,
    signed: bool,
    enhanced: bool,
    tmp_path: Path,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    datasets = make_ct_series(
        1, rows=SIZE, columns=SIZE, enhanced=enhanced, monochrome1=monochrome1, signed=signed
    )
    (path,) = write_series(datasets, tmp_path)
    assert dciodvfy(path) == []


def test_jpeg_baseline_breaks_only_the_ct_bit_depth_rule(
    tmp_path: Path, dciodvfy: Callable[[Path], list[str]]
) -> None:
    """Process 1 is 8-bit; the CT Image module wants 16 bits allocated.

    The generator makes such files on purpose, to test readers; dciodvfy
    must flag the bit depth and nothing else.
    """
    datasets = make_ct_series(1, rows=SIZE, columns=SIZE, transfer_syntax=JPEGBaseline8Bit)
    (path,) = write_series(datasets, tmp_path)
    errors = dciodvfy(path)
    assert errors
    assert all(any(a in e for a in ("Bits Allocated", "Bits Stored", "High Bit")) for e in errors)


def test_make_demo_series_script(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_demo_series.py"
    spec = importlib.util.spec_from_file_location("make_demo_series", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "demo"
    assert (
        module.main(
            [
                "--out",
                str(out),
                "--slices",
                "2",
                "--rows",
                "16",
                "--columns",
                "16",
                "--transfer-syntax",
                "RLELossless",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == RLELossless
