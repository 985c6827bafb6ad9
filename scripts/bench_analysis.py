"""Time the whole analysis of one series, as the series job runs it.

    python scripts/bench_analysis.py [--slices 300] [--size 512] [--repeat 3]
        [--bundle models/lung-ct-demo | --reference] [--dir DIR] [--profile] [--parts]

A synthetic axial series (phantom anatomy with an Adenocarcinoma lesion over a
few slices, ``lungnode.ml.phantoms``; no patient data) is written to disk as
single-frame 16-bit CT instances. Each repeat then runs the job's stages:
decode (``dicom.decode.load_series``), windowing and resizing, the model,
aggregation and Grad-CAM on the key slices (``pipeline.analyze.analyze_volume``).

The job decodes on one thread while the model scores the slices already
decoded on another (``pipeline.analyze.analyze_series``), so stage times
overlap. Printed: the median total seconds (target: at most 4 s for 300
slices of 512x512 on 2 CPU cores), model forward time divided by the total
(target: at least 0.8), both as measured inside the run and for the same
forward passes run alone afterwards, the median of every stage, and the peak
RSS of the process. One
warm-up run (not counted) traces the model first, as a long-running worker
would have done before its first series. ``--profile`` prints the 25 most
expensive functions of one extra decode under cProfile. ``--parts`` times
three parts on their own: reading one file with ``dicom.native_slice`` against
pydicom (header, frame geometry and pixels), building the model input
(``imaging.windowing.build_model_input``) per slice, and the CPU time a slice
costs the slice pre-scorer (``pipeline.prescore.score_files``, one batch).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The test-data generators live in tests/support (not shipped in lungnode), so a
# script run as `python scripts/x.py` puts the repository root on sys.path first.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lungnode.dicom.decode import load_series  # noqa: E402
from lungnode.domain import CLASS_LABELS  # noqa: E402
from lungnode.ml import phantoms  # noqa: E402
from lungnode.ml.bundle import ModelBundle, load_bundle  # noqa: E402
from lungnode.ml.inference import DEFAULT_BATCH_SIZE, score_slices  # noqa: E402
from lungnode.ml.train import write_bundle  # noqa: E402
from lungnode.pipeline.analyze import analyze_series  # noqa: E402
from lungnode.pipeline.prescore import SliceScores, score_files  # noqa: E402
from tests.support.synthetic import make_ct_series, write_series  # noqa: E402

STAGES = ("decode", "preprocess", "inference", "aggregate", "gradcam", "total")


def write_phantom_series(directory: Path, slices: int, size: int, seed: int) -> list[Path]:
    """Write the benchmark series; reuse it when ``directory`` already holds it."""
    existing = sorted(directory.glob("*.dcm"))
    if len(existing) == slices:
        return existing
    hu, mask = phantoms.generate_volume(seed, phantoms.ADENOCARCINOMA, slices, size, 3)
    lesion_slices = int(mask.any(axis=(1, 2)).sum())
    print(
        f"writing {slices} slices of {size}x{size}, {lesion_slices} with a lesion, to {directory}"
    )
    return write_series(
        make_ct_series(slices, rows=size, columns=size, slice_hu=hu.__getitem__), directory
    )


def run_once(paths: list[Path], bundle_path: Path) -> dict[str, float]:
    bundle = load_bundle(bundle_path)
    t0 = time.perf_counter()
    volume, result = analyze_series(paths, bundle)
    total = time.perf_counter() - t0
    timings = dict(result.timings_s)
    timings["total"] = total
    timings["forward_alone"] = forward_alone(bundle, volume.hu)
    print(
        f"  {result.verdict_text()}, key slices {result.key_slices}: "
        f"total {total:.2f} s, model alone {timings['forward_alone']:.2f} s"
    )
    return timings


def forward_alone(bundle: ModelBundle, hu: np.ndarray) -> float:
    """Seconds the model takes on the same slices with nothing else running.

    ``score_slices`` windows and scores one batch after the other and times
    the model apart from the windowing: the floor the overlapped analysis is
    compared with.
    """
    timings: dict[str, float] = {}
    score_slices(bundle, hu, DEFAULT_BATCH_SIZE, timings)
    return timings["inference"]


def time_parts(paths: list[Path], bundle_path: Path) -> None:
    """Best of 3 passes, per file and per slice; nothing else running."""
    import pydicom
    from pydicom.pixels.utils import pixel_array

    from lungnode.dicom import frames
    from lungnode.dicom.native_slice import read_native_slice
    from lungnode.imaging.windowing import build_model_input

    def fast(path: Path) -> None:
        native = read_native_slice(path)
        assert native is not None, f"{path.name} did not take the fast path"
        frames.native_frame(path, native)

    def general(path: Path) -> None:
        ds = pydicom.dcmread(path)
        frames.frames_of(path, ds)
        pixel_array(ds)

    for name, read in (("native_slice", fast), ("pydicom", general)):
        best = min(_seconds(lambda r=read: [r(p) for p in paths]) for _ in range(3))
        print(f"  read one file, {name:<12} {best / len(paths) * 1e3:.3f} ms")
    manifest = load_bundle(bundle_path).manifest
    hu = load_series(paths[:DEFAULT_BATCH_SIZE]).hu
    best = min(
        _seconds(lambda: build_model_input(hu, manifest.windows, manifest.input_size))
        for _ in range(3)
    )
    print(f"  model input, per slice   {best / hu.shape[0] * 1e3:.3f} ms")
    bundle = load_bundle(bundle_path)
    batch = paths[:DEFAULT_BATCH_SIZE]
    cpu = min(_cpu_seconds(lambda: score_files(batch, bundle, SliceScores())) for _ in range(3))
    print(f"  pre-scoring, CPU a slice {cpu / len(batch) * 1e3:.3f} ms (every thread)")


def _cpu_seconds(work: Callable[..., object]) -> float:
    """CPU time of the whole process (the model's threads too) spent on ``work``."""
    t0 = time.process_time()
    work()
    return time.process_time() - t0


def _seconds(work: Callable[..., object]) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def reference_bundle(out: Path) -> Path:
    """A bundle of the model class the speed targets were set for, random weights.

    MobileNetV3-Small (``keras.applications``, built with ``weights=None``, so
    nothing is downloaded) on the same two windows at 224x224: about 125
    slices/s on two cores where the targets were written. Its verdicts mean
    nothing; only its timings are of use.
    """
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        input_shape=(224, 224, 2),
        weights=None,
        classes=4,
        include_preprocessing=False,
    )
    return write_bundle(
        model,
        out,
        name="reference-mobilenetv3-small",
        version="0",
        labels=CLASS_LABELS,
        input_size=(224, 224),
        windows=("lung", "mediastinal"),
        intended_use="Benchmark only: random weights.",
    )


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=root / "models" / "lung-ct-demo")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is shown")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--dir", type=Path, help="where to write (and reuse) the series")
    parser.add_argument("--profile", action="store_true", help="profile one decode")
    parser.add_argument("--parts", action="store_true", help="time file reading and model input")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="instead of --bundle, a MobileNetV3-Small at 224x224 with random weights",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lungnode-bench-") as tmp:
        if args.reference:
            args.bundle = reference_bundle(Path(tmp) / "reference")
        directory = args.dir or Path(tmp) / "series"
        directory.mkdir(parents=True, exist_ok=True)
        paths = write_phantom_series(directory, args.slices, args.size, args.seed)
        print(f"CPU cores available: {len(os.sched_getaffinity(0))}")
        print("warm-up run:")
        run_once(paths, args.bundle)
        runs = []
        for k in range(args.repeat):
            print(f"run {k + 1}/{args.repeat}:")
            runs.append(run_once(paths, args.bundle))
        if args.parts:
            print("parts, best of 3:")
            time_parts(paths, args.bundle)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(load_series, paths)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)

    median = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGES}
    in_run = statistics.median(r["inference"] / r["total"] for r in runs)
    alone = statistics.median(r["forward_alone"] / r["total"] for r in runs)
    print(f"\n{args.slices} slices of {args.size}x{args.size}, median of {len(runs)} run(s):")
    for stage in STAGES:
        share = median[stage] / median["total"] if median["total"] else 0.0
        print(f"  {stage:<10} {median[stage]:7.3f} s  {share:6.1%}")
    print("  (decode, preprocess and inference overlap: their shares add up to more than 100%)")
    print(f"total analysis: {median['total']:.2f} s (target <= 4 s)")
    print(f"model forward / total: {in_run:.2f} (target >= 0.8); the model's time inside the run")
    print(
        f"model alone / total: {alone:.2f}; the same forward passes with nothing else "
        f"running ({statistics.median(r['forward_alone'] for r in runs):.3f} s)"
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
