"""A scripted STOW-RS origin server on a free loopback port, for the answers a real
PACS gives only by accident: a 202 with one failed instance, a 409, a 401, a 503.

It reads each request as a real server would (multipart/related of application/dicom
parts, PS3.18 8.6.1.2.1), records what came, and answers with what the test's
``respond`` returns: an HTTP status and, optionally, a Store Instances Response
(PS3.18 10.5.3) as DICOM JSON.
"""

from __future__ import annotations

import io
import json
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread


@dataclass
class StowRequest:
    path: str
    headers: Mapping[str, str]
    #: SOP Instance UID -> SOP Class UID of each part.
    instances: dict[str, str]


#: ``respond(request)`` -> (HTTP status, response body as a Dataset or None).
Responder = Callable[[StowRequest], tuple[int, Dataset | None]]


def stored_everything(request: StowRequest) -> tuple[int, Dataset | None]:
    return 200, store_response(request, failed={})


def store_response(request: StowRequest, failed: Mapping[str, int]) -> Dataset:
    """A Store Instances Response: ``failed`` (SOP Instance UID -> FailureReason) in the
    FailedSOPSequence, every other instance of the request in the ReferencedSOPSequence."""
    response = Dataset()
    response.FailedSOPSequence = []
    response.ReferencedSOPSequence = []
    for uid, sop_class in request.instances.items():
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        if uid in failed:
            item.FailureReason = failed[uid]
            response.FailedSOPSequence.append(item)
        else:
            response.ReferencedSOPSequence.append(item)
    return response


def _parts(body: bytes, content_type: str) -> Iterator[bytes]:
    boundary = next(
        p.split("=", 1)[1].strip('"')
        for p in (part.strip() for part in content_type.split(";"))
        if p.startswith("boundary=")
    )
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        _headers, _, payload = chunk.partition(b"\r\n\r\n")
        yield payload[:-2] if payload.endswith(b"\r\n") else payload


@dataclass
class StowStub:
    respond: Responder = stored_everything
    certificate: tuple[Path, Path] | None = None
    requests: list[StowRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the http.server hook
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                instances = {}
                for part in _parts(body, self.headers.get("Content-Type", "")):
                    dataset = dcmread(io.BytesIO(part))
                    instances[str(dataset.SOPInstanceUID)] = str(dataset.SOPClassUID)
                request = StowRequest(self.path, dict(self.headers.items()), instances)
                stub.requests.append(request)
                status, answer = stub.respond(request)
                payload = json.dumps(answer.to_json_dict()).encode() if answer is not None else b""
                self.send_response(status)
                if payload:
                    self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.certificate)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.certificate is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self) -> StowStub:
        self._thread.start()
        return self

    def __exit__(self, *args: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
