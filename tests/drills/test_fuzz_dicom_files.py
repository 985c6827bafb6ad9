"""Fuzzing drill, target 2: the DICOM file readers on byte-mutated files.

Seeds: one small synthetic CT instance in each transfer syntax the node accepts
(uncompressed in both VR encodings and both byte orders, deflated, RLE, JPEG,
JPEG-LS, JPEG 2000) and one Enhanced CT (multi-frame, functional groups).
Each example mutates one seed's bytes (``tests.drills.fuzzing.mutated``),
writes the file and reads it with every reader that meets received files:

- ``dicom.native_slice.read_native_slice``: a slice or None, never an exception;
- ``dicom.intake.parse_instance`` (what the SCP runs on a C-STORE): facts or
  ``IntakeError``;
- ``dicom.modality.require_ct_file`` (the upload route's rule): nothing,
  ``NotCTError`` or ``DecodeError``;
- ``dicom.decode.load_image`` (the analysis): a HU volume or ``DecodeError``.

Anything else escaping, or an example running past its time bound, fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from lungnode.dicom.decode import load_image
from lungnode.dicom.intake import parse_instance
from lungnode.dicom.modality import require_ct_file
from lungnode.dicom.native_slice import read_native_slice
from lungnode.errors import DecodeError, IntakeError, NotCTError
from tests.drills.conftest import Drill
from tests.drills.fuzzing import (
    Seed,
    Tally,
    apply_edits,
    ct_seeds,
    edits,
    escapes_fail,
    fuzz_settings,
    report,
    time_bound,
)

#: Longest an example may take before it counts as a hang (seconds).
TIME_BOUND_S = 20.0


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    """The CT seeds (``fuzzing.ct_seeds``); each one reads cleanly."""
    seeds = ct_seeds(tmp_path_factory.mktemp("seeds"))
    for seed in seeds:
        assert load_image(seed.path).hu.shape[0] >= 1, seed.name
        parse_instance(seed.data)
    return seeds


def _read_all(path: Path, data: bytes, tally: Tally) -> None:
    """Every reader on one file; only their documented outcomes may come out."""
    native = read_native_slice(path)
    tally.saw("native slice" if native is not None else "native: pydicom's turn")
    if native is not None:
        assert native.pixels.ndim == 2 and native.pixels.dtype in (np.int16, np.uint16)
    try:
        parse_instance(data)
    except IntakeError as exc:
        assert 0xA700 <= exc.status <= 0xCFFF, hex(exc.status)
        tally.saw("intake: refused")
    try:
        require_ct_file(path)
    except (NotCTError, DecodeError):
        tally.saw("not CT or unreadable")
    try:
        volume = load_image(path)
    except DecodeError:
        tally.saw("decode: DecodeError")
    else:
        tally.saw("decoded")
        assert volume.hu.ndim == 3 and volume.hu.dtype == np.float32


@pytest.mark.drill
@pytest.mark.slow
# Mutated values make pydicom warn (invalid UI, VR mismatch...); a node only logs those.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_file_readers_survive_mutated_files(
    drill: Drill, seeds: list[Seed], tmp_path: Path
) -> None:
    tally = Tally("file readers (native_slice, intake, modality, decode)")
    path = tmp_path / "mutated.dcm"

    @fuzz_settings(drill, short=300, long=20_000, deadline_s=drill.seconds(10, 10))
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        seed = seeds[data.draw(st.integers(0, len(seeds) - 1), label="seed")]
        note(f"seed: {seed.name}")
        mutant = apply_edits(seed.data, data.draw(edits(len(seed.data), seed.hot), label="edits"))
        path.write_bytes(mutant)
        with escapes_fail(), tally.example(), time_bound(TIME_BOUND_S):
            _read_all(path, mutant, tally)

    fuzz()
    report(drill, tally)
