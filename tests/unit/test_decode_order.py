"""The single-read path of ``load_series``: any file order gives the same sorted volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungnode.dicom.decode import load_series
from tests.support.synthetic import make_ct_series, write_series


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_files_decode_to_the_sorted_volume(seed: int, tmp_path: Path) -> None:
    n = 9

    def slice_hu(k: int) -> np.ndarray:
        return np.full((16, 16), float(10 * k - 1000), dtype=np.float32)

    datasets = make_ct_series(n, rows=16, columns=16, slice_hu=slice_hu)
    paths = write_series(datasets, tmp_path)
    shuffled = [paths[i] for i in np.random.default_rng(seed).permutation(n)]
    volume = load_series(shuffled)
    # Slice k of the volume is the k-th slice feet to head, whatever the file order.
    np.testing.assert_array_equal(volume.hu[:, 0, 0], [10 * k - 1000 for k in range(n)])
    assert [ref.sop_instance_uid for ref in volume.slices] == [
        str(ds.SOPInstanceUID) for ds in datasets
    ]
    positions = [ref.position_mm for ref in volume.slices]
    assert positions == sorted(positions) and None not in positions
    assert volume.slice_spacing_mm == pytest.approx(1.25)
