"""``lungnode predict`` as a user runs it, on real and synthetic CT, pictures and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import examples

from lungnode import cli
from lungnode.imaging.windowing import window_to_uint8
from lungnode.ml import phantoms
from tests.conftest import require_tool
from tests.support.synthetic import make_ct_series, write_series

LUNGNODE = str(Path(sys.executable).with_name("lungnode"))
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
MANIFEST = json.loads((MODELS_DIR / "lung-ct-demo" / "manifest.json").read_text())


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LUNGNODE_")}
    environment.update(
        LUNGNODE_STORAGE_DIR=str(tmp_path / "storage"),
        LUNGNODE_MODELS_DIR=str(MODELS_DIR),
        LUNGNODE_ENV="testing",
    )
    return subprocess.run(
        [LUNGNODE, *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )


@pytest.fixture
def in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Any:
    """Run ``lungnode`` in this process (TensorFlow loads once): returns (exit code, out, err)."""
    for name in [k for k in os.environ if k.startswith("LUNGNODE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LUNGNODE_STORAGE_DIR", str(tmp_path / "storage"))
    monkeypatch.setenv("LUNGNODE_MODELS_DIR", str(MODELS_DIR))
    monkeypatch.setenv("LUNGNODE_ENV", "testing")

    def invoke(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def test_predict_real_ct_file_json_and_report(tmp_path: Path) -> None:
    """pydicom's CT_small.dcm (a real CT slice) through the installed command."""
    pdftotext = require_tool("pdftotext")
    source = Path(examples.get_path("ct"))
    report = tmp_path / "out" / "report.pdf"
    result = run(["predict", str(source), "--json", "--report", str(report)], tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    scores = answer["confidence_scores"]
    assert list(scores) == MANIFEST["labels"]
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    # Adenocarcinoma 0.75 is under the 0.8 threshold and Normal is 0.02: no class
    # clears its bar, so the verdict is Indeterminate, with no confidence of its own.
    assert answer["prediction"] == "Indeterminate" and answer["confidence"] is None
    assert max(scores, key=scores.__getitem__) == "Adenocarcinoma"
    assert answer["model"]["sha256"] == MANIFEST["sha256"]
    assert answer["model"]["name"] == "lung-ct-demo"
    assert answer["model"]["version"] == MANIFEST["version"]
    assert answer["synthetic_model"] is True
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    assert answer["key_slices"] == [
        {
            "index": 0,
            "sop_instance_uid": uid,
            "frame_number": None,
            "slice_score": pytest.approx(max(scores.values()), abs=1e-5),
        }
    ]
    assert {"decode", "inference", "gradcam", "total"} <= set(answer["timings_s"])
    assert answer["report"] == str(report)

    text = subprocess.run(
        [pdftotext, str(report), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "For Research Use Only" in text
    assert "Verdict: Indeterminate" in text and "How the verdict is reached" in text
    assert "lung-ct-demo" in text


def test_predict_summary_is_readable(tmp_path: Path) -> None:
    result = run(["predict", str(examples.get_path("ct"))], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        "Verdict: Indeterminate (no class reached its threshold; "
        "highest score Adenocarcinoma 0.7" in out
    )
    assert "of 1 slice reached the lesion threshold" in out  # how the rule decided
    assert "so the series is not Normal either" in out
    for label in MANIFEST["labels"]:
        assert label in out
    assert "SOP Instance UID 1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322" in out
    assert MANIFEST["sha256"] in out
    assert "Trained on synthetic phantoms" in out and "not for diagnostic use" in out


def test_errors_exit_2_with_a_message_before_loading_the_model(tmp_path: Path) -> None:
    missing = run(["predict", str(tmp_path / "nowhere.dcm")], tmp_path)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert "loading model" not in missing.stderr  # refused before TensorFlow starts


def test_series_folder(tmp_path: Path, in_process: Any) -> None:
    hu, mask = phantoms.generate_volume(5, phantoms.ADENOCARCINOMA, 12, 256, 3)
    datasets = make_ct_series(12, rows=256, columns=256, slice_hu=hu.__getitem__)
    write_series(datasets, tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("not DICOM, skipped")
    code, out, err = in_process("predict", str(tmp_path / "series"), "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["slices"] == 12
    assert answer["prediction"] == "Adenocarcinoma"
    assert sum(answer["confidence_scores"].values()) == pytest.approx(1.0, abs=1e-5)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    lesion = set(np.flatnonzero(mask.any(axis=(1, 2))).tolist())
    key = answer["key_slices"]
    assert len(key) == MANIFEST["aggregation"]["top_n"]
    for item in key:
        # Slices are sorted feet to head, the order make_ct_series wrote them in.
        assert item["sop_instance_uid"] == uids[item["index"]]
        assert item["index"] in lesion


def test_png_picture(tmp_path: Path, in_process: Any) -> None:
    hu, _ = phantoms.generate_slice(11, phantoms.LARGE_CELL, 256)
    picture = tmp_path / "slice.png"
    assert cv2.imwrite(str(picture), window_to_uint8(hu, "lung"))
    code, out, err = in_process("predict", str(picture), "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["slices"] == 1
    assert answer["key_slices"][0]["sop_instance_uid"] == ""
    assert answer["prediction"] == "Large Cell Carcinoma"


def test_bad_inputs_exit_2(tmp_path: Path, in_process: Any) -> None:
    garbage = tmp_path / "broken.dcm"
    garbage.write_bytes(b"not dicom at all")
    code, _, err = in_process("predict", str(garbage))
    assert code == 2 and "broken.dcm" in err

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    code, _, err = in_process("predict", str(notes))
    assert code == 2 and "expected a PNG, JPEG or DICOM" in err

    both = tmp_path / "two-series"
    for k in range(2):
        write_series(make_ct_series(2, rows=32, columns=32, seed=k), both / str(k))
    code, _, err = in_process("predict", str(both))
    assert code == 2 and "holds 2 series" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = in_process("predict", str(empty))
    assert code == 2 and "no DICOM file" in err

    code, _, err = in_process("predict", str(notes), "--model", "no-such-model")
    assert code == 2


@pytest.mark.parametrize(("name", "modality"), [("MR_small.dcm", "MR"), ("SC_rgb_rle.dcm", "OT")])
def test_dicom_that_is_not_ct_exits_2(
    tmp_path: Path, in_process: Any, name: str, modality: str
) -> None:
    """The rule of every route (``dicom.modality``): MR_small.dcm used to get a lung verdict."""
    from pydicom.data import get_testdata_file

    source = str(get_testdata_file(name))
    code, out, err = in_process("predict", source, "--json")
    assert code == 2 and out == ""
    assert f"lungnode predict: {name}: Modality {modality} is not CT" in err
    assert "Hounsfield units" in err
    # A series folder with one such file among CT files is refused too.
    folder = tmp_path / "mixed"
    write_series(make_ct_series(2, rows=32, columns=32), folder)
    (folder / name).write_bytes(Path(source).read_bytes())
    code, _, err = in_process("predict", str(folder))
    assert code == 2 and f"Modality {modality} is not CT" in err
