"""Slices scored while a series arrives give the verdict decoding the whole series gives.

``pipeline.prescore``: the cache, the scorer of files, and the job's analysis from
cached scores, which decodes only the key slices.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lungnode.ml.bundle import ModelBundle, load_bundle
from lungnode.ml.phantoms import generate_volume
from lungnode.pipeline.analyze import analyze_series
from lungnode.pipeline.prescore import (
    PRESCORE_NICENESS,
    Prescorer,
    SliceScores,
    analyze_prescored,
    file_key,
    score_files,
)
from tests.conftest import unavailable
from tests.dicom.helpers import wait_until
from tests.support.synthetic import make_ct_series, write_series

DEMO = Path(__file__).resolve().parents[2] / "models" / "lung-ct-demo"
SLICES = 40


@pytest.fixture(scope="module")
def demo() -> ModelBundle:
    return load_bundle(DEMO)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A lesion series, its files in an order that is not the slice order."""
    volume, _mask = generate_volume(7, "Adenocarcinoma", SLICES, 256)
    datasets = make_ct_series(SLICES, rows=256, columns=256, slice_hu=volume.__getitem__, seed=7)
    folder = tmp_path_factory.mktemp("series")
    write_series(datasets, folder)
    paths = sorted(folder.glob("*.dcm"))
    rng = np.random.default_rng(3)
    return [paths[i] for i in rng.permutation(len(paths))]


def _same_result(prescored: tuple, full: tuple) -> None:  # type: ignore[type-arg]
    (volume, result), (full_volume, full_result) = prescored, full
    assert result.verdict == full_result.verdict == "Adenocarcinoma"
    # The model sees other batches (what had arrived, not 32 in file order), so scores
    # may differ in their last bits, and near-equal slices may swap places.
    assert set(result.key_slices) == set(full_result.key_slices)
    assert {ref.sop_instance_uid for ref in result.key_slice_refs} == {
        ref.sop_instance_uid for ref in full_result.key_slice_refs
    }
    assert volume.slices == full_volume.slices
    assert volume.slice_spacing_mm == pytest.approx(full_volume.slice_spacing_mm)
    assert volume.slice_normal == full_volume.slice_normal
    assert volume.pixel_spacing_mm == full_volume.pixel_spacing_mm
    np.testing.assert_allclose(result.slice_scores, full_result.slice_scores, atol=1e-5)
    for name, score in full_result.class_scores.items():
        assert result.class_scores[name] == pytest.approx(score, abs=1e-5)
    # Only the key slices were decoded, and they hold exactly the series' HU.
    assert volume.decoded_slices == frozenset(result.key_slices)
    for index in result.key_slices:
        np.testing.assert_array_equal(volume.pixels(index), full_volume.hu[index])
    other = next(i for i in range(SLICES) if i not in result.key_slices)
    with pytest.raises(ValueError, match="not decoded"):
        volume.pixels(other)
    full_heatmaps = dict(zip(full_result.key_slices, full_result.heatmaps, strict=True))
    for index, heatmap in zip(result.key_slices, result.heatmaps, strict=True):
        np.testing.assert_allclose(heatmap, full_heatmaps[index], atol=1e-3)


