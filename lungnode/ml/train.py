"""Training: the bundled demo model (on phantoms) and a model from a labelled folder.

Both functions take explicit arguments and write a complete bundle
(``model.keras`` + ``manifest.json`` with the weights' SHA-256), so their
output loads through ``ml.bundle.load_bundle`` like any other bundle.

The demo model is a small separable-convolution CNN. It was chosen by
measurement: it scores several hundred slices per second on two CPU cores,
where EfficientNetB0 manages about 20 and MobileNetV3-Small about 125, and it
learns the phantom classes almost perfectly. It knows nothing about real
patients (see ``ml.phantoms``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungnode.domain import CLASS_LABELS
from lungnode.imaging.windowing import build_model_input
from lungnode.ml import phantoms
from lungnode.ml.bundle import DEFAULT_AGGREGATION, Manifest, sha256_file, write_manifest

logger = logging.getLogger(__name__)

DEMO_NAME = "lung-ct-demo"
DEMO_WINDOWS: tuple[str, ...] = ("lung", "mediastinal")
DEMO_INPUT_SIZE = (128, 128)
#: Matrix sizes of the training phantoms (real CT is usually 512x512).
PHANTOM_SIZES = (256, 384, 512)
GRADCAM_LAYER = "gradcam_conv"
#: The demo model's lesion map (one channel, sigmoid) that gates the Grad-CAM layer.
LESION_MAP_LAYER = "lesion_map"
DEMO_INTENDED_USE = (
    "Demonstration and testing of the lungnode pipeline only. Trained on synthetic "
    "phantoms, not on patient data. NOT FOR DIAGNOSTIC USE."
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ""}

#: Folder-name prefixes of the public "chest CT-scan images" set, mapped onto our labels.
_FOLDER_LABELS = (
    (re.compile(r"^adeno"), "Adenocarcinoma"),
    (re.compile(r"^large[._ -]?cell"), "Large Cell Carcinoma"),
    (re.compile(r"^normal"), "Normal"),
    (re.compile(r"^squamous"), "Squamous Cell Carcinoma"),
)


def build_small_cnn(input_size: tuple[int, int], channels: int, n_classes: int) -> Any:
    """A small separable-conv CNN built so that plain Grad-CAM localises.

    The last conv block keeps a (H/4)x(W/4) map, 32x32 at 128x128 input, with
    no dilation: coarser maps put the heatmap peak a whole cell away from
    small lesions. A 1x1 convolution with a sigmoid (``lesion_map``) gates
    that map, and the gated map (``gradcam_conv``) is what is pooled: class
    evidence can only come from where the gate is open, which the demo
    trainer teaches to be the lesion (:func:`train_demo`). Global max pooling
    and a softmax layer whose weights are constrained to be non-negative keep
    class evidence where the lesion is: a negative weight would subtract
    evidence at the lesion itself. Batch normalisation makes it learn in a
    few epochs, but its moving averages lag while the weights still change
    fast, so the trainers recalibrate them after fitting
    (:func:`recalibrate_batchnorm`).
    """
    import keras
    from keras import layers

    # He initialisation for both halves of a separable conv. Keras computes a
    # depthwise kernel's fan-in as 9 x channels, though each output sums only
    # 9 inputs; its fan-out (9) is the true fan-in, so scale by that.
    he = {
        "depthwise_initializer": keras.initializers.VarianceScaling(2.0, "fan_out"),
        "pointwise_initializer": "he_normal",
    }

    def separable(x: Any, filters: int, name: str | None = None) -> Any:
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, **he)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(name=name)(x)

    inputs = keras.Input((*input_size, channels), name="windows")
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = separable(x, 32)
    x = layers.MaxPooling2D()(x)
    x = separable(x, 64)
    x = separable(x, 96)
    features = separable(x, 128)
    # A spatial gate: where the model sees no lesion the features are
    # suppressed before pooling, so class evidence can only come from where
    # it does. The Grad-CAM layer is the gated map.
    lesion = layers.Conv2D(1, 1, activation="sigmoid", name=LESION_MAP_LAYER)(features)
    x = layers.Multiply(name=GRADCAM_LAYER)([features, lesion])
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(
        n_classes,
        activation="softmax",
        name="scores",
        kernel_constraint=keras.constraints.NonNeg(),
    )(x)
    return keras.Model(inputs, outputs, name="lungnode_small_cnn")


def phantom_inputs(
    seed: phantoms.SeedLike,
    n_per_class: int,
    input_size: tuple[int, int] = DEMO_INPUT_SIZE,
    windows: Sequence[str] = DEMO_WINDOWS,
    sizes: Sequence[int] = PHANTOM_SIZES,
    chunk: int = 128,
    map_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs (n, h, w, c), label indices and lesion maps for a balanced phantom set.

    Each chunk of phantoms is drawn at a size from ``sizes``: a model trained
    at one matrix size alone failed at another (61% on 512x512 phantoms after
    97% on 256x256), because downsampling changes noise and edge sharpness.
    Phantoms are windowed a chunk at a time, so only the small model inputs
    are kept, never the full-size HU of the whole set.

    The lesion maps (n, *map_size, 1) hold the fraction of each cell that is
    lesion (zero for Normal), at ``map_size`` (default: a quarter of
    ``input_size``, the demo model's Grad-CAM map).
    """
    map_h, map_w = map_size or (input_size[0] // 4, input_size[1] // 4)
    rng = phantoms.as_generator(seed)
    labels = np.asarray(rng.permutation(np.repeat(np.arange(len(CLASS_LABELS)), n_per_class)))
    x = np.empty((labels.size, *input_size, len(windows)), dtype=np.float32)
    maps = np.empty((labels.size, map_h, map_w, 1), dtype=np.float32)
    for start in range(0, labels.size, chunk):
        part = labels[start : start + chunk]
        size = int(sizes[int(rng.integers(len(sizes)))])
        hu = np.empty((part.size, size, size), dtype=np.float32)
        for i, index in enumerate(part):
            scale = rng.uniform(0.6, 1.0)
            hu[i], mask = phantoms.generate_slice(rng, CLASS_LABELS[index], size, scale)
            maps[start + i, :, :, 0] = cv2.resize(
                mask.astype(np.float32), (map_w, map_h), interpolation=cv2.INTER_AREA
            )
        x[start : start + part.size] = build_model_input(hu, windows, input_size)
    return x, labels.astype(np.int64), maps


def recalibrate_batchnorm(model: Any, x: np.ndarray, batch_size: int = 64) -> None:
    """Set every BatchNormalization's moving statistics to the exact ones on ``x``.

    Moving averages lag behind weights that are still changing, and a model
    can then score well in training mode yet predict one class in inference
    mode. Layer by layer (earlier layers already fixed, in inference mode),
    we measure the mean and variance of each BN input over ``x`` and store
    them, so inference sees the statistics training normalised with.
    """
    import keras

    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        # One input tensor, not a list: Keras warns when the call's structure differs.
        probe = keras.Model(model.inputs[0], layer.input)
        count = 0
        total = np.zeros(layer.input.shape[-1], dtype=np.float64)
        total_sq = np.zeros_like(total)
        for start in range(0, x.shape[0], batch_size):
            features = np.asarray(probe.predict_on_batch(x[start : start + batch_size]))
            flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
            total += flat.sum(axis=0)
            total_sq += np.square(flat).sum(axis=0)
            count += flat.shape[0]
        mean = total / count
        variance = np.maximum(total_sq / count - np.square(mean), 0.0)
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))


