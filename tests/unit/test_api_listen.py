"""The API's listening socket (``app.node._listen``): ``::`` takes IPv4 as well, as
Werkzeug's own socket did before the node bound it."""

from __future__ import annotations

import socket

from lungnode.app.node import _listen
from tests.conftest import unavailable


def test_every_interface_in_ipv6_takes_ipv4_too() -> None:
    if not socket.has_dualstack_ipv6():
        unavailable("this system has no dual-stack IPv6 sockets")
    with _listen("::", 0) as listener:
        port = listener.getsockname()[1]
        for address in ("127.0.0.1", "::1"):
            with socket.create_connection((address, port), timeout=2):
                pass
