"""GET /api/v1/health against a fresh app, and inside a running node."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError

from flask import Flask

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.migrate import upgrade


def fake_bundle(root: Path, corrupt: bool = False) -> Path:
    """A bundle whose manifest matches its weights file; the health check only hashes it."""
    bundle = root / "tiny"
    bundle.mkdir(parents=True)
    weights = b"not a real model, only hashed by the health check"
    (bundle / "model.keras").write_bytes(weights + (b"!" if corrupt else b""))
    manifest = {
        "name": "tiny",
        "version": "0.0.1",
        "weights": "model.keras",
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


class Listening:
    def __init__(self, value: bool) -> None:
        self.scp_listening = value


def test_health_ok(
    make_settings: Callable[..., Settings], make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    settings = make_settings(model=str(fake_bundle(tmp_path / "models")))
    upgrade(settings.effective_database_url)
    client = make_app(settings, node_status=Listening(True)).test_client()
    response = client.get("/api/v1/health")
    assert response.status_code == 200, response.json
    body = response.json
    assert body["status"] == "ok" and body["failing"] == []
    assert set(body["checks"]) == {"database", "disk", "scp", "model"}
    assert body["checks"]["model"]["name"] == "tiny"


def test_health_names_each_failing_check(
    make_settings: Callable[..., Settings], make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    settings = make_settings(
        model=str(fake_bundle(tmp_path / "models", corrupt=True)), min_free_disk_mb=2**40
    )
    client = make_app(settings, node_status=Listening(False)).test_client()
    response = client.get("/api/v1/health")
    assert response.status_code == 503
    assert set(response.json["failing"]) == {"disk", "scp", "model"}
    assert "sha256" in response.json["checks"]["model"]["error"]
    assert response.json["checks"]["disk"]["error"].startswith("storage full: ")


def test_health_without_a_node_probes_the_dicom_port(
    make_settings: Callable[..., Settings], make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    settings = make_settings(dicom_port=1, model=str(fake_bundle(tmp_path / "m")))
    client = make_app(settings).test_client()
    body = client.get("/api/v1/health").json
    assert body["failing"] == ["scp"]
    assert "no DICOM answer" in body["checks"]["scp"]["error"]


def test_unknown_route_is_json_404(settings: Settings, make_app: Callable[..., Flask]) -> None:
    response = make_app(settings).test_client().get("/api/v1/nope")
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


def test_health_inside_a_running_node(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(make_settings(model=str(fake_bundle(tmp_path / "models"))))
    url = f"http://127.0.0.1:{node.http_port}/api/v1/health"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert response.status == 200 and body["checks"]["scp"]["ok"] is True
    node.scp.stop()
    try:
        urllib.request.urlopen(url, timeout=10)
        raise AssertionError("expected 503 once the SCP stopped")
    except HTTPError as exc:
        assert exc.code == 503
        assert json.load(exc)["failing"] == ["scp"]


def test_the_api_alone_probes_the_scp_without_holding_an_association(
    make_settings: Callable[..., Settings],
    make_app: Callable[..., Flask],
    start_node: Callable[..., Node],
    tmp_path: Path,
) -> None:
    """The ``api`` role checks the SCP with an association that ends at once (its AE is
    no peer of the node, so it is rejected: an answer all the same). A bare TCP
    connection left the SCP holding an association until its network timeout."""
    import threading

    from tests.dicom.helpers import wait_until

    node = start_node(make_settings(), serve_http=False)
    threads = threading.active_count()
    settings = make_settings(dicom_port=node.scp.port, model=str(fake_bundle(tmp_path / "m")))
    client = make_app(settings).test_client()
    for _ in range(5):
        body = client.get("/api/v1/health").json
        assert body["checks"]["scp"] == {"ok": True}, body
    assert wait_until(lambda: threading.active_count() <= threads, timeout=5), [
        t.name for t in threading.enumerate()
    ]


def test_a_full_disk_fails_the_health_check_with_no_reserve_too(
    make_settings: Callable[..., Settings], make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """Before, with ``min_free_disk_mb = 0`` a disk with nothing free passed (free ≥ 0),
    and a failing disk check said no why."""
    from tests.support.small_disk import fill, small_disk

    with small_disk(tmp_path / "disk", 4) as disk:
        settings = make_settings(
            storage_dir=disk / "storage",
            model=str(fake_bundle(tmp_path / "models")),
            min_free_disk_mb=0,
        )
        upgrade(settings.effective_database_url)
        client = make_app(settings, node_status=Listening(True)).test_client()
        assert client.get("/api/v1/health").status_code == 200
        filler = disk / "filler"
        fill(filler)
        response = client.get("/api/v1/health")
        assert response.status_code == 503 and response.json["failing"] == ["disk"]
        check = response.json["checks"]["disk"]
        assert (check["ok"], check["free_mb"], check["reserved_mb"]) == (False, 0, 0)
        assert check["error"].startswith("storage full: 0.0 MiB free, 0 MiB reserved")
        filler.unlink()
        assert client.get("/api/v1/health").status_code == 200


def test_the_scp_probe_asks_twice_before_it_says_no_answer(
    make_settings: Callable[..., Settings], make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """A peer that drops the first request unanswered and rejects the second is there."""
    import socket
    import threading

    from lungnode.dicom import lean_codec

    server = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []

    def peer() -> None:
        for attempt in range(2):
            connection, _address = server.accept()
            with connection:
                connection.recv(65536)  # the A-ASSOCIATE-RQ
                connections.append(attempt)
                if attempt == 1:
                    connection.sendall(lean_codec.reject(0x01, 0x01, 0x03))
                    connection.recv(16)  # the requestor closes

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        settings = make_settings(dicom_port=port, model=str(fake_bundle(tmp_path / "m")))
        body = make_app(settings).test_client().get("/api/v1/health").json
    finally:
        thread.join(timeout=10)
        server.close()
    assert connections == [0, 1]
    assert body["checks"]["scp"] == {"ok": True}, body