def write_bundle(model: Any, out_dir: Path, **fields: Any) -> Path:
    """Save ``model`` as ``model.keras`` plus a manifest with its SHA-256 (``fields``: the rest)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.keras"
    model.save(weights)
    manifest = Manifest(weights=weights.name, sha256=sha256_file(weights), **fields)
    write_manifest(out_dir, manifest)
    logger.info("wrote bundle %s %s to %s", manifest.name, manifest.version, out_dir)
    return out_dir


def train_demo(
    out_dir: Path,
    seed: int = 20240601,
    *,
    n_per_class: int = 1000,
    n_val_per_class: int = 150,
    epochs: int = 10,
    batch_size: int = 64,
    input_size: tuple[int, int] = DEMO_INPUT_SIZE,
    windows: Sequence[str] = DEMO_WINDOWS,
    version: str = "1.3.0",
    lesion_map_weight: float = 5.0,
    verbose: int = 1,
) -> Path:
    """Train the demo model on phantoms, reproducibly, and write its bundle to ``out_dir``.

    The same seed gives the same weights on the same machine and TensorFlow
    build: phantoms come from ``seed``, Keras, NumPy and Python RNGs are
    seeded with ``keras.utils.set_random_seed``, and TensorFlow's kernels are
    made deterministic (for the rest of the process). Returns ``out_dir``.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Multi-threaded kernels may sum in a different order on every run;
    # deterministic ones make the seed give the same weights (and slow
    # training down: about 8 minutes instead of 2 on two cores).
    tf.config.experimental.enable_op_determinism()
    model = build_small_cnn(input_size, len(windows), len(CLASS_LABELS))
    map_size = tuple(model.get_layer(LESION_MAP_LAYER).output.shape[1:3])
    x_train, y_train, m_train = phantom_inputs(
        seed, n_per_class, input_size, windows, map_size=map_size
    )
    x_val, y_val, m_val = phantom_inputs(
        seed + 1, n_val_per_class, input_size, windows, map_size=map_size
    )
    logger.info("training demo model on %d phantom slices", y_train.size)
    # Phantoms come with their lesion masks, so the demo model's lesion map
    # (the gate in front of its pooling) is also taught where lesions are.
    # Measured on held-out phantoms (tests/unit/test_pointing_game.py): with
    # no gate, the Grad-CAM peak fell on the lesion for 72-100% of them
    # depending on the run, the misses a cell or two off towards the pleura
    # or the mediastinum; gated with weight 1, 85-99%; with weight 5, 97-100%.
    trainer = keras.Model(model.inputs[0], [model.output, model.get_layer(LESION_MAP_LAYER).output])
    # Cosine decay to zero settles the weights in the last epochs; a fixed
    # number of epochs keeps the run reproducible.
    steps = epochs * -(-y_train.size // batch_size)
    trainer.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss=["sparse_categorical_crossentropy", "binary_crossentropy"],
        loss_weights=[1.0, lesion_map_weight],
        metrics=[["accuracy"], []],
    )
    trainer.fit(
        x_train,
        (y_train, m_train),
        validation_data=(x_val, (y_val, m_val)),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=verbose,
    )
    recalibrate_batchnorm(model, x_train[: 20 * batch_size])
    if verbose:
        predicted = np.concatenate(
            [
                np.asarray(model.predict_on_batch(x_val[i : i + batch_size])).argmax(axis=1)
                for i in range(0, y_val.size, batch_size)
            ]
        )
        accuracy = float((predicted == y_val).mean())
        logger.info("after batch-norm recalibration: validation accuracy %.4f", accuracy)
    return write_bundle(
        model,
        out_dir,
        name=DEMO_NAME,
        version=version,
        labels=CLASS_LABELS,
        input_size=input_size,
        windows=tuple(windows),
        gradcam_layer=GRADCAM_LAYER,
        aggregation=dict(DEFAULT_AGGREGATION),
        intended_use=DEMO_INTENDED_USE,
        synthetic=True,
        trained_on=(
            f"{y_train.size} synthetic phantom slices (lungnode.ml.phantoms, seed {seed}); "
            "no patient data"
        ),
    )


