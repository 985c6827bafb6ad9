"""The node warms its model in the background at start (issue 10, defect 4).

The SCP answers while the model loads; ``/health`` says ``warming``, then
``ready``; a job that starts before the warm-up ends waits for it; the API's
``/predict`` uses the same bundle, so the model is loaded once. A bundle that
cannot load fails the health check with the reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import pydicom
import pytest
from sqlalchemy import select

import lungnode.ml.bundle as bundle_module
import lungnode.pipeline.series_job as series_job_module
from lungnode.api import context
from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Job
from tests.api.conftest import ADMIN_PASSWORD, multipart, png_bytes
from tests.dicom.helpers import associate, store_all, wait_until
from tests.support.synthetic import make_ct_series


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except HTTPError as exc:
        return exc.code, json.load(exc)


def _post(url: str, body: bytes, content_type: str, token: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except HTTPError as exc:
        return exc.code, json.load(exc)


def _predict(base: str, content: bytes | None = None, name: str = "image.png") -> tuple[int, Any]:
    login = json.dumps({"username": "admin", "password": ADMIN_PASSWORD}).encode()
    status, tokens = _post(f"{base}/auth/login", login, "application/json")
    assert status == 200, tokens
    form = multipart(png_bytes(64) if content is None else content, name)
    return _post(f"{base}/predict", form["data"], form["content_type"], tokens["access_token"])


def _job_state(node: Node) -> str | None:
    with node.sessions() as session:
        job = session.scalars(select(Job)).one_or_none()
        return job.state if job is not None else None


@pytest.fixture
def slow_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[Any]]]:
    """Every bundle load waits for the event, and is counted."""
    gate = threading.Event()
    loads: list[Any] = []
    real = bundle_module.load_bundle

    def slow_load(*args: Any, **kwargs: Any) -> bundle_module.ModelBundle:
        loads.append(args)
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(bundle_module, "load_bundle", slow_load)
    monkeypatch.setattr(series_job_module, "load_bundle", slow_load)
    yield gate, loads
    gate.set()


@pytest.mark.slow
def test_the_node_receives_while_the_model_warms_and_a_job_waits_for_it(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tiny_bundle: Path,
    tmp_path: Path,
    slow_loads: tuple[threading.Event, list[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate, loads = slow_loads
    monkeypatch.setattr(context, "MODEL_WAIT_SECONDS", 0.5, raising=False)
    # A copy: the process-wide model cache must not already hold it.
    bundle = shutil.copytree(tiny_bundle, tmp_path / "tiny")
    settings = make_settings(model=str(bundle), admin_password=ADMIN_PASSWORD)
    node = start_node(settings, analyse=True)
    base = f"http://127.0.0.1:{node.http_port}/api/v1"

    # Warming: healthy (the node receives), and the SCP answers echo and store.
    status, body = _get(f"{base}/health")
    assert status == 200, body
    assert body["checks"]["model"]["state"] == "warming"
    assoc = associate(node.scp.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert store_all(node.scp.port, make_ct_series(6, rows=32, columns=32)) == [0] * 6
    status, answer = _predict(base)
    assert (status, answer["error"]["code"]) == (503, "model_warming"), answer

    # The series' job starts, and waits for the model.
    assert wait_until(lambda: _job_state(node) == "running", timeout=30)
    time.sleep(0.5)
    assert _job_state(node) == "running"
    assert node.model is not None and node.model.state == "warming"

    gate.set()
    assert wait_until(lambda: _job_state(node) == "done", timeout=60)
    status, body = _get(f"{base}/health")
    assert status == 200 and body["checks"]["model"]["state"] == "ready", body
    assert body["checks"]["model"]["warm_up_seconds"] > 0
    status, answer = _predict(base)
    assert status == 201, answer
    assert len(loads) == 1, "the job or /predict loaded the bundle again"


def test_a_bundle_that_cannot_load_fails_health_with_the_reason(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tiny_bundle: Path,
    tmp_path: Path,
) -> None:
    # The manifest and the weights' hash agree (the start's check passes), but
    # the weights are no Keras model: only loading them tells.
    bundle = shutil.copytree(tiny_bundle, tmp_path / "broken")
    weights = b"not a Keras model"
    (bundle / "model.keras").write_bytes(weights)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(weights).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    settings = make_settings(model=str(bundle))
    node = start_node(settings, analyse=True)
    url = f"http://127.0.0.1:{node.http_port}/api/v1/health"
    assert node.scp.listening
    assert wait_until(lambda: _get(url)[0] == 503, timeout=60)
    status, body = _get(url)
    assert body["failing"] == ["model"]
    model = body["checks"]["model"]
    assert model["state"] == "failed" and "cannot load model.keras" in model["error"], model


@pytest.mark.parametrize(
    ("name", "code"),
    [("MR_small.dcm", "not_ct"), ("dicomdirtests/77654033/CT2/17106", "image_too_small")],
)
def test_an_image_that_is_not_analysed_is_refused_at_once_while_the_model_warms(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tiny_bundle: Path,
    tmp_path: Path,
    slow_loads: tuple[threading.Event, list[Any]],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    code: str,
) -> None:
    """Found by the bad-input corpus drill: ``/predict`` waited for the model before it
    looked at the image, so an MR image sent while the node warmed answered 503
    ``model_warming`` (after a minute) instead of 422 ``not_ct``."""
    monkeypatch.setattr(context, "MODEL_WAIT_SECONDS", 5, raising=False)
    bundle = shutil.copytree(tiny_bundle, tmp_path / "tiny")
    node = start_node(make_settings(model=str(bundle), admin_password=ADMIN_PASSWORD), analyse=True)
    base = f"http://127.0.0.1:{node.http_port}/api/v1"
    assert node.model is not None and node.model.state == "warming"
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    status, answer = _predict(base, path.read_bytes(), "image.dcm")
    assert (status, answer["error"]["code"]) == (422, code), answer
    assert node.model.state == "warming"
