"""HTTPS served by the node itself, forwarded headers from trusted proxies only,
and the production guard against plain HTTP beyond loopback."""

from __future__ import annotations

import logging
import socket
import ssl
import urllib.request
from collections.abc import Callable
from http.client import HTTPException
from typing import Any
from urllib.error import URLError

import pytest

from lungnode.app.node import Node
from lungnode.config import Settings, load_settings
from lungnode.errors import ConfigError
from tests.api.conftest import API, ServerCertificate


def _get_https(port: int, certificate: ServerCertificate, path: str = "/api/v1/metrics") -> Any:
    context = ssl.create_default_context(cafile=str(certificate.cert))
    return urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context, timeout=10)


def test_serve_answers_https_with_its_certificate(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    server_certificate: ServerCertificate,
) -> None:
    settings = make_settings(
        http_tls_cert=server_certificate.cert, http_tls_key=server_certificate.key
    )
    node = start_node(settings)
    # A client that connects and says nothing does not hold the others off.
    with socket.create_connection(("127.0.0.1", node.http_port)):
        with _get_https(node.http_port, server_certificate) as response:
            assert response.status == 200
            assert b"lungnode_http_request_duration_seconds" in response.read()
            assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
    # Plain HTTP on the TLS port is refused, and the server keeps serving.
    with pytest.raises((URLError, HTTPException, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/api/v1/metrics", timeout=10)
    with _get_https(node.http_port, server_certificate) as response:
        assert response.status == 200
    # A client that does not trust the certificate refuses the server.
    with pytest.raises(URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"https://127.0.0.1:{node.http_port}/api/v1/metrics",
            context=ssl.create_default_context(),
            timeout=10,
        )


def _login(api: API, client_address: str, username: str, forwarded_for: str = "") -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    response = api.client.post(
        "/api/v1/auth/login",
        json={"username": username, "password": "wrong-password"},
        headers=headers,
        environ_base={"REMOTE_ADDR": client_address},
    )
    return response.status_code


def test_forwarded_address_counts_only_from_a_trusted_proxy(
    make_api: Callable[..., API], caplog: pytest.LogCaptureFixture
) -> None:
    api = make_api(trusted_proxies="10.0.0.0/8", rate_limit_login="2/minute")
    proxy, outsider = "10.0.0.5", "192.0.2.1"
    with caplog.at_level(logging.INFO, logger="lungnode.api.access"):
        # Through the proxy: each forwarded client has its own login limit.
        assert [_login(api, proxy, f"a{i}", "203.0.113.7") for i in range(3)] == [401, 401, 429]
        assert _login(api, proxy, "a3", "203.0.113.8") == 401
        # A spoofed entry left of a trusted chain is not believed: the client is
        # the nearest address that is not a trusted proxy.
        assert _login(api, proxy, "a4", "203.0.113.7, 198.51.100.9, 10.0.0.9") == 401
        assert _login(api, proxy, "a5", "203.0.113.7, 198.51.100.9, 10.0.0.9") == 401
        assert _login(api, proxy, "a6", "198.51.100.9") == 429
        # Straight from a client: its own address counts, whatever it forwards.
        assert _login(api, outsider, "b0", "203.0.113.20") == 401
        assert _login(api, outsider, "b1", "203.0.113.21") == 401
        assert _login(api, outsider, "b2", "203.0.113.22") == 429
    lines = [r.getMessage() for r in caplog.records if r.name == "lungnode.api.access"]
    assert sum("from=203.0.113.7 " in line for line in lines) == 3
    assert sum("from=198.51.100.9 " in line for line in lines) == 3
    assert sum("from=192.0.2.1 " in line for line in lines) == 3
    assert not any(f"from={proxy} " in line or "from=203.0.113.2" in line for line in lines)


def test_forwarded_scheme_counts_only_from_a_trusted_proxy(make_api: Callable[..., API]) -> None:
    api = make_api(trusted_proxies="10.0.0.5")
    forwarded = {"X-Forwarded-Proto": "https"}
    trusted = api.client.get(
        "/api/v1/metrics", headers=forwarded, environ_base={"REMOTE_ADDR": "10.0.0.5"}
    )
    assert trusted.headers.get("Strict-Transport-Security") == "max-age=31536000"
    direct = api.client.get(
        "/api/v1/metrics", headers=forwarded, environ_base={"REMOTE_ADDR": "10.0.0.6"}
    )
    assert "Strict-Transport-Security" not in direct.headers


def test_without_trusted_proxies_forwarded_headers_are_ignored(
    make_api: Callable[..., API],
) -> None:
    api = make_api(rate_limit_login="1/minute")
    assert _login(api, "127.0.0.1", "c0", "203.0.113.30") == 401
    assert _login(api, "127.0.0.1", "c1", "203.0.113.31") == 429


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert load_settings(trusted_proxies="10.1.2.3, 10.9.0.0/16").trusted_proxies == [
        "10.1.2.3/32",
        "10.9.0.0/16",
    ]
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(trusted_proxies="proxy.example.org")


PRODUCTION = {"env": "production", "secret_key": "x" * 32}


def test_production_refuses_plain_http_beyond_loopback(
    server_certificate: ServerCertificate,
) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10", "api.example.org"):
        with pytest.raises(ConfigError, match="LUNGNODE_ALLOW_PLAIN_HTTP"):
            load_settings(**PRODUCTION, http_host=host).check_safe_to_serve_http()
    for host in ("127.0.0.1", "::1", "localhost"):
        load_settings(**PRODUCTION, http_host=host).check_safe_to_serve_http()
    plain = load_settings(**PRODUCTION, http_host="0.0.0.0", allow_plain_http=True)
    plain.check_safe_to_serve_http()
    load_settings(
        **PRODUCTION,
        http_host="0.0.0.0",
        http_tls_cert=server_certificate.cert,
        http_tls_key=server_certificate.key,
    ).check_safe_to_serve_http()
    load_settings(env="development", http_host="0.0.0.0").check_safe_to_serve_http()


def test_tls_files_must_exist_and_come_in_pairs(server_certificate: ServerCertificate) -> None:
    with pytest.raises(ConfigError, match="http_tls_cert and http_tls_key"):
        load_settings(http_tls_cert=server_certificate.cert)
    missing = server_certificate.cert.with_name("missing.key")
    with pytest.raises(ConfigError, match="LUNGNODE_HTTP_TLS_KEY"):
        load_settings(
            http_tls_cert=server_certificate.cert, http_tls_key=missing
        ).check_safe_to_serve_http()
