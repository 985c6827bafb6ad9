"""Time the results stage of a series job: every output object, per writer.

    python scripts/bench_outputs.py [--slices 300] [--size 512] [--keys 4]
        [--repeat 20] [--profile]

A synthetic axial series (headers as the job reads them, without pixels;
``tests.support.synthetic.make_ct_series``) and an analysed result with
``--keys`` key slices, Grad-CAM blobs as heatmaps and the demo model's
identity (no model is run). Each repeat does what the series job does with a
result (``pipeline.series_job``): ``pipeline.outputs.render_results``, then
every dataset serialised as a DICOM file and every key picture as PNG.

Printed: the median milliseconds of each writer (its own time, without the
writers it calls; measured by wrapping the functions ``render_results``
calls), of the serialisation, and of the whole stage. One warm-up repeat
(not counted) lets highdicom read its tables of the standard first, as the
node's warm-up does (``pipeline.warmup``). ``--profile`` prints the 25 most
expensive functions of one extra repeat under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# The test-data generators live in tests/support (not shipped in lungnode), so a
# script run as `python scripts/x.py` puts the repository root on sys.path first.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom import Dataset  # noqa: E402

from lungnode.domain import CLASS_LABELS, AnalysisResult, HUVolume, SliceRef  # noqa: E402
from lungnode.imaging import heatmap as heatmap_module  # noqa: E402
from lungnode.pipeline import outputs  # noqa: E402
from tests.support.models import DEMO_MODEL  # noqa: E402
from tests.support.synthetic import chest_phantom_hu, make_ct_series  # noqa: E402

MODEL = DEMO_MODEL

#: (label, module, function): what render_results and the job call, timed apart.
TIMED = (
    ("sc", "lungnode.dicom.writers.sc", "write_sc_images"),
    ("key picture", "lungnode.dicom.writers.sc", "render_key_image"),
    ("pm", "lungnode.dicom.writers.parametric_map", "write_parametric_map"),
    ("pdf report", "lungnode.report.pdf", "build_report"),
    ("encapsulated pdf", "lungnode.dicom.writers.pdf", "write_pdf_document"),
    ("sr", "lungnode.dicom.writers.sr", "write_sr"),
    ("kos", "lungnode.dicom.writers.key_objects", "write_key_object_selection"),
)


class Timer:
    """Own time per label: a wrapped call's time less that of the wrapped calls inside it.

    Wall time and the CPU time of the calling thread, both: on a machine that
    other work shares, the CPU time is the steadier figure to compare.
    """

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self.own_cpu: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[float, float]] = []

    @contextmanager
    def measure(self, label: str) -> Iterator[None]:
        self._stack.append((0.0, 0.0))
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            elapsed_cpu = time.thread_time() - start_cpu
            children, children_cpu = self._stack.pop()
            self.own[label] += elapsed - children
            self.own_cpu[label] += elapsed_cpu - children_cpu
            if self._stack:
                wall, cpu = self._stack[-1]
                self._stack[-1] = (wall + elapsed, cpu + elapsed_cpu)

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.measure(label):
                return function(*args, **kwargs)

        return timed


def install(timer: Timer) -> None:
    """Wrap the writers where render_results (and the writers) look them up."""
    import importlib

    for label, module_name, name in TIMED:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            setattr(module, name, timer.wrap(label, getattr(module, name)))


def build_inputs(
    slices: int, size: int, keys: int
) -> tuple[Dataset, HUVolume, AnalysisResult, list[Dataset]]:
    blank = np.zeros((size, size), dtype=np.float32)
    series = make_ct_series(slices, rows=size, columns=size, slice_hu=lambda _k: blank)
    for ds in series:  # the job reads headers only (stop_before_pixels)
        del ds.PixelData
    refs = [SliceRef(str(ds.SOPInstanceUID)) for ds in series]
    key_slices = [slices // 2 + 3 * k for k in range(keys)]
    hu = np.zeros((slices, size, size), dtype=np.float32)  # untouched pages stay unmapped
    for index in key_slices:
        hu[index] = chest_phantom_hu(index, slices, size, size)
    v, u = np.mgrid[:size, :size].astype(np.float32)
    heatmaps = [
        np.exp(
            -((v - 0.4 * size) ** 2 + (u - (0.3 + 0.1 * k) * size) ** 2) / (2 * (0.08 * size) ** 2)
        ).astype(np.float32)
        for k in range(keys)
    ]
    scores = {
        "Adenocarcinoma": 0.82,
        "Large Cell Carcinoma": 0.07,
        "Normal": 0.05,
        "Squamous Cell Carcinoma": 0.06,
    }
    rng = np.random.default_rng(0)
    slice_scores = rng.dirichlet(np.ones(len(CLASS_LABELS)), size=slices).astype(np.float32)
    # The key slices are the verdict's most suspicious: its column is their highest.
    slice_scores[key_slices] = [scores[label] for label in CLASS_LABELS]
    result = AnalysisResult(
        verdict="Adenocarcinoma",
        confidence=scores["Adenocarcinoma"],
        class_scores=scores,
        slice_scores=slice_scores,
        key_slices=key_slices,
        key_slice_refs=[refs[k] for k in key_slices],
        model=MODEL,
        heatmaps=heatmaps,
        timings_s={"decode": 0.4, "inference": 0.9, "gradcam": 0.2},
        lesion_slices=key_slices,
        rule={
            "rule": "lesion_slices",
            "normal_label": "Normal",
            "threshold": 0.8,
            "min_slices": 3,
            "min_slices_applied": 3,
            "top_n": keys,
        },
    )
    key_headers = [series[k] for k in key_slices]
    return series[0], HUVolume(hu=hu, slices=refs), result, key_headers


def run_once(
    timer: Timer, inputs: tuple[Dataset, HUVolume, AnalysisResult, list[Dataset]]
) -> tuple[float, float]:
    """One results stage: (wall seconds, CPU seconds of all the process's threads)."""
    source, volume, result, key_headers = inputs
    start, start_cpu = time.perf_counter(), time.process_time()
    with timer.measure("render_results (rest)"):
        rendered = outputs.render_results(source, volume, result, 1, key_headers=key_headers)
    with timer.measure("serialise DICOM"):
        for _kind, dataset in rendered.datasets:
            outputs.dataset_bytes(dataset)
    with timer.measure("key pictures as PNG"):
        for picture in rendered.key_pictures:
            heatmap_module.png_bytes(picture)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    inputs = build_inputs(args.slices, args.size, args.keys)
    timer = Timer()
    install(timer)
    run_once(Timer(), inputs)  # warm-up: highdicom's tables, first imports
    per_repeat: dict[str, list[tuple[float, float]]] = defaultdict(list)
    totals = []
    for _ in range(args.repeat):
        timer.own.clear()
        timer.own_cpu.clear()
        totals.append(run_once(timer, inputs))
        for label, seconds in timer.own.items():
            per_repeat[label].append((seconds, timer.own_cpu[label]))
    print(
        f"{args.slices} slices of {args.size}x{args.size}, {args.keys} key slices, "
        f"{args.repeat} repeats; median ms of each part's own time (the timed "
        "writers it calls excluded), wall and CPU"
    )
    print(f"  {'':<24} {'wall':>8} {'cpu':>8}")
    for label, values in [*per_repeat.items(), ("total", totals)]:
        wall = 1000 * statistics.median(v[0] for v in values)
        cpu = 1000 * statistics.median(v[1] for v in values)
        print(f"  {label:<24} {wall:8.1f} {cpu:8.1f}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run_once(Timer(), inputs)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
