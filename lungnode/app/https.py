"""TLS for the API that ``lungnode serve`` serves itself (werkzeug's server).

The ``api`` role gets the same files through gunicorn's ``certfile`` and
``keyfile`` (:mod:`lungnode.app.gunicorn_conf`).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path


class _HandshakeInRequestThread(ssl.SSLContext):
    """Sockets wrapped by this context shake hands on their first read, not at accept.

    werkzeug wraps its listening socket with the context; by default each
    accepted connection then shakes hands inside ``accept()``, on the one
    thread that accepts for the whole server, so one client that connects and
    says nothing would hold every other client off. Deferred, the handshake
    runs on the connection's own request thread.
    """

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the certificate chain and key: TLS 1.2 or newer."""
    context = _HandshakeInRequestThread(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
