"""CT windowing: Hounsfield units to display values, and the model's input tensor.

A CT window maps HU through the *linear* VOI LUT function of DICOM PS3.3
C.11.2.1.2 (Window Center / Window Width). We use it for two reasons: a
radiologist reads lung CT through these windows, so a model fed the same
windows sees what the reader sees; and each window keeps a different HU band
at full contrast (air/ground glass in the lung window, soft tissue in the
mediastinal window), so stacking windows as channels gives the model more
information than one 8-bit picture.

Everything here is float32 numpy and OpenCV, with no TensorFlow import, so the
DICOM writers can reuse it for the lung-window background of heatmaps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """A window as DICOM stores it: Window Center (0028,1050) and Width (0028,1051)."""

    center: float
    width: float

    def __post_init__(self) -> None:
        # PS3.3 C.11.2.1.2: "Window Width (0028,1051) shall always be greater
        # than or equal to 1" for the LINEAR function.
        if not self.width >= 1:
            raise ValueError(f"window width must be >= 1 (PS3.3 C.11.2.1.2), got {self.width}")

    @property
    def hu_range(self) -> tuple[float, float]:
        """The HU interval that the linear function maps onto (0, 1)."""
        low = self.center - 0.5 - (self.width - 1) / 2
        return low, low + (self.width - 1)


#: Named windows, as in common clinical presets (for example Radiopaedia,
#: "Windowing (CT)"): lung W1500/L-600, mediastinum W350/L40, bone W1800/L400,
#: soft tissue W400/L50.
WINDOWS: dict[str, Window] = {
    "lung": Window(center=-600.0, width=1500.0),
    "mediastinal": Window(center=40.0, width=350.0),
    "bone": Window(center=400.0, width=1800.0),
    "soft_tissue": Window(center=50.0, width=400.0),
}


def get_window(name: str) -> Window:
    """Look up a named window; raise ``ValueError`` naming the known ones."""
    try:
        return WINDOWS[name]
    except KeyError:
        known = ", ".join(sorted(WINDOWS))
        raise ValueError(f"unknown window {name!r}; known windows: {known}") from None


def apply_window(
    hu: np.ndarray,
    window: Window | str,
    *,
    function: Literal["LINEAR", "LINEAR_EXACT"] = "LINEAR",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Map HU to float32 in [0, 1] through a VOI LUT function.

    ``LINEAR`` is PS3.3 C.11.2.1.2.1 with y_min = 0 and y_max = 1::

        x <= c - 0.5 - (w-1)/2  -> 0
        x >  c - 0.5 + (w-1)/2  -> 1
        else y = ((x - (c - 0.5)) / (w-1) + 0.5)

    ``LINEAR_EXACT`` is C.11.2.1.3.2: y = (x - c) / w + 0.5, clipped.

    The result is float32 whatever the input type (no float64 copy is made
    for float32 input); ``out`` may be the input itself for in-place use.
    """
    win = get_window(window) if isinstance(window, str) else window
    if function == "LINEAR":
        if win.width == 1:
            # (w-1) is zero: the function degenerates to a threshold at c - 0.5.
            result: np.ndarray = np.greater(hu, win.center - 0.5).astype(np.float32)
            if out is not None:
                out[...] = result
                return out
            return result
        offset, scale = win.center - 0.5, 1.0 / (win.width - 1)
    elif function == "LINEAR_EXACT":
        offset, scale = win.center, 1.0 / win.width
    else:
        raise ValueError(f"unsupported VOI LUT function {function!r}")
    if out is None:
        out = np.empty(hu.shape, dtype=np.float32)
    np.subtract(hu, np.float32(offset), out=out, dtype=np.float32, casting="unsafe")
    out *= np.float32(scale)
    out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def window_to_uint8(hu: np.ndarray, window: Window | str = "lung") -> np.ndarray:
    """A windowed slice as 8-bit grey, the way a viewer would show it."""
    scaled = apply_window(hu, window)
    scaled *= 255.0
    scaled += 0.5
    return scaled.astype(np.uint8)


def grey_to_hu(
    grey: np.ndarray, window: Window | str = "lung", max_value: float = 255.0
) -> np.ndarray:
    """Invert a linear window: map grey levels 0..max_value back to HU (float32).

    A plain PNG/JPEG chest CT image carries no Rescale Slope/Intercept, so its
    HU are unknown. Public CT image sets are screenshots in a lung window, so
    we read grey 0..255 as that window's output range. Values that the window
    clipped (below -1350 HU or above 150 HU for the lung window) are lost and
    come back as the range ends.
    """
    win = get_window(window) if isinstance(window, str) else window
    low, high = win.hu_range
    hu = grey.astype(np.float32)
    hu *= np.float32((high - low) / max_value)
    hu += np.float32(low)
    return hu


def build_model_input(
    hu: np.ndarray,
    windows: Sequence[str],
    size: tuple[int, int],
) -> np.ndarray:
    """Turn a HU batch (slices, rows, cols) into model input (slices, h, w, windows).

    Each slice is first shrunk to the model's size with ``cv2.INTER_AREA``,
    which averages pixels and so does not alias thin structures such as
    vessels; each window then becomes one channel. Shrinking the HU first
    means windowing a 128x128 slice instead of a 512x512 one for every
    window: 0.20 ms a 512x512 slice (``scripts/bench_analysis.py --parts``)
    against 0.58 ms windowing first, for two windows at 128x128. The two
    orders differ only where a block of averaged pixels straddles a window
    edge (the average of clipped values is not the clipped average);
    training and inference use this same function, so the model sees the
    same thing in both. No full-size copy of the batch is made.
    """
    if hu.ndim == 2:
        hu = hu[np.newaxis]
    if hu.ndim != 3:
        raise ValueError(f"expected HU of shape (slices, rows, cols), got {hu.shape}")
    if not windows:
        raise ValueError("at least one window is needed")
    resolved = [get_window(name) for name in windows]
    h, w = size
    batch = np.empty((hu.shape[0], h, w, len(resolved)), dtype=np.float32)
    small = np.empty((h, w), dtype=np.float32)
    windowed = np.empty((h, w), dtype=np.float32)
    same_size = hu.shape[1:] == (h, w)
    for index in range(hu.shape[0]):
        if same_size:
            small[...] = hu[index]
        else:
            small[...] = cv2.resize(hu[index], (w, h), interpolation=cv2.INTER_AREA)
        for channel, window in enumerate(resolved):
            batch[index, :, :, channel] = apply_window(small, window, out=windowed)
    return batch


def picture_to_hu(grey_or_colour: np.ndarray) -> np.ndarray:
    """HU (float32, 2D) from a decoded PNG/JPEG array (8- or 16-bit, grey or colour).

    Colour pictures become grey first (OpenCV's BGR order). The grey levels are
    read as lung-window output; see :func:`grey_to_hu` for why.
    """
    image = grey_or_colour
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D picture, got shape {image.shape}")
    max_value = 65535.0 if image.dtype == np.uint16 else 255.0
    return grey_to_hu(image, "lung", max_value)
