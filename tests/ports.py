"""Free TCP ports on the loopback address, for servers the tests start."""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each stays bound until all are chosen, so that
    two picked one after the other cannot be the same (a server given the same port
    twice fails to start)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    """A TCP port nobody listens on right now (for servers started as subprocesses)."""
    return free_ports(1)[0]
