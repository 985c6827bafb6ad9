"""Model bundles: a manifest plus a weights file, verified before use.

A bundle is a folder ``models/<name>/`` holding ``manifest.json`` and the
weights it names (a Keras 3 ``model.keras`` or a legacy ``.h5``). The manifest
says everything the pipeline must know to use the model correctly and to
record what it used: name, version, the SHA-256 of the weights, class labels
in output order, input size, the CT windows that become input channels, the
Grad-CAM layer, the series aggregation rule, intended use and what the model
was trained on. Example::

    {
      "name": "lung-ct-demo", "version": "1.0.0",
      "weights": "model.keras", "sha256": "<hex>",
      "labels": ["Adenocarcinoma", "Large Cell Carcinoma", "Normal",
                 "Squamous Cell Carcinoma"],
      "input_size": [128, 128], "windows": ["lung", "mediastinal"],
      "gradcam_layer": "gradcam_conv",
      "aggregation": {"rule": "lesion_slices", "normal_label": "Normal",
                      "min_slices": 3, "threshold": 0.8, "top_n": 4},
      "intended_use": "...", "synthetic": true, "trained_on": "..."
    }

The original plan kept labels in a pickled ``label_encoder.pkl``. Unpickling
runs arbitrary code, so such a file is refused unless the caller passes
``trust_pickle=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungnode.domain import ModelIdentity
from lungnode.errors import BundleError
from lungnode.imaging.windowing import WINDOWS

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PICKLE_LABELS_NAME = "label_encoder.pkl"
DEFAULT_MODELS_DIR = Path("models")

_REQUIRED = ("name", "version", "sha256", "weights", "labels", "input_size", "windows")

#: Defaults of the ``lesion_slices`` rule (see ``ml.inference.aggregate``).
DEFAULT_AGGREGATION: dict[str, Any] = {
    "rule": "lesion_slices",
    "normal_label": "Normal",
    "min_slices": 3,
    "threshold": 0.8,
    "top_n": 4,
}

_cache: dict[tuple[str, str], Any] = {}
_cache_lock = threading.Lock()
_gpu_configured = False


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated ``manifest.json`` of a bundle."""

    name: str
    version: str
    sha256: str
    weights: str
    labels: tuple[str, ...]
    input_size: tuple[int, int]
    windows: tuple[str, ...]
    aggregation: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AGGREGATION))
    gradcam_layer: str | None = None
    intended_use: str = ""
    synthetic: bool = False
    trained_on: str = ""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], labels: tuple[str, ...] | None = None) -> Manifest:
        """Validate a manifest mapping; ``labels`` fills in a manifest without them."""
        raw = dict(raw)
        if labels is not None and "labels" not in raw:
            raw["labels"] = list(labels)
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise BundleError(f"manifest lacks required fields {missing}")
        labels_t = tuple(str(label) for label in raw["labels"])
        if len(labels_t) < 2 or len(set(labels_t)) != len(labels_t):
            raise BundleError(f"labels must be at least two distinct names, got {labels_t}")
        size = raw["input_size"]
        if not (
            isinstance(size, list | tuple)
            and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)
        ):
            raise BundleError(f"input_size must be [height, width] in pixels, got {size!r}")
        windows = tuple(str(w) for w in raw["windows"])
        unknown = [w for w in windows if w not in WINDOWS]
        if not windows or unknown:
            raise BundleError(f"windows {unknown or '[]'} unknown; known: {sorted(WINDOWS)}")
        aggregation = {**DEFAULT_AGGREGATION, **dict(raw.get("aggregation", {}))}
        if aggregation["rule"] != "lesion_slices":
            raise BundleError(f"unsupported aggregation rule {aggregation['rule']!r}")
        if aggregation["normal_label"] not in labels_t:
            raise BundleError(f"normal_label {aggregation['normal_label']!r} is not a label")
        sha = str(raw["sha256"]).lower()
        if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise BundleError("sha256 must be 64 hex digits")
        return cls(
            name=str(raw["name"]),
            version=str(raw["version"]),
            sha256=sha,
            weights=str(raw["weights"]),
            labels=labels_t,
            input_size=(int(size[0]), int(size[1])),
            windows=windows,
            aggregation=aggregation,
            gradcam_layer=raw.get("gradcam_layer") or None,
            intended_use=str(raw.get("intended_use", "")),
            synthetic=bool(raw.get("synthetic", False)),
            trained_on=str(raw.get("trained_on", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``manifest.json``."""
        return {
            "name": self.name,
            "version": self.version,
            "weights": self.weights,
            "sha256": self.sha256,
            "labels": list(self.labels),
            "input_size": list(self.input_size),
            "windows": list(self.windows),
            "gradcam_layer": self.gradcam_layer,
            "aggregation": self.aggregation,
            "intended_use": self.intended_use,
            "synthetic": self.synthetic,
            "trained_on": self.trained_on,
        }


@dataclass(frozen=True)
class ModelBundle:
    """A loaded, verified bundle: the manifest, the Keras model and its identity."""

    path: Path
    manifest: Manifest
    model: Any  # keras.Model; typed loosely so importing this module stays cheap
    identity: ModelIdentity
    #: Serialises calls into the model: Keras layers are not documented as
    #: thread-safe, and TensorFlow already spreads one call over all cores.
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Softmax scores (n, len(labels)) float32 for a model-input batch; thread-safe."""
        # predict_on_batch runs a compiled graph: about 3x faster than an eager
        # model(batch) call on CPU for small CNNs.
        with self.lock:
            scores = self.model.predict_on_batch(batch)
        return np.asarray(scores, dtype=np.float32)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_bundle_path(ref: str | Path, models_dir: Path | None = None) -> Path:
    """Find a bundle folder from a path (folder or manifest file) or a name under ``models_dir``."""
    candidate = Path(ref)
    if candidate.is_file() and candidate.name == MANIFEST_NAME:
        return candidate.parent
    if candidate.is_dir():
        return candidate
    named = (models_dir or DEFAULT_MODELS_DIR) / str(ref)
    if named.is_dir():
        return named
    raise BundleError(f"no model bundle at {candidate} nor named {ref!r} under {named.parent}")


def _load_pickled_labels(path: Path, trust_pickle: bool) -> tuple[str, ...]:
    if not trust_pickle:
        raise BundleError(
            f"refusing to load {path.name}: unpickling runs arbitrary code. Put the labels in "
            "manifest.json, or pass trust_pickle=True if you trust this file's origin."
        )
    logger.warning("loading pickled labels from %s because trust_pickle=True", path)
    with path.open("rb") as stream:
        obj = pickle.load(stream)  # noqa: S301 - explicitly trusted by the caller
    classes = getattr(obj, "classes_", obj)
    try:
        return tuple(str(label) for label in classes)
    except TypeError as exc:
        raise BundleError(f"{path.name} holds no sequence of labels") from exc


def read_manifest(bundle_dir: Path, *, trust_pickle: bool = False) -> Manifest:
    """Parse and validate ``manifest.json`` (labels may come from a trusted pickle)."""
    manifest_path = bundle_dir / MANIFEST_NAME
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{manifest_path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    labels = None
    labels_file = raw.get("labels_file")
    if "labels" not in raw and (labels_file or (bundle_dir / PICKLE_LABELS_NAME).exists()):
        labels = _load_pickled_labels(
            bundle_dir / str(labels_file or PICKLE_LABELS_NAME), trust_pickle
        )
    return Manifest.from_dict(raw, labels)


def configure_gpu() -> None:
    """Let TensorFlow grow GPU memory on demand instead of taking all of it.

    Must run before TensorFlow first touches the GPU; later calls are no-ops.
    """
    global _gpu_configured
    if _gpu_configured:
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # GPU already initialised by someone else
            logger.warning("cannot enable memory growth on %s: %s", gpu.name, exc)
    _gpu_configured = True


def _load_keras_model(weights: Path) -> Any:
    import keras

    # safe_mode (the default for .keras) refuses Lambda layers holding Python bytecode.
    return keras.models.load_model(weights, compile=False)


def load_bundle(
    ref: str | Path,
    models_dir: Path | None = None,
    *,
    trust_pickle: bool = False,
) -> ModelBundle:
    """Resolve, verify and load a bundle; the Keras model is loaded once per process.

    Raises ``BundleError`` when the manifest is invalid, the weights are
    missing or their SHA-256 differs from the manifest, or the model's input
    or output shape disagrees with the manifest.
    """
    bundle_dir = resolve_bundle_path(ref, models_dir).resolve()
    manifest = read_manifest(bundle_dir, trust_pickle=trust_pickle)
    weights = bundle_dir / manifest.weights
    if weights.suffix not in (".keras", ".h5"):
        raise BundleError(f"weights must be a .keras or .h5 file, got {weights.name}")
    if not weights.is_file():
        raise BundleError(f"weights file {weights} does not exist")
    actual = sha256_file(weights)
    if actual != manifest.sha256:
        raise BundleError(
            f"{weights.name} has SHA-256 {actual}, manifest says {manifest.sha256}: "
            "the weights are not the ones the manifest describes"
        )
    key = (str(weights), actual)
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            configure_gpu()
            logger.info("loading model %s %s from %s", manifest.name, manifest.version, weights)
            try:
                model = _load_keras_model(weights)
            except Exception as exc:  # Keras raises many types for a bad file
                raise BundleError(f"cannot load {weights.name}: {exc}") from exc
            _check_shapes(model, manifest)
            _cache[key] = model
    identity = ModelIdentity(
        name=manifest.name,
        version=manifest.version,
        sha256=actual,
        intended_use=manifest.intended_use,
        synthetic=manifest.synthetic,
        trained_on=manifest.trained_on,
    )
    return ModelBundle(path=bundle_dir, manifest=manifest, model=model, identity=identity)


def _check_shapes(model: Any, manifest: Manifest) -> None:
    outputs = model.outputs
    if len(outputs) != 1:
        raise BundleError(f"model must have one output, it has {len(outputs)}")
    out_shape = tuple(outputs[0].shape)
    if len(out_shape) != 2 or out_shape[-1] != len(manifest.labels):
        raise BundleError(
            f"model output shape {out_shape} does not match the {len(manifest.labels)} labels "
            f"{list(manifest.labels)}"
        )
    in_shape = tuple(model.inputs[0].shape)
    expected = (*manifest.input_size, len(manifest.windows))
    if len(in_shape) != 4 or any(
        a is not None and a != b for a, b in zip(in_shape[1:], expected, strict=True)
    ):
        raise BundleError(
            f"model input shape {in_shape} does not match manifest (None, *{expected})"
        )


def clear_cache() -> None:
    """Forget loaded models (tests, or a process that swaps bundles)."""
    with _cache_lock:
        _cache.clear()


def write_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` (sorted keys, stable for diffs) and return its path."""
    path = bundle_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
