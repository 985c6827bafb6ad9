"""``lungnode train`` wiring: a bundle from a folder, and clear refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungnode import cli
from lungnode.imaging.windowing import window_to_uint8
from lungnode.ml import phantoms
from lungnode.ml.bundle import load_bundle


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("LUNGNODE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LUNGNODE_STORAGE_DIR", str(tmp_path / "storage"))
    monkeypatch.setenv("LUNGNODE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("LUNGNODE_ENV", "testing")


def test_train_from_folder_writes_a_loadable_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    for folder, label in (
        ("normal", phantoms.NORMAL),
        ("adenocarcinoma_x", phantoms.ADENOCARCINOMA),
    ):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for k in range(4):
            hu, _ = phantoms.generate_slice(rng, label, 128)
            cv2.imwrite(str(tmp_path / "data" / folder / f"{k}.png"), window_to_uint8(hu, "lung"))
    out = tmp_path / "models" / "mine"
    code = cli.main(["train", "--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "1"])
    assert code == 0
    assert f"bundle written to {out}" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "mine" and manifest["labels"] == ["Adenocarcinoma", "Normal"]
    assert load_bundle("mine", tmp_path / "models").identity.sha256 == manifest["sha256"]


def test_train_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", "--data", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "only").mkdir()
    assert cli.main(["train", "--data", str(tmp_path / "only"), "--out", str(tmp_path / "o")]) == 2
    assert "class folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--demo", "--data", str(tmp_path)])
