"""Grad-CAM pointing game: does the heatmap's peak fall on the lesion?

Held-out lesion phantoms (a seed the demo training never used, 24 per lesion
class, 256x256) go through the bundled demo model and
``ml.gradcam.heatmaps_for_slices`` exactly as key slices do in the pipeline:
the map explains the slice's most likely lesion class, at the slice's size.
A hit is a peak inside the lesion mask dilated by 3 pixels (1.2% of the
width), which forgives the half-cell offset of a bilinear upsampling from the
16x16 feature map but not a peak on the neighbouring anatomy.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lungnode.ml import phantoms
from lungnode.ml.bundle import load_bundle
from lungnode.ml.gradcam import heatmaps_for_slices
from lungnode.ml.inference import score_slices

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "lung-ct-demo"
SEED = 8_675_309
PER_CLASS = 24
SIZE = 256
DILATION_PX = 3
REQUIRED_RATE = 0.9


def pointing_rate() -> tuple[float, dict[str, float]]:
    bundle = load_bundle(BUNDLE)
    labels = bundle.manifest.labels
    lesion_labels = [label for label in labels if label != "Normal"]
    rng = np.random.default_rng(SEED)
    slices, masks, truth = [], [], []
    for k in range(PER_CLASS * len(lesion_labels)):
        label = lesion_labels[k % len(lesion_labels)]
        hu, mask = phantoms.generate_slice(rng, label, SIZE, rng.uniform(0.6, 1.0))
        slices.append(hu)
        masks.append(mask)
        truth.append(label)
    hu = np.stack(slices)
    scores = score_slices(bundle, hu)
    lesion_columns = [labels.index(label) for label in lesion_labels]
    explained = [lesion_columns[int(np.argmax(row[lesion_columns]))] for row in scores]
    heatmaps = heatmaps_for_slices(bundle, hu, explained)
    kernel = np.ones((2 * DILATION_PX + 1,) * 2, dtype=np.uint8)
    hits = []
    for mask, heat in zip(masks, heatmaps, strict=True):
        assert mask.any()
        target = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits.append(bool(target[row, col]))
    hits_a = np.array(hits)
    truth_a = np.array(truth)
    per_class = {label: float(hits_a[truth_a == label].mean()) for label in lesion_labels}
    return float(hits_a.mean()), per_class


def test_heatmap_peak_falls_on_the_lesion() -> None:
    rate, per_class = pointing_rate()
    print(f"pointing game: {rate:.1%} of peaks on the lesion; per class {per_class}")
    assert rate >= REQUIRED_RATE, f"pointing rate {rate:.1%}, per class {per_class}"
