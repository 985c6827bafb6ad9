"""Where ``lungnode serve`` listens. A port it must listen on is taken: it names it,
says which setting chooses another, stops what it had started, and exits 2. The
API on an IPv6 address listens there, and is named as an address is written."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from tests.conftest import unavailable
from tests.dicom.helpers import wait_until
from tests.serve import LUNGNODE, ServedNode, port_open


def _serve_while_taken(node: ServedNode, host: str, port: int) -> tuple[int, str]:
    """``lungnode serve`` while another program listens on ``host:port``: its exit
    status and output."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, port), family=family):
        result = subprocess.run(
            [str(LUNGNODE), "serve"],
            env=node.env,
            cwd=node.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    return result.returncode, result.stdout + result.stderr


def _require_ipv6_loopback() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        unavailable(f"this machine has no IPv6 loopback address: {exc}")


@pytest.mark.parametrize("taken", ["DICOM", "the API"])
def test_a_port_in_use_is_named_and_the_node_exits_2(
    serve_node: Callable[..., ServedNode], taken: str
) -> None:
    node = serve_node()  # relative storage/ under its working directory, as `make run`
    port, setting = (
        (node.dicom_port, "LUNGNODE_DICOM_PORT")
        if taken == "DICOM"
        else (node.http_port, "LUNGNODE_HTTP_PORT")
    )
    returncode, output = _serve_while_taken(node, "127.0.0.1", port)
    assert returncode == 2, output[-3000:]
    assert (
        f"cannot listen for {taken} on 127.0.0.1:{port}: another program listens there" in output
    ), output[-3000:]
    assert f"choose another port with {setting}" in output
    assert "Traceback" not in output
    # What had started (the ingest worker, the DICOM port) was stopped, not left.
    assert "lungnode.app.node: stopped" in output
    assert "stopped unexpectedly" not in output


def test_the_api_listens_on_an_ipv6_address(serve_node: Callable[..., ServedNode]) -> None:
    """``http_host = "::1"``: the API is served on the IPv6 loopback and on it only, and
    the log names the address as a URL writes it."""
    _require_ipv6_loopback()
    node = serve_node(http_host="::1")
    log = node.workdir / "serve-ipv6.log"
    with log.open("wb") as stream:
        process = subprocess.Popen(
            [str(LUNGNODE), "serve"],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=node.env,
            cwd=node.workdir,
        )
    try:
        up = wait_until(lambda: process.poll() is not None or port_open(node.http_port, "::1"), 90)
        assert up and process.poll() is None, log.read_text(errors="replace")[-3000:]
        url = f"http://[::1]:{node.http_port}/api/v1/health"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                status, body = response.status, json.load(response)
        except urllib.error.HTTPError as error:  # 503 while the model warms up
            status, body = error.code, json.load(error)
        assert status in (200, 503) and "status" in body
        assert not port_open(node.http_port)  # not on 127.0.0.1
        assert f"API listening on http://[::1]:{node.http_port}/api/v1" in log.read_text()
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]


def test_a_taken_ipv6_port_is_named_as_an_address(
    serve_node: Callable[..., ServedNode],
) -> None:
    _require_ipv6_loopback()
    node = serve_node(http_host="::1")
    returncode, output = _serve_while_taken(node, "::1", node.http_port)
    assert returncode == 2, output[-3000:]
    assert f"cannot listen for the API on [::1]:{node.http_port}: another program" in output
