"""Measure a bundle: held-out phantom accuracy, slices/s, and memory for a long series.

    python scripts/bench_inference.py [--bundle models/lung-ct-demo] [--slices 320]
        [--accuracy-per-class 250] [--series 600]

Throughput is end to end from 512x512 HU (windowing, resize, model) at
batch 32, after one warm-up batch. Accuracy uses 256x256 and 512x512 phantoms
from seeds the demo training never used. ``--series`` runs a whole ``analyze_volume`` on a
phantom series of that many slices and prints the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from lungnode.domain import CLASS_LABELS, HUVolume, SliceRef
from lungnode.ml import phantoms
from lungnode.ml.bundle import load_bundle
from lungnode.ml.inference import score_slices
from lungnode.pipeline.analyze import analyze_volume

HELD_OUT_SEED = 777_001


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--bundle", type=Path, default=root / "models" / "lung-ct-demo")
    parser.add_argument("--slices", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accuracy-per-class", type=int, default=250)
    parser.add_argument("--series", type=int, default=0, help="slices of a whole-series memory run")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    labels = bundle.manifest.labels

    for size in (256, 512) if args.accuracy_per_class else ():
        hu, y = phantoms.generate_dataset(HELD_OUT_SEED + size, args.accuracy_per_class, size)
        predicted = score_slices(bundle, hu).argmax(axis=1)
        accuracy = float((predicted == y).mean())
        print(f"held-out phantom accuracy at {size}x{size}: {accuracy:.4f} on {y.size} slices")
        for i, label in enumerate(labels):
            row = np.bincount(predicted[y == i], minlength=len(labels))
            print(f"  {label:<24} -> predicted {row.tolist()}")
        del hu

    rng = np.random.default_rng(1)
    hu = np.stack(
        [phantoms.generate_slice(rng, CLASS_LABELS[i % 4], 512)[0] for i in range(args.slices)]
    )
    score_slices(bundle, hu[: args.batch_size], args.batch_size)  # warm-up
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    score_slices(bundle, hu, args.batch_size, timings)
    elapsed = time.perf_counter() - t0
    print(
        f"throughput: {args.slices / elapsed:.1f} slices/s ({args.slices} slices of 512x512, "
        f"batch {args.batch_size}; preprocess {timings['preprocess']:.2f} s, "
        f"inference {timings['inference']:.2f} s)"
    )
    del hu

    if args.series:
        volume_hu, _ = phantoms.generate_volume(5, CLASS_LABELS[0], args.series, 512)
        volume = HUVolume(volume_hu, [SliceRef(f"1.2.3.{i}") for i in range(args.series)])
        result = analyze_volume(volume, bundle)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        timings_text = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings_s.items())
        verdict = result.verdict_text()
        print(f"series of {args.series} slices: {verdict}; {timings_text}")
        volume_mib = volume_hu.nbytes / 2**20
        print(f"peak RSS of this process: {peak_mib:.0f} MiB (volume alone {volume_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
