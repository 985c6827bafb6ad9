"""Bundles load only when the manifest, the weights' hash and the model agree."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from lungnode.domain import CLASS_LABELS
from lungnode.errors import BundleError, LungnodeError
from lungnode.ml import bundle as bundle_mod
from lungnode.ml.bundle import clear_cache, load_bundle, resolve_bundle_path
from lungnode.ml.train import build_small_cnn, write_bundle


def _fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": "tiny",
        "version": "0.0.1",
        "labels": CLASS_LABELS,
        "input_size": (32, 32),
        "windows": ("lung", "mediastinal"),
        "gradcam_layer": "gradcam_conv",
        "intended_use": "unit tests",
        "synthetic": True,
        "trained_on": "nothing",
    }
    fields.update(overrides)
    return fields


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    keras.utils.set_random_seed(0)
    return build_small_cnn((32, 32), 2, 4)


@pytest.fixture()
def tiny_bundle_dir(tmp_path: Path, tiny_model: Any) -> Path:
    clear_cache()
    return write_bundle(tiny_model, tmp_path / "tiny", **_fields())


def _edit_manifest(bundle_dir: Path, **changes: Any) -> None:
    path = bundle_dir / "manifest.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def test_load_bundle_returns_identity_and_a_working_model(tiny_bundle_dir: Path) -> None:
    loaded = load_bundle(tiny_bundle_dir)
    assert loaded.identity.name == "tiny" and loaded.identity.version == "0.0.1"
    assert loaded.identity.sha256 == bundle_mod.sha256_file(tiny_bundle_dir / "model.keras")
    assert loaded.identity.synthetic is True
    assert loaded.manifest.labels == CLASS_LABELS
    assert loaded.manifest.aggregation["rule"] == "lesion_slices"
    scores = loaded.predict(np.zeros((3, 32, 32, 2), dtype=np.float32))
    assert scores.shape == (3, 4) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_resolve_by_name_under_models_dir_and_by_manifest_path(tiny_bundle_dir: Path) -> None:
    assert resolve_bundle_path("tiny", tiny_bundle_dir.parent) == tiny_bundle_dir
    assert resolve_bundle_path(tiny_bundle_dir / "manifest.json") == tiny_bundle_dir
    with pytest.raises(BundleError, match="no model bundle"):
        resolve_bundle_path("absent", tiny_bundle_dir.parent)


def test_model_is_loaded_once_per_process(
    tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = bundle_mod._load_keras_model

    def counting(path: Path) -> Any:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(bundle_mod, "_load_keras_model", counting)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_bundle(tiny_bundle_dir)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len({id(r.model) for r in results}) == 1


def test_tampered_weights_are_refused(tiny_bundle_dir: Path) -> None:
    with (tiny_bundle_dir / "model.keras").open("ab") as stream:
        stream.write(b"\0")
    with pytest.raises(BundleError, match="SHA-256"):
        load_bundle(tiny_bundle_dir)


def test_output_shape_must_match_labels(tiny_bundle_dir: Path) -> None:
    _edit_manifest(tiny_bundle_dir, labels=["Normal", "Adenocarcinoma", "Other"])
    with pytest.raises(BundleError, match="output shape"):
        load_bundle(tiny_bundle_dir)


def test_input_shape_must_match_windows_and_size(tiny_bundle_dir: Path) -> None:
    _edit_manifest(tiny_bundle_dir, windows=["lung"])
    with pytest.raises(BundleError, match="input shape"):
        load_bundle(tiny_bundle_dir)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sha256": None}, "required fields"),
        ({"windows": ["lung", "x-ray"]}, "unknown"),
        ({"input_size": [32]}, "input_size"),
        ({"labels": ["Normal", "Normal"]}, "distinct"),
        ({"aggregation": {"rule": "majority"}}, "aggregation rule"),
        ({"weights": "model.pt"}, ".keras or .h5"),
    ],
)
def test_invalid_manifests_raise_bundle_error(
    tiny_bundle_dir: Path, changes: dict[str, Any], message: str
) -> None:
    _edit_manifest(tiny_bundle_dir, **changes)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(tiny_bundle_dir)
    assert isinstance(info.value, LungnodeError) and isinstance(info.value, ValueError)


def test_pickled_labels_are_refused_unless_trusted(tiny_bundle_dir: Path) -> None:
    _edit_manifest(tiny_bundle_dir, labels=None)
    with (tiny_bundle_dir / "label_encoder.pkl").open("wb") as stream:
        pickle.dump(list(CLASS_LABELS), stream)
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(tiny_bundle_dir)
    trusted = load_bundle(tiny_bundle_dir, trust_pickle=True)
    assert trusted.manifest.labels == CLASS_LABELS


def test_legacy_h5_weights_load(tmp_path: Path, tiny_model: Any) -> None:
    clear_cache()
    bundle_dir = write_bundle(tiny_model, tmp_path / "legacy", **_fields())
    tiny_model.save(bundle_dir / "model.h5")
    _edit_manifest(
        bundle_dir, weights="model.h5", sha256=bundle_mod.sha256_file(bundle_dir / "model.h5")
    )
    loaded = load_bundle(bundle_dir)
    x = np.random.default_rng(0).random((2, 32, 32, 2), dtype=np.float32)
    np.testing.assert_allclose(
        loaded.predict(x), tiny_model.predict_on_batch(x), rtol=1e-4, atol=1e-5
    )
