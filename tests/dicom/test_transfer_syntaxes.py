"""Every transfer syntax the node accepts, over real associations.

A sender chooses the encoding; the node must store the bytes it was sent,
not transcode them (PS3.4 B.4.1: the SCP keeps the pixel data as received,
and a lossy image must never be silently re-encoded), and the decoder must
give back the Hounsfield units that went in, exactly for a lossless syntax.
The instances go once through pynetdicom and once through DCMTK's storescu,
which is what a PACS would use.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.db.models import Instance
from lungnode.dicom.decode import load_series
from tests.conftest import SENDER_AE, require_tool
from tests.dicom.helpers import store_all
from tests.support.synthetic import chest_phantom_hu, make_ct_series, write_series
from tests.support.synthetic_codecs import (
    SUPPORTED_TRANSFER_SYNTAXES,
    PixelFormat,
    pixel_format_for,
)

#: Largest HU error each lossy syntax may add on the phantom; lossless adds none.
LOSSY_TOLERANCE_HU = {
    JPEGBaseline8Bit: 100.0,  # 8-bit samples at 8 HU each, then quality 95
    JPEGExtended12Bit: 16.0,
    JPEGLSNearLossless: 2.0,
    JPEG2000: 50.0,
}

N_SLICES = 3
SIZE = 64


def _whole_hu(n_slices: int, rows: int, columns: int) -> Callable[[int], np.ndarray]:
    """Phantom slices in whole HU: they survive HU -> stored -> HU exactly when lossless."""

    def slice_hu(index: int) -> np.ndarray:
        return np.rint(chest_phantom_hu(index, n_slices, rows, columns)).astype(np.float32)

    return slice_hu


def _representable(hu: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """What the stored values can carry of ``hu`` (Process 1 has 8 HU steps)."""
    stored = np.clip(np.rint((hu - fmt.intercept) / fmt.slope), fmt.min_stored, fmt.max_stored)
    return (stored * fmt.slope + fmt.intercept).astype(np.float32)


def _expected_volume(
    slice_hu: Callable[[int], np.ndarray], n_slices: int, tsyntax: UID
) -> np.ndarray:
    fmt = pixel_format_for(tsyntax, None)
    return np.stack([_representable(slice_hu(k), fmt) for k in range(n_slices)])


def _stored_paths(node: Node, datasets: Sequence[Dataset]) -> list[Path]:
    """Where the node says it stored each instance, in slice order."""
    with node.sessions() as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in datasets}
    return [node.settings.resolve_stored(rows[str(ds.SOPInstanceUID)].path) for ds in datasets]


def _check_stored_as_received(
    node: Node, datasets: Sequence[Dataset], tsyntax: UID, sources: Sequence[Path] = ()
) -> list[Path]:
    """The files and rows keep the sender's transfer syntax and pixel bytes."""
    paths = _stored_paths(node, datasets)
    with node.sessions() as session:
        recorded = set(session.scalars(select(Instance.transfer_syntax_uid)))
    assert recorded == {str(tsyntax)}
    for path, sent in zip(paths, datasets, strict=True):
        stored = pydicom.dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == tsyntax
        assert stored.SOPInstanceUID == sent.SOPInstanceUID
        if tsyntax.is_compressed:
            # Not decoded and re-encoded on the way: the very same codestream.
            assert stored.PixelData == sent.PixelData
    if sources:
        sent_hu = load_series(list(sources)).hu
        assert np.array_equal(load_series(paths).hu, sent_hu)
    return paths


def _check_hu(paths: Sequence[Path], slice_hu: Callable[[int], np.ndarray], tsyntax: UID) -> None:
    volume = load_series(list(paths))
    expected = _expected_volume(slice_hu, len(paths), tsyntax)
    assert volume.hu.shape == expected.shape
    error = float(np.abs(volume.hu - expected).max())
    tolerance = LOSSY_TOLERANCE_HU.get(tsyntax, 0.0)
    assert error <= tolerance, f"{tsyntax.name}: {error} HU off, {tolerance} allowed"
    if tsyntax in LOSSY_TOLERANCE_HU:
        assert volume.hu.mean() == pytest.approx(expected.mean(), abs=tolerance / 4)


