"""Training writes loadable bundles, reproducibly, from phantoms or a class-folder set."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lungnode.domain import CLASS_LABELS
from lungnode.imaging.windowing import window_to_uint8
from lungnode.ml.bundle import clear_cache, load_bundle, sha256_file
from lungnode.ml.phantoms import generate_slice
from lungnode.ml.train import folder_label, read_image_hu, train_demo, train_from_folder

KAGGLE_FOLDERS = {
    "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib": "Adenocarcinoma",
    "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa": "Large Cell Carcinoma",
    "normal": "Normal",
    "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa": "Squamous Cell Carcinoma",
}


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        *KAGGLE_FOLDERS.items(),
        ("adenocarcinoma", "Adenocarcinoma"),
        ("Large_Cell_Carcinoma", "Large Cell Carcinoma"),
        ("Emphysema", "Emphysema"),
    ],
)
def test_folder_names_map_onto_labels(folder: str, label: str) -> None:
    assert folder_label(folder) == label


def test_train_demo_is_reproducible_and_writes_a_bundle(tmp_path: Path) -> None:
    kwargs = dict(n_per_class=6, n_val_per_class=2, epochs=1, input_size=(32, 32), verbose=0)
    first = train_demo(tmp_path / "a", seed=5, **kwargs)  # type: ignore[arg-type]
    second = train_demo(tmp_path / "b", seed=5, **kwargs)  # type: ignore[arg-type]
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(first / "model.keras")
    assert manifest["synthetic"] is True and "phantom" in manifest["trained_on"]
    assert manifest["labels"] == list(CLASS_LABELS)
    clear_cache()
    a, b = load_bundle(first), load_bundle(second)
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    other = load_bundle(train_demo(tmp_path / "c", seed=6, **kwargs))  # type: ignore[arg-type]
    assert not all(
        np.array_equal(wa, wc)
        for wa, wc in zip(a.model.get_weights(), other.model.get_weights(), strict=True)
    )


def _write_dicom(path: Path, hu: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def test_read_image_hu_uses_the_dicom_rescale(tmp_path: Path) -> None:
    hu = np.array([[-1000, -850], [40, 700]], dtype=np.float32)
    _write_dicom(tmp_path / "x.dcm", hu)
    np.testing.assert_array_equal(read_image_hu(tmp_path / "x.dcm"), hu)


def test_train_from_folder_writes_a_bundle_with_mapped_labels(tmp_path: Path) -> None:
    data = tmp_path / "Data"
    for i, (folder, label) in enumerate(KAGGLE_FOLDERS.items()):
        (data / "train" / folder).mkdir(parents=True)
        for j in range(5):
            hu, _ = generate_slice(100 * i + j, label, size=64)
            cv2.imwrite(str(data / "train" / folder / f"{j}.png"), window_to_uint8(hu, "lung"))
        _write_dicom(data / "train" / folder / "extra.dcm", generate_slice(9 + i, label, 64)[0])
    out = train_from_folder(
        data,
        tmp_path / "bundle",
        name="folder-model",
        input_size=(32, 32),
        epochs=2,
        batch_size=8,
        verbose=0,
    )
    clear_cache()
    loaded = load_bundle(out)
    assert loaded.manifest.labels == CLASS_LABELS
    assert loaded.identity.name == "folder-model" and not loaded.identity.synthetic
    assert "images from folder 'Data'" in loaded.identity.trained_on
    assert loaded.manifest.gradcam_layer == "gradcam_conv"


def test_train_from_folder_needs_a_normal_class(tmp_path: Path) -> None:
    for folder in ("adenocarcinoma", "squamous.cell.carcinoma"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="normal"):
        train_from_folder(tmp_path, tmp_path / "out", verbose=0)
