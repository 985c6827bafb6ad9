"""Slices scored while their series is still arriving.

A series' verdict comes from per-slice scores (``ml.inference``): each slice is
windowed and scored on its own, and only the aggregation looks at the whole
series. So nothing has to wait for the last slice. While a series is receiving,
the :class:`Prescorer` thread of the embedded node reads each new instance
(``dicom.decode.decode_slice``, the same reading and Modality LUT as decoding
the whole series) and scores it, and keeps the slice's header facts and scores
in a :class:`SliceScores` cache. When the series completes, the job
(``pipeline.analyze.analyze_prescored``) takes the cached scores, scores only
what the cache lacks, and decodes the pixels of its key slices alone. The time
from the last slice to the verdict no longer grows with the series.

The cache is an optimisation and nothing else: a file is known by its path,
size and modification time, so an instance that was replaced (sent again) is
scored again; anything missing is done by the job as before; the cache holds
no pixels (a few hundred bytes a slice) and forgets the oldest entries beyond
its bound. Multi-frame instances are left to the job. The scores come from the
same model; the job checks the model's SHA-256 before using them.

Only a process that runs both the receiving side and the series jobs has a
pre-scorer (``lungnode serve``); the scaled roles score at the job as before.

Each slice becomes the model's small input (``imaging.windowing.build_model_input``)
as soon as it is decoded, so a batch never holds a stack of full-size slices: that
copy alone was a third of the pre-scoring's CPU (about 1.1 ms a 512x512 slice now,
1.8 ms before). Pre-scoring is still speculative work that costs about as much CPU
a slice as receiving it does, so it should not slow intake down: it waits while
instances arrive at full speed (``pipeline.intake_pace``), scores only while the
machine has CPU to spare (``pipeline.spare_cpu``), on a thread of lower CPU
priority (nice +``PRESCORE_NICENESS``; Linux gives each thread its own). On a
busy node it falls behind, catches up once the burst is over or the cores are
idle again, and the job scores what it has not.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungnode.dicom.decode import decode_slice, order_frames, volume_of
from lungnode.dicom.frames import Frame
from lungnode.domain import AnalysisResult, HUVolume
from lungnode.errors import DecodeError
from lungnode.imaging.windowing import build_model_input
from lungnode.ml.bundle import ModelBundle
from lungnode.ml.inference import DEFAULT_BATCH_SIZE, aggregate
from lungnode.pipeline import analyze
from lungnode.pipeline.cpu_priority import lower_thread_priority

logger = logging.getLogger(__name__)

#: How much lower the pre-scorer thread's CPU priority is than the process's (nice).
#: Not lower: the thread shares the node's interpreter lock, and while the scheduler
#: keeps it off the CPU holding that lock, every other thread of the node waits
#: (``scripts/measure_thread_priority.py``: with every core busy, a normal thread
#: waited about 35 ms for the lock beside a nice-10 thread, 270 ms beside nice 19,
#: and about 1 s beside SCHED_IDLE).
PRESCORE_NICENESS = 10

#: A file as the cache knows it: path, size, modification time (ns).
FileKey = tuple[str, int, int]


def file_key(path: Path) -> FileKey | None:
    """The cache key of ``path``, or None if it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class ScoredSlice:
    """What a job needs of a slice it does not decode: its frame and its scores."""

    frame: Frame
    #: Softmax scores (classes,), float32, in the model's label order.
    scores: np.ndarray
    #: SHA-256 of the model that scored it.
    model_sha256: str


