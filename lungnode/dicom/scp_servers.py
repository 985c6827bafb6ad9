"""The SCP's association servers: where each accepted connection goes.

pynetdicom's threaded server, with what the node changes about it: TLS is
negotiated in the connection's own thread; with ingest worker processes the
listening node hands connections over (``dicom.ingest_workers``) and a worker
runs what it is handed; with ``store_receiver = "lean"`` the lean receiver
(``dicom.lean_store``) reads each A-ASSOCIATE-RQ first and serves storage-only
associations itself, replaying the request to pynetdicom for every other one.
The AE's association limit counts both kinds.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from lungnode.dicom.lean_store import LeanReceiver

if TYPE_CHECKING:
    from lungnode.dicom.ingest_workers import IngestWorkers

logger = logging.getLogger(__name__)


class Replayed:
    """A connected socket whose first ``recv`` calls return bytes already read.

    When the lean receiver hands an association to pynetdicom it has read the
    A-ASSOCIATE-RQ already; pynetdicom reads it again from here. Everything
    else is the socket's own (``__getattr__``).
    """

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self._sock = sock
        self._prefix = prefix

    @property
    def pending_prefix(self) -> int:
        return len(self._prefix)

    def recv(self, size: int, *args: Any) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return self._sock.recv(size, *args)

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._prefix) + (inner() if callable(inner) else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class WrapInThreadServer(ThreadedAssociationServer):
    """Accepts plain connections and negotiates TLS in the connection's own thread.

    pynetdicom wraps in ``get_request``, in the accepting thread, where a slow
    or silent TLS client holds up every other connection; a connection that
    may be handed to another process must not be wrapped here at all.
    """

    on_connection_closed: Callable[[], None] | None = None
    #: Serves storage-only associations itself (``store_receiver = "lean"``).
    lean: LeanReceiver | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        connection, address = self.socket.accept()
        return connection, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:
                logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                request.close()
                if self.on_connection_closed is not None:
                    self.on_connection_closed()
                return
        if self.lean is not None:
            try:
                leftover = self.lean.serve(request, client_address)
            except Exception:  # never lose the connection's thread silently
                logger.exception("the lean receiver failed on a connection")
                request.close()
                leftover = None
            if leftover is None:
                if self.on_connection_closed is not None:
                    self.on_connection_closed()
                return
            request = Replayed(request, leftover)  # pynetdicom serves it
        super().process_request_thread(request, client_address)


class _ReplayingSocket(AssociationSocket):
    """pynetdicom's socket over a :class:`Replayed` one: readable while bytes wait."""

    @property
    def ready(self) -> bool:
        sock = self.socket
        if isinstance(sock, Replayed) and self._is_connected and sock.pending():
            return True
        return bool(super().ready)


class RequestHandlerForReplay(RequestHandler):
    """pynetdicom's, for a connection the lean receiver read the request of."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        transport = assoc.dul.socket
        if isinstance(self.request, Replayed) and type(transport) is AssociationSocket:
            transport.__class__ = _ReplayingSocket
        return assoc


class NodeAE(AE):
    """The AE, whose association limit counts the lean receiver's associations too."""

    lean: LeanReceiver | None = None

    @property
    def maximum_associations(self) -> int:
        configured = int(self._maximum_associations)
        return configured - (self.lean.active if self.lean is not None else 0)

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]


class DispatchingServer(WrapInThreadServer):
    """The node's listening server when there are ingest worker processes."""

    dispatcher: IngestWorkers

    def process_request(self, request: Any, client_address: Any) -> None:
        index = self.dispatcher.choose()
        if index and self.dispatcher.hand_over(index, request, client_address):
            request.close()  # the worker holds its own descriptor now
            return
        super().process_request(request, client_address)


class HandedOverServer(WrapInThreadServer):
    """A worker's server: binds and listens to nothing, runs what it is handed."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def close_handed_over(self) -> None:
        """Abort running associations and release the (never bound) socket."""
        for assoc in self.active_associations:
            assoc.abort()
        if self.socket is not None:
            self.socket.close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)
