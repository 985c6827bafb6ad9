"""The one rule for which DICOM images are analysed: CT, with Hounsfield units."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from lungnode.dicom.modality import require_ct, require_ct_file, why_not_ct
from lungnode.errors import DecodeError, NotCTError
from tests.support.synthetic import make_ct_series, write_series


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path))


def test_ct_images_pass() -> None:
    assert why_not_ct(pydicom.dcmread(_testdata("CT_small.dcm"))) is None
    (classic,) = make_ct_series(1, rows=16, columns=16)
    assert why_not_ct(classic) is None
    (enhanced,) = make_ct_series(3, rows=16, columns=16, enhanced=True)
    assert why_not_ct(enhanced) is None
    require_ct_file(_testdata("CT_small.dcm"))


@pytest.mark.parametrize(
    ("name", "start"),
    [
        ("MR_small.dcm", "Modality MR is not CT (MR Image Storage)"),
        ("SC_rgb_rle.dcm", "Modality OT is not CT (Secondary Capture Image Storage)"),
    ],
)
def test_other_modalities_are_refused_naming_the_modality(name: str, start: str) -> None:
    reason = why_not_ct(pydicom.dcmread(_testdata(name), stop_before_pixels=True))
    assert reason is not None and reason.startswith(start)
    assert "Hounsfield units" in reason
    with pytest.raises(NotCTError, match=f"^{name}: {start.split(' (')[0]}") as info:
        require_ct_file(_testdata(name))
    assert info.value.modality == start.split()[1]


def test_a_ct_sop_class_must_also_say_ct_and_be_grey() -> None:
    (mislabelled,) = make_ct_series(1, rows=16, columns=16)
    mislabelled.Modality = "MR"
    assert str(why_not_ct(mislabelled)).startswith(
        "Modality MR is not CT, though the SOP Class is CT Image Storage"
    )
    (colour,) = make_ct_series(1, rows=16, columns=16)
    colour.SamplesPerPixel = 3
    colour.PhotometricInterpretation = "RGB"
    assert str(why_not_ct(colour)).startswith("Modality CT but 3 samples per pixel (RGB)")
    with pytest.raises(NotCTError, match="no Hounsfield units"):
        require_ct(colour)


def test_the_reason_fits_a_dimse_error_comment() -> None:
    """The first 64 characters (an Error Comment, PS3.7 C.4.2.1.6) still name the modality."""
    reason = why_not_ct(pydicom.dcmread(_testdata("MR_small.dcm"), stop_before_pixels=True))
    assert reason is not None and "Modality MR is not CT" in reason[:64]


def test_the_sop_class_of_the_file_meta_counts_when_the_data_set_has_none(
    tmp_path: Path,
) -> None:
    (path,) = write_series(make_ct_series(1, rows=16, columns=16), tmp_path)
    ds = pydicom.dcmread(path)
    del ds.SOPClassUID
    assert why_not_ct(ds) is None  # MediaStorageSOPClassUID is CT Image Storage
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    assert str(why_not_ct(ds)).startswith("SOP Class MR Image Storage is not CT Image Storage")


def test_an_unreadable_file_is_a_decode_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not DICOM")
    with pytest.raises(DecodeError, match="junk.dcm"):
        require_ct_file(junk)


def _damaged(tmp_path: Path, damage: str) -> Path:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    syntax = DeflatedExplicitVRLittleEndian if damage == "truncated deflate" else None
    series = make_ct_series(
        1, rows=16, columns=16, **({"transfer_syntax": syntax} if syntax else {})
    )
    (path,) = write_series(series, tmp_path)
    raw = path.read_bytes()
    if damage == "truncated deflate":
        raw = raw[: len(raw) // 3]
    elif damage == "unknown VR":
        at = raw.index(b"\x02\x00\x10\x00UI")  # (0002,0010) Transfer Syntax UID
        raw = raw[: at + 4] + b"TI" + raw[at + 6 :]
    else:  # "short length": the file ends inside (0002,0010)'s 4-byte length
        at = raw.index(b"\x02\x00\x10\x00UI")
        raw = raw[: at + 4] + b"OB\x00\x00\x01"
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("damage", ["truncated deflate", "unknown VR", "short length"])
def test_a_damaged_file_is_a_decode_error_whatever_the_parser_raises(
    tmp_path: Path, damage: str
) -> None:
    """Found by the fuzzing drill: pydicom raised zlib.error, NotImplementedError and
    struct.error on these, which went past DecodeError (the upload route answered 500)."""
    with pytest.raises(DecodeError, match="not a readable DICOM file"):
        require_ct_file(_damaged(tmp_path, damage))
