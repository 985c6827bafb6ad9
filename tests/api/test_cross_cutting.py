"""Errors, request ids and logging, security headers, CORS, metrics, OpenAPI, lazy model."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from tests.api.conftest import API, dicom_bytes


def test_500_is_json_without_traceback(api: API, caplog: pytest.LogCaptureFixture) -> None:
    @api.app.get("/api/v1/boom")
    def boom() -> str:
        raise RuntimeError("secret internals /very/private/path")

    with caplog.at_level(logging.ERROR):
        response = api.client.get("/api/v1/boom")
    assert response.status_code == 500
    assert response.json == {
        "error": {"code": "internal_error", "message": "internal server error", "details": {}}
    }
    assert b"Traceback" not in response.data and b"private" not in response.data
    assert "unhandled error" in caplog.text  # the traceback goes to the log only


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/v1/nope", 404, "not_found"),
        ("PUT", "/api/v1/history", 405, "method_not_allowed"),
        ("DELETE", "/api/v1/auth/login", 405, "method_not_allowed"),
    ],
)
def test_http_errors_have_the_one_shape(
    api: API, method: str, path: str, status: int, code: str
) -> None:
    response = api.client.open(path, method=method)
    assert response.status_code == status
    assert response.json["error"]["code"] == code
    assert set(response.json["error"]) == {"code", "message", "details"}


def test_request_id_and_access_log(api: API, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lungnode.api.access"):
        given = api.client.get(
            "/api/v1/history?study_uid=1.2.840.99", headers={"X-Request-ID": "abc-123"}
        )
        made = api.client.get("/api/v1/health")
    assert given.headers["X-Request-ID"] == "abc-123"
    assert len(made.headers["X-Request-ID"]) == 32
    lines = [r.getMessage() for r in caplog.records if r.name == "lungnode.api.access"]
    assert any(
        line.startswith("GET /api/v1/history 401") and "request_id=abc-123" in line
        for line in lines
    )
    assert not any("1.2.840.99" in line for line in lines)  # no query strings in the log
    bad = api.client.get("/api/v1/health", headers={"X-Request-ID": "x" * 100 + "<>"})
    assert bad.headers["X-Request-ID"] != "x" * 100


def test_access_log_names_the_user(api: API, caplog: pytest.LogCaptureFixture) -> None:
    headers = api.headers("viewer")
    with caplog.at_level(logging.INFO, logger="lungnode.api.access"):
        api.client.get("/api/v1/auth/me", headers=headers)
    assert f"user={api.users['viewer']}" in caplog.text


def test_no_patient_data_in_logs(
    model_api: API, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    content = dicom_bytes(tmp_path)
    dataset = pydicom.dcmread(io.BytesIO(content))
    with caplog.at_level(logging.DEBUG):
        response = model_api.client.post(
            "/api/v1/predict",
            data={"file": (io.BytesIO(content), "Doe^John.dcm")},
            headers=model_api.headers("radiologist"),
            content_type="multipart/form-data",
        )
    assert response.status_code == 201, response.json
    for value in (str(dataset.PatientName), str(dataset.PatientID), "Doe^John"):
        if value:
            assert value not in caplog.text


def test_security_headers(api: API) -> None:
    headers = api.client.get("/api/v1/health").headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in headers  # no CORS unless configured
    docs = api.client.get("/api/v1/docs")
    assert docs.status_code == 200 and b"swagger" in docs.data.lower()
    # Swagger UI is served by the node itself: no third-party origin is allowed.
    assert "script-src 'self'" in docs.headers["Content-Security-Policy"]
    assert "http" not in docs.headers["Content-Security-Policy"]


def test_cors_only_for_configured_origins(make_api: Callable[..., API]) -> None:
    api = make_api(cors_origins="https://viewer.example.org")
    allowed = api.client.get("/api/v1/health", headers={"Origin": "https://viewer.example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    other = api.client.get("/api/v1/health", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers
    preflight = api.client.options(
        "/api/v1/history",
        headers={
            "Origin": "https://viewer.example.org",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "Authorization",
        },
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"


def test_metrics_prometheus_text(api: API) -> None:
    api.add_predictions(2)
    api.app.extensions["lungnode"]["metrics"].observe_stages({"inference": 0.02, "gradcam": 0.05})
    api.client.get("/api/v1/health")
    response = api.client.get("/api/v1/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain" and "version=" in response.headers["Content-Type"]
    text = response.data.decode()
    for line in (
        "lungnode_instances_received_total 0.0",
        "lungnode_series_completed_total 0.0",
        'lungnode_jobs{state="queued"} 0.0',
        'lungnode_deliveries{state="dead"} 0.0',
        'lungnode_predictions{source="upload"} 2.0',
        'lungnode_series{state="receiving"} 0.0',
    ):
        assert line in text, line
    assert 'lungnode_stage_seconds_bucket{le="0.025",stage="inference"}' in text
    assert (
        'lungnode_http_request_duration_seconds_count{method="GET",route="/api/v1/health"' in text
    )


def test_openapi_document(api: API) -> None:
    spec = api.client.get("/api/v1/openapi.json").json
    assert spec["openapi"].startswith("3.")
    paths = set(spec["paths"])
    for path in (
        "/api/v1/auth/login",
        "/api/v1/auth/refresh",
        "/api/v1/auth/me",
        "/api/v1/users",
        "/api/v1/upload",
        "/api/v1/predict",
        "/api/v1/batch-predict",
        "/api/v1/history",
        "/api/v1/history/{prediction_id}",
        "/api/v1/download/{prediction_id}",
        "/api/v1/heatmaps/{prediction_id}/{n}.png",
        "/api/v1/stats",
        "/api/v1/health",
        "/api/v1/series",
        "/api/v1/jobs",
        "/api/v1/deliveries",
        "/api/v1/deliveries/{delivery_id}/retry",
        "/api/v1/peers",
        "/api/v1/metrics",
    ):
        assert path in paths, path
    assert spec["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"
    history = spec["paths"]["/api/v1/history"]["get"]
    assert {"401", "422"} <= set(history["responses"])
    predict_body = spec["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(predict_body)


def test_importing_the_api_does_not_import_tensorflow() -> None:
    code = (
        "import sys, lungnode.api, lungnode.api.predict, lungnode.api.reports\n"
        "heavy = [m for m in ('tensorflow', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