def _needs_dcmcjpeg(tsyntax: UID) -> None:
    if tsyntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1):
        require_tool("dcmcjpeg")


_CASES = [
    pytest.param(tsyntax, SIZE, id=tsyntax.keyword) for tsyntax in SUPPORTED_TRANSFER_SYNTAXES
] + [
    # Full-size slices: each one spans several PDUs of the default maximum length.
    pytest.param(ExplicitVRLittleEndian, 512, id="ExplicitVRLittleEndian-512"),
    pytest.param(JPEGLSLossless, 512, id="JPEGLSLossless-512"),
]


@pytest.mark.parametrize(("tsyntax", "size"), _CASES)
def test_pynetdicom_store_keeps_transfer_syntax_and_hu(node: Node, tsyntax: UID, size: int) -> None:
    _needs_dcmcjpeg(tsyntax)
    slice_hu = _whole_hu(N_SLICES, size, size)
    datasets = make_ct_series(
        N_SLICES, rows=size, columns=size, transfer_syntax=tsyntax, slice_hu=slice_hu
    )
    assert store_all(node.scp.port, datasets) == [0x0000] * N_SLICES
    paths = _check_stored_as_received(node, datasets, tsyntax)
    _check_hu(paths, slice_hu, tsyntax)


#: storescu's option proposing each compressed syntax (with -R, nothing else but the
#: uncompressed fallbacks). storescu has no option for JPEG Lossless Process 14: it
#: gets an association profile from a configuration file instead.
_STORESCU_PROPOSALS: dict[UID, str | None] = {
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEG2000Lossless: "-xv",
    RLELossless: "-xr",
    JPEG2000: "-xw",
    JPEGLSNearLossless: "-xu",
    JPEGLossless: None,
}


def _storescu_profile(directory: Path, tsyntax: UID) -> list[str]:
    """``-xf FILE PROFILE`` proposing CT Image Storage in ``tsyntax`` only."""
    config = directory / "storescu.cfg"
    config.write_text(
        "[[TransferSyntaxes]]\n[AsStored]\n"
        f"TransferSyntax1 = {tsyntax}\n\n"
        "[[PresentationContexts]]\n[CT]\n"
        f"PresentationContext1 = {CTImageStorage}\\AsStored\n\n"
        "[[Profiles]]\n[AsStored]\nPresentationContexts = CT\n"
    )
    return ["-xf", str(config), "AsStored"]


@pytest.mark.parametrize("tsyntax", list(_STORESCU_PROPOSALS), ids=lambda ts: ts.keyword)
def test_storescu_sends_compressed_files_as_they_are(
    node: Node, tsyntax: UID, tmp_path: Path
) -> None:
    storescu = require_tool("storescu")
    _needs_dcmcjpeg(tsyntax)
    slice_hu = _whole_hu(N_SLICES, SIZE, SIZE)
    datasets = make_ct_series(
        N_SLICES, rows=SIZE, columns=SIZE, transfer_syntax=tsyntax, slice_hu=slice_hu
    )
    sources = write_series(datasets, tmp_path / "series")
    proposal = _STORESCU_PROPOSALS[tsyntax]
    # -R: only the contexts the files need, so the node is offered their own syntax
    # first; storescu would otherwise decompress to the uncompressed syntax it proposes.
    proposing = ["-R", proposal] if proposal else _storescu_profile(tmp_path, tsyntax)
    command = [
        storescu,
        *proposing,
        "-aet",
        SENDER_AE,
        "-aec",
        node.settings.ae_title,
        "127.0.0.1",
        str(node.scp.port),
        *map(str, sources),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    paths = _check_stored_as_received(node, datasets, tsyntax, sources)
    _check_hu(paths, slice_hu, tsyntax)
