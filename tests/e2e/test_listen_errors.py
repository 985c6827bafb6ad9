"""A port the node must listen on is taken: ``lungnode serve`` names it, says which
setting chooses another, stops what it had started, and exits 2."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable

import pytest

from tests.serve import LUNGNODE, ServedNode


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
    with socket.create_server(("127.0.0.1", port)):  # another program listens there
        result = subprocess.run(
            [str(LUNGNODE), "serve"],
            env=node.env,
            cwd=node.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert (
        f"cannot listen for {taken} on 127.0.0.1:{port}: another program listens there" in output
    ), output[-3000:]
    assert f"choose another port with {setting}" in output
    assert "Traceback" not in output
    # What had started (the ingest worker, the DICOM port) was stopped, not left.
    assert "lungnode.app.node: stopped" in output
    assert "stopped unexpectedly" not in output