class SliceScores:
    """A bounded, thread-safe map of file keys to :class:`ScoredSlice`."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[FileKey, ScoredSlice] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: FileKey, model_sha256: str) -> ScoredSlice | None:
        with self._lock:
            found = self._entries.get(key)
        if found is None or found.model_sha256 != model_sha256:
            return None
        return found

    def put(self, key: FileKey, scored: ScoredSlice) -> None:
        with self._lock:
            self._entries[key] = scored
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, paths: Sequence[Path]) -> None:
        """Forget every entry of these files (a job has used them)."""
        wanted = {str(p) for p in paths}
        with self._lock:
            for key in [k for k in self._entries if k[0] in wanted]:
                del self._entries[key]


def score_files(
    paths: Sequence[Path],
    bundle: ModelBundle,
    cache: SliceScores,
    batch_size: int = DEFAULT_BATCH_SIZE,
    timings: dict[str, float] | None = None,
    keys: Sequence[FileKey | None] | None = None,
) -> list[ScoredSlice | None]:
    """Score the single-frame instances ``paths`` not yet in ``cache``; return every
    path's entry (None for a multi-frame or unreadable one: the caller decodes it
    the usual way, and a damaged file fails there with its reason).

    ``timings`` (if given) accumulates ``decode``, ``preprocess`` and ``inference``;
    ``keys`` are the paths' :func:`file_key` when the caller has them already.
    """
    sha = bundle.identity.sha256
    windows, input_size = bundle.manifest.windows, bundle.manifest.input_size
    found: list[ScoredSlice | None] = [None] * len(paths)
    todo: list[tuple[int, FileKey, Frame, np.ndarray]] = []
    spent = timings if timings is not None else {}
    for index, path in enumerate(paths):
        key = file_key(path) if keys is None else keys[index]
        if key is None:
            continue
        cached = cache.get(key, sha)
        if cached is not None:
            found[index] = cached
            continue
        t0 = time.perf_counter()
        try:
            decoded = decode_slice(path)
        except DecodeError:
            continue
        finally:
            spent["decode"] = spent.get("decode", 0.0) + time.perf_counter() - t0
        if decoded is None:
            continue
        frame, hu = decoded
        # The model's input now, slice by slice: the batch then holds small inputs
        # (128x128 per window), never a stack of full-size HU slices to copy.
        t0 = time.perf_counter()
        model_input = build_model_input(hu, windows, input_size)
        spent["preprocess"] = spent.get("preprocess", 0.0) + time.perf_counter() - t0
        todo.append((index, key, frame, model_input))
        if len(todo) == batch_size:
            _score(todo, bundle, cache, found, spent)
            todo = []
    if todo:
        _score(todo, bundle, cache, found, spent)
    return found


def _score(
    todo: list[tuple[int, FileKey, Frame, np.ndarray]],
    bundle: ModelBundle,
    cache: SliceScores,
    found: list[ScoredSlice | None],
    timings: dict[str, float],
) -> None:
    """Run the model on the slices' inputs (one batch) and cache every slice's scores."""
    t0 = time.perf_counter()
    scores = bundle.predict(np.concatenate([model_input for *_rest, model_input in todo]))
    timings["inference"] = timings.get("inference", 0.0) + time.perf_counter() - t0
    for (index, key, frame, _input), row in zip(todo, scores, strict=True):
        scored = ScoredSlice(frame, row.copy(), bundle.identity.sha256)
        cache.put(key, scored)
        found[index] = scored


class Prescorer:
    """Scores the instances of receiving series as they arrive, on one daemon thread.

    ``new_instances(after_id)`` lists (instance id, series id, path) of what
    arrived since; ``bundle`` returns the warmed model or None while it warms;
    ``spare_cpu`` says whether the machine has CPU to spare for the next batch
    (``pipeline.spare_cpu.SpareCpu``). A failure is logged and the instance left
    to its job.
    """

    def __init__(
        self,
        new_instances: Callable[[int], list[tuple[int, int, Path]]],
        bundle: Callable[[], ModelBundle | None],
        cache: SliceScores,
        interval: float = 0.2,
        batch_size: int = DEFAULT_BATCH_SIZE,
        spare_cpu: Callable[[], bool] = lambda: True,
        intake_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.new_instances = new_instances
        self.bundle = bundle
        self.cache = cache
        self.interval = interval
        self.batch_size = batch_size
        self.spare_cpu = spare_cpu
        self.intake_busy = intake_busy
        self.scored = 0
        self._after_id = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slice-prescorer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        lower_thread_priority(PRESCORE_NICENESS)
        while not self._stop.wait(self.interval):
            try:
                # Asked on this thread before every batch (``pipeline.intake_pace``,
                # ``pipeline.spare_cpu``): what is not scored now stays listed, for a
                # later turn or the job.
                while not self._stop.is_set() and self._may_score() and self.run_once():
                    pass
            except Exception:
                logger.exception("slice pre-scoring failed; the jobs score their slices")

    def _may_score(self) -> bool:
        """Intake is not at full speed, and the machine has CPU to spare."""
        return not self.intake_busy() and self.spare_cpu()

    def run_once(self) -> int:
        """Score what arrived since the last call, a batch at most; returns how many."""
        bundle = self.bundle()
        if bundle is None:
            return 0
        rows = self.new_instances(self._after_id)[: self.batch_size]
        if not rows:
            return 0
        self._after_id = rows[-1][0]
        spent: dict[str, float] = {}
        score_files(
            [path for _id, _series, path in rows], bundle, self.cache, self.batch_size, spent
        )
        self.scored += len(rows)
        logger.debug("pre-scored %d slices: %s", len(rows), spent)
        return len(rows)


def analyze_prescored(
    paths: Sequence[Path],
    bundle: ModelBundle,
    cache: SliceScores,
    *,
    check: Callable[[HUVolume], None] | None = None,
) -> tuple[HUVolume, AnalysisResult] | None:
    """Analyse a series from cached slice scores, decoding only its key slices' pixels.

    Slices the cache lacks are decoded and scored here, so the result does not
    depend on how far the :class:`Prescorer` got. Returns None when fewer than
    half of the slices are cached, or a file is multi-frame or cannot be read: the
    caller then decodes the series as usual (``pipeline.analyze.analyze_series``,
    which overlaps reading with the model, and names a damaged file).

    The volume has the series' geometry and order (``dicom.decode.order_frames``),
    and the pixels of the key slices only (``HUVolume.decoded_slices``).
    Timings: ``decode``, ``preprocess`` and ``inference`` of what was done here,
    then ``aggregate``, ``gradcam`` and ``total``.
    """
    started = time.perf_counter()
    sha = bundle.identity.sha256
    keys = [file_key(path) for path in paths]
    cached = sum(1 for key in keys if key is not None and cache.get(key, sha) is not None)
    if 2 * cached < len(paths):
        # Mostly unscored (a job re-queued at start, say): the whole-series decode,
        # which overlaps reading with the model, is faster than slice by slice here.
        return None
    timings: dict[str, float] = {}
    scored = score_files(paths, bundle, cache, timings=timings, keys=keys)
    if not scored or any(entry is None for entry in scored):
        return None
    entries = [entry for entry in scored if entry is not None]
    ordered, stack = order_frames([entry.frame for entry in entries])
    scores = np.stack([entries[i].scores for i in stack.order])
    verdict = aggregate(scores, bundle.manifest.labels, bundle.manifest.aggregation)
    rows, columns = ordered[0].shape
    # Zeros cost no memory until written: only the key slices' pages are touched.
    hu = np.zeros((len(ordered), rows, columns), dtype=np.float32)
    t0 = time.perf_counter()
    for index in verdict.key_slices:
        decoded = decode_slice(ordered[index].path)
        if decoded is None:
            return None
        hu[index] = decoded[1]
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
    volume = volume_of(hu, ordered, stack, frozenset(verdict.key_slices))
    if check is not None:
        check(volume)
    result = analyze.conclude(volume, bundle, scores)
    result.timings_s = {**timings, **result.timings_s, "total": time.perf_counter() - started}
    logger.info("%d of %d slices were scored while the series arrived", cached, len(paths))
    return volume, result