def test_prescored_analysis_equals_decoding_the_series(
    demo: ModelBundle, series: list[Path]
) -> None:
    full = analyze_series(series, demo)
    cache = SliceScores()
    # Half the slices arrived and were scored before the series completed.
    scored = score_files(series[: SLICES // 2], demo, cache, batch_size=8)
    assert all(entry is not None for entry in scored) and len(cache) == SLICES // 2
    prescored = analyze_prescored(series, demo, cache)
    assert prescored is not None
    _same_result(prescored, full)
    assert len(cache) == SLICES  # the job scored the rest into the cache
    # Everything cached: the job scores nothing and decodes the key slices only.
    again = analyze_prescored(series, demo, cache)
    assert again is not None
    _same_result(again, full)
    assert again[1].timings_s.get("inference", 0.0) == 0.0


def test_a_mostly_unscored_series_is_left_to_the_whole_series_decode(
    demo: ModelBundle, series: list[Path]
) -> None:
    cache = SliceScores()
    score_files(series[: SLICES // 2 - 1], demo, cache)
    assert analyze_prescored(series, demo, cache) is None


def test_slices_of_different_sizes_in_one_batch_get_their_own_scores(
    demo: ModelBundle, tmp_path: Path
) -> None:
    """A batch holds the model's inputs, not the slices: sizes may differ within it."""
    small = write_series(make_ct_series(3, rows=256, columns=256, seed=1), tmp_path / "small")
    large = write_series(make_ct_series(3, rows=320, columns=384, seed=2), tmp_path / "large")
    mixed = [small[0], large[0], small[1], large[1], small[2], large[2]]
    scored = score_files(mixed, demo, SliceScores(), batch_size=len(mixed))
    assert all(entry is not None for entry in scored)
    for path, entry in zip(mixed, scored, strict=True):
        assert entry is not None
        alone = score_files([path], demo, SliceScores())[0]
        assert alone is not None
        assert entry.frame.shape == alone.frame.shape
        np.testing.assert_allclose(entry.scores, alone.scores, atol=1e-5)
    assert {entry.frame.shape for entry in scored if entry is not None} == {
        (256, 256),
        (320, 384),
    }


def test_a_replaced_file_is_scored_again(
    demo: ModelBundle, series: list[Path], tmp_path: Path
) -> None:
    path = tmp_path / "slice.dcm"
    path.write_bytes(series[0].read_bytes())
    cache = SliceScores()
    first = score_files([path], demo, cache)[0]
    key = file_key(path)
    assert first is not None and key is not None and cache.get(key, demo.identity.sha256)
    # The same instance sent again: intake renames a new file into place.
    replacement = tmp_path / "new.dcm"
    replacement.write_bytes(series[1].read_bytes())
    os.replace(replacement, path)
    new_key = file_key(path)
    assert new_key is not None and new_key != key
    assert cache.get(new_key, demo.identity.sha256) is None
    second = score_files([path], demo, cache)[0]
    assert second is not None and second.frame.sop_instance_uid != first.frame.sop_instance_uid
    # Scores of another model are not used.
    assert cache.get(new_key, "0" * 64) is None


def test_multi_frame_and_unreadable_files_are_left_to_the_full_decode(
    demo: ModelBundle, tmp_path: Path
) -> None:
    enhanced = make_ct_series(6, rows=64, columns=64, enhanced=True)
    write_series(enhanced, tmp_path / "mf")
    multi = sorted((tmp_path / "mf").glob("*.dcm"))
    cache = SliceScores()
    assert score_files(multi, demo, cache) == [None] * len(multi)
    assert analyze_prescored(multi, demo, cache) is None
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(b"DICM not really")
    assert score_files([damaged], demo, cache) == [None]


def test_cache_is_bounded_and_forgets_a_used_series(demo: ModelBundle, series: list[Path]) -> None:
    cache = SliceScores(max_entries=5)
    score_files(series[:8], demo, cache)
    assert len(cache) == 5
    kept = [p for p in series[:8] if (k := file_key(p)) and cache.get(k, demo.identity.sha256)]
    assert kept == series[3:8]  # the oldest went first
    cache.discard(series[:8])
    assert len(cache) == 0


def test_prescorer_scores_what_arrives_once_the_model_is_ready(
    demo: ModelBundle, series: list[Path]
) -> None:
    arrived = [(i + 1, 1, path) for i, path in enumerate(series[:10])]
    ready: list[ModelBundle] = []
    cache = SliceScores()
    prescorer = Prescorer(
        lambda after: [row for row in arrived if row[0] > after],
        lambda: ready[0] if ready else None,
        cache,
        batch_size=4,
    )
    assert prescorer.run_once() == 0 and len(cache) == 0  # the model still warms
    ready.append(demo)
    while prescorer.run_once():
        pass
    assert prescorer.scored == 10 and len(cache) == 10
    arrived.append((11, 1, series[10]))
    assert prescorer.run_once() == 1 and len(cache) == 11


@pytest.mark.parametrize("reason", ["no spare CPU", "intake at full speed"])
def test_the_prescorer_waits_and_then_scores_what_arrived_meanwhile(
    demo: ModelBundle, series: list[Path], reason: str
) -> None:
    """What arrives while the cores are busy (``pipeline.spare_cpu``) or while instances
    arrive at full speed (``pipeline.intake_pace``) is scored once that is over."""
    arrived = [(i + 1, 1, path) for i, path in enumerate(series[:6])]
    waiting = [True]
    gate = (
        {"spare_cpu": lambda: not waiting[0]}
        if reason == "no spare CPU"
        else {"intake_busy": lambda: waiting[0]}
    )
    cache = SliceScores()
    prescorer = Prescorer(
        lambda after: [row for row in arrived if row[0] > after],
        lambda: demo,
        cache,
        interval=0.01,
        batch_size=4,
        **gate,
    )
    prescorer.start()
    try:
        time.sleep(0.3)
        assert prescorer.scored == 0 and len(cache) == 0
        waiting[0] = False
        assert wait_until(lambda: prescorer.scored == 6, timeout=30)
    finally:
        prescorer.stop()
    assert len(cache) == 6


def test_the_prescorer_thread_yields_the_cpu_to_intake() -> None:
    """Pre-scoring costs about what receiving costs a slice: its thread runs niced (and
    no lower, see PRESCORE_NICENESS), the rest of the process at its own priority."""
    if not sys.platform.startswith("linux"):
        unavailable("a per-thread nice value is Linux's")
    seen: list[tuple[int, int]] = []

    def warming() -> None:  # asked on the pre-scorer's thread, every turn
        thread = threading.get_native_id()
        seen.append((os.sched_getscheduler(thread), os.getpriority(os.PRIO_PROCESS, thread)))

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    prescorer = Prescorer(lambda _after: [], warming, SliceScores(), interval=0.01)
    prescorer.start()
    try:
        assert wait_until(lambda: bool(seen), timeout=10)
    finally:
        prescorer.stop()
    assert seen[0] == (os.SCHED_OTHER, min(19, base + PRESCORE_NICENESS))
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
