"""Grad-CAM heatmaps (their overlay on the slice is :mod:`lungnode.imaging.heatmap`).

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional
feature map by the spatially averaged gradient of a class score, sums them,
and keeps the positive part: the regions that raised that class. We take the
gradient of the class *logit* (the input of the final softmax) because the
softmax saturates on confident slices and its gradient then vanishes.

All key slices go through one batched ``tf.GradientTape`` pass, traced once
per model into a TensorFlow graph. Heatmaps are float32 in [0, 1] at the
source slice's size.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)


def find_gradcam_layer(model: Any) -> str:
    """Name of the last top-level layer whose output is a 4D map larger than 1x1.

    Works for flat functional models, which include the ``keras.applications``
    families (ResNet, VGG, DenseNet, EfficientNet, MobileNet). Layers nested
    inside a sub-model are not searched: their outputs are not connected to
    the outer model's input, so name such a layer's parent model explicitly.
    """
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        # A 1x1 map (MobileNetV3's head after keepdims pooling) localises nothing.
        spatial = [dim for dim in shape[1:3] if dim is not None]
        if len(shape) == 4 and not (spatial and max(spatial) <= 1):
            return str(layer.name)
    raise ValueError(f"model {model.name!r} has no layer with a 4D output for Grad-CAM")


def _logit_model(model: Any, layer_name: str) -> tuple[Any, Any]:
    """A model returning (feature map, pre-softmax input of the head) and a head function.

    If the last layer is a softmax ``Activation`` or a ``Dense`` with softmax,
    the head recomputes the logits from its input; otherwise the model output
    itself is used.
    """
    import keras
    import tensorflow as tf

    target = model.get_layer(layer_name)
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    is_softmax = (
        activation is keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"
    )
    if is_softmax and isinstance(last, keras.layers.Dense):
        head_input = last.input

        def head(features: Any) -> Any:
            logits = tf.matmul(features, last.kernel)
            return logits + last.bias if last.use_bias else logits

    elif is_softmax and isinstance(last, keras.layers.Activation):
        head_input = last.input

        def head(features: Any) -> Any:
            return features

    else:
        head_input = model.output

        def head(features: Any) -> Any:
            return features

    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    grad_model = keras.Model(inputs, [target.output, head_input])
    return grad_model, head


def gradcam_batch(
    model: Any,
    batch: np.ndarray,
    class_indices: Sequence[int],
    layer_name: str | None = None,
) -> np.ndarray:
    """Grad-CAM maps (n, fh, fw) float32 in [0, 1] at the feature map's resolution.

    ``class_indices[i]`` is the class explained for ``batch[i]``. A map with no
    positive evidence is all zeros.
    """
    import tensorflow as tf

    if len(class_indices) != batch.shape[0]:
        raise ValueError("need one class index per slice")
    if batch.shape[0] == 0:
        return np.zeros((0, 0, 0), dtype=np.float32)
    name = layer_name or find_gradcam_layer(model)
    compute = _compiled_gradcam(model, name, tuple(int(d) for d in batch.shape[1:]))
    picks = tf.constant(list(enumerate(int(c) for c in class_indices)), dtype=tf.int32)
    summed = compute(tf.convert_to_tensor(batch, dtype=tf.float32), picks)
    cams: np.ndarray = summed.numpy().astype(np.float32)
    peaks = cams.reshape(cams.shape[0], -1).max(axis=1)
    peaks[peaks <= 0] = 1.0
    cams /= peaks[:, None, None]
    return cams


#: Traced Grad-CAM functions per model, by (layer, input shape); they go with the model.
_COMPILED: weakref.WeakKeyDictionary[Any, dict[tuple[str, tuple[int, ...]], Any]] = (
    weakref.WeakKeyDictionary()
)


def _compiled_gradcam(model: Any, layer_name: str, input_shape: tuple[int, ...]) -> Any:
    """The Grad-CAM pass for ``model`` as one traced TensorFlow graph, built once.

    Building the gradient model and running the tape eagerly cost more than
    the pass itself (measured in ``scripts/bench_analysis.py``: 83 ms eagerly,
    14 ms traced, for four 128x128 key slices).
    The graph takes any number of slices, so it is traced once per model.
    """
    import tensorflow as tf

    cache = _COMPILED.setdefault(model, {})
    key = (layer_name, input_shape)
    if key in cache:
        return cache[key]
    grad_model, head = _logit_model(model, layer_name)

    def body(inputs: Any, picks: Any) -> Any:
        with tf.GradientTape() as tape:
            features, head_input = grad_model(inputs, training=False)
            tape.watch(features)
            logits = head(head_input)
            # Slices are independent in inference mode, so the gradient of the
            # sum holds each slice's own gradient in its own batch row.
            chosen = tf.reduce_sum(tf.gather_nd(logits, picks))
        grads = tape.gradient(chosen, features)
        if grads is None:
            raise ValueError(f"layer {layer_name!r} does not feed the model output")
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))

    compute = tf.function(
        body,
        input_signature=[
            tf.TensorSpec((None, *input_shape), tf.float32),
            tf.TensorSpec((None, 2), tf.int32),
        ],
        reduce_retracing=True,
    )
    compute.get_concrete_function()  # trace now, so that a bad layer fails here, uncached
    cache[key] = compute
    return compute


def upsample(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize one map to (rows, cols) with bilinear interpolation, clipped to [0, 1]."""
    resized = cv2.resize(
        cam.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR
    )
    return np.clip(resized, 0.0, 1.0, out=resized)


def heatmaps_for_slices(
    bundle: Any,
    hu_slices: np.ndarray,
    class_indices: Sequence[int],
) -> list[np.ndarray]:
    """Grad-CAM maps for key slices of a bundle, at each slice's own size.

    ``hu_slices`` is (n, rows, cols) HU; the bundle's windows and input size
    build the model input, exactly as for scoring.
    """
    from lungnode.imaging.windowing import build_model_input

    if hu_slices.shape[0] == 0:
        return []
    manifest = bundle.manifest
    batch = build_model_input(hu_slices, manifest.windows, manifest.input_size)
    with bundle.lock:
        cams = gradcam_batch(bundle.model, batch, class_indices, manifest.gradcam_layer)
    shape = (hu_slices.shape[1], hu_slices.shape[2])
    return [upsample(cam, shape) for cam in cams]
