"""The Grad-CAM heatmap drawn over the lung-window slice, and saved as PNG.

Pure numpy and OpenCV: the DICOM writers, the API and the series job all draw
with these, and none of them needs the model to do it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from lungnode.imaging.windowing import window_to_uint8


def overlay(
    hu_slice: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.4,
    legend: bool = True,
) -> np.ndarray:
    """An RGB uint8 image: the lung-window slice with the heatmap in JET colours.

    The heatmap (values in [0, 1], same size as the slice) is blended with
    weight ``alpha``, scaled by the heatmap so that cold regions keep the
    grey anatomy. A vertical colour bar labelled 0 to 1 is drawn at the
    right edge so a reader can read the scale without the report.
    """
    if heatmap.shape != hu_slice.shape:
        raise ValueError(f"heatmap {heatmap.shape} and slice {hu_slice.shape} differ in size")
    grey = window_to_uint8(hu_slice, "lung")
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR).astype(np.float32)
    heat8 = np.clip(heatmap * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(heat8, cv2.COLORMAP_JET).astype(np.float32)
    weight = (alpha * np.clip(heatmap, 0.0, 1.0))[..., None].astype(np.float32)
    bgr = (base * (1.0 - weight) + colour * weight).astype(np.uint8)
    if legend:
        _draw_legend(bgr)
    rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb


def _draw_legend(bgr: np.ndarray) -> None:
    """Draw a JET colour bar (1 at the top, 0 at the bottom) with labels, in place."""
    rows, cols = bgr.shape[:2]
    bar_w = max(6, cols // 40)
    bar_h = max(20, rows // 3)
    x0 = cols - bar_w - max(4, cols // 64) - max(10, cols // 25)
    y0 = (rows - bar_h) // 2
    ramp = np.linspace(255, 0, bar_h).astype(np.uint8)[:, None].repeat(bar_w, axis=1)
    bgr[y0 : y0 + bar_h, x0 : x0 + bar_w] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    cv2.rectangle(bgr, (x0 - 1, y0 - 1), (x0 + bar_w, y0 + bar_h), (255, 255, 255), 1)
    scale = max(0.3, rows / 1024)
    for text, y in (("1", y0 + int(10 * scale * 2)), ("0", y0 + bar_h)):
        cv2.putText(
            bgr,
            text,
            (x0 + bar_w + 3, y),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )


def save_png(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG; raise ``OSError`` if OpenCV cannot."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write PNG {path}")
    return path


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 image encoded as PNG, in memory (the caller writes it as it must:
    OpenCV's own file write reports a full disk only as False, and leaves a part)."""
    encoded, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not encoded:
        raise ValueError("OpenCV cannot encode the image as PNG")
    return bytes(buffer.tobytes())