def folder_label(folder_name: str) -> str:
    """Our label for a class folder: the public set's long names map onto the four classes.

    ``adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib`` becomes ``Adenocarcinoma``,
    ``large.cell.carcinoma_...`` ``Large Cell Carcinoma``, ``normal``
    ``Normal``, ``squamous.cell.carcinoma_...`` ``Squamous Cell Carcinoma``.
    Any other folder name is used as the label unchanged.
    """
    lowered = folder_name.strip().lower()
    for pattern, label in _FOLDER_LABELS:
        if pattern.match(lowered):
            return label
    return folder_name.strip()


def read_image_hu(path: Path) -> np.ndarray:
    """HU (2D float32) of a training image: PNG/JPEG via the lung window, DICOM via its rescale.

    DICOM here is read with pydicom directly (one frame, Modality LUT per
    PS3.3 C.11.1), because training runs outside the node and ``ml`` does not
    depend on ``dicom``.
    """
    import cv2

    from lungnode.imaging.windowing import picture_to_hu

    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"cannot read image {path}")
        return picture_to_hu(image)
    import pydicom
    from pydicom.pixels.processing import apply_rescale

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    if pixels.ndim == 3:
        pixels = pixels[pixels.shape[0] // 2]
    return np.asarray(apply_rescale(pixels, dataset), dtype=np.float32)


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Image files per label, from one folder per class under ``root`` (see :func:`folder_label`).

    Files are found recursively; hidden files and other suffixes are skipped.
    Folders that map to the same label are merged.
    """
    files: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if images:
            files.setdefault(folder_label(folder.name), []).extend(images)
    return files


def _load_split(
    files: dict[str, list[Path]],
    labels: tuple[str, ...],
    input_size: tuple[int, int],
    windows: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(path, labels.index(label)) for label, paths in files.items() for path in paths]
    x = np.empty((len(pairs), *input_size, len(windows)), dtype=np.float32)
    y = np.empty(len(pairs), dtype=np.int64)
    for i, (path, index) in enumerate(pairs):
        x[i] = build_model_input(read_image_hu(path)[np.newaxis], windows, input_size)[0]
        y[i] = index
    return x, y


def train_from_folder(
    data_dir: Path,
    out_dir: Path,
    *,
    name: str = "lung-ct",
    version: str = "1.0.0",
    seed: int = 20240601,
    input_size: tuple[int, int] = DEMO_INPUT_SIZE,
    windows: Sequence[str] = DEMO_WINDOWS,
    epochs: int = 40,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    patience: int = 6,
    verbose: int = 1,
) -> Path:
    """Train on a folder-per-class image set and write a bundle to ``out_dir``.

    ``data_dir`` holds one folder per class (PNG, JPEG or DICOM files), or a
    ``train/`` folder laid out that way plus an optional ``valid/`` folder
    (the public "chest CT-scan images" layout). Without ``valid/``, a
    stratified ``val_fraction`` of each class is held out. Training uses
    flips, small rotations, zooms and shifts as augmentation, class weights
    against imbalance, and early stopping on validation loss (best weights
    kept). The labels must include ``Normal``, which the series rule needs.
    """
    import keras
    import tensorflow as tf

    data_dir = Path(data_dir)
    train_root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    train_files = scan_class_folders(train_root)
    valid_root = data_dir / "valid" if (data_dir / "valid").is_dir() else None
    valid_files = scan_class_folders(valid_root) if valid_root else {}
    labels = tuple(sorted(set(train_files) | set(valid_files)))
    if len(labels) < 2:
        raise ValueError(f"{data_dir} needs at least two class folders with images, found {labels}")
    if "Normal" not in labels:
        raise ValueError(f"{data_dir} needs a 'normal' class folder; found {labels}")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if not valid_files:
        for label, paths in train_files.items():
            shuffled = [paths[i] for i in rng.permutation(len(paths))]
            n_val = max(1, round(len(paths) * val_fraction)) if len(paths) > 1 else 0
            valid_files[label], train_files[label] = shuffled[:n_val], shuffled[n_val:]
    x_train, y_train = _load_split(train_files, labels, input_size, windows)
    x_val, y_val = _load_split(valid_files, labels, input_size, windows)
    logger.info(
        "training on %d images, validating on %d, labels %s", y_train.size, y_val.size, labels
    )

    augment = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.04, fill_mode="nearest", seed=seed + 1),
            keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 2),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed + 3),
        ],
        name="augment",
    )
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(y_train), seed=seed)
        .batch(batch_size)
        .map(lambda x, y: (augment(x, training=True), y))
        .prefetch(2)
    )
    counts = np.bincount(y_train, minlength=len(labels))
    class_weight = {
        i: float(y_train.size / (len(labels) * max(1, c))) for i, c in enumerate(counts)
    }
    model = build_small_cnn(input_size, len(windows), len(labels))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        train_ds,
        validation_data=(x_val, y_val) if y_val.size else None,
        epochs=epochs,
        shuffle=False,  # the dataset shuffles itself each epoch
        verbose=verbose,
        class_weight=class_weight,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss" if y_val.size else "loss",
                patience=patience,
                restore_best_weights=True,
            )
        ],
    )
    recalibrate_batchnorm(model, x_train[: 20 * batch_size])
    return write_bundle(
        model,
        out_dir,
        name=name,
        version=version,
        labels=labels,
        input_size=input_size,
        windows=tuple(windows),
        gradcam_layer=GRADCAM_LAYER,
        aggregation={**DEFAULT_AGGREGATION, "normal_label": "Normal"},
        intended_use="Research use only. NOT FOR DIAGNOSTIC USE.",
        synthetic=False,
        trained_on=f"{y_train.size} images from folder '{data_dir.name}' ({', '.join(labels)})",
    )
