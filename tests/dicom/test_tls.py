"""DICOM over TLS (PS3.15 B.9, Basic TLS Secure Transport Connection Profile).

The certificates are made for each test module with the ``openssl`` command:
a CA, a server certificate for localhost and 127.0.0.1, and a client
certificate, all signed by that CA.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Instance
from tests.conftest import SENDER_AE, require_tool
from tests.dicom.helpers import associate, close_dropped, row_count
from tests.support.synthetic import make_ct_series

SERVER_NAME = "localhost"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(openssl: str, *arguments: str) -> None:
    result = subprocess.run(
        [openssl, *arguments], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"openssl {arguments[0]} failed: {result.stderr}"


def _issue(openssl: str, directory: Path, name: str, extensions: str) -> tuple[Path, Path]:
    """A P-256 key and a certificate for it, signed by the CA in ``directory``."""
    key, request, cert = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    _openssl(
        openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        openssl, "x509", "-req", "-in", str(request), "-CA", str(directory / "ca.pem"),
        "-CAkey", str(directory / "ca.key"), "-CAcreateserial", "-days", "2",
        "-sha256", "-out", str(cert), "-extfile", str(ext_file),
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    openssl = require_tool("openssl")
    directory = tmp_path_factory.mktemp("tls")
    _openssl(
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem"),
        "-days", "2", "-sha256", "-subj", "/CN=lungnode test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    server_cert, server_key = _issue(
        openssl,
        directory,
        "server",
        f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n",
    )
    client_cert, client_key = _issue(
        openssl,
        directory,
        "client",
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n",
    )
    return Certificates(directory / "ca.pem", server_cert, server_key, client_cert, client_key)


def _client_context(certificates: Certificates, *, with_certificate: bool) -> ssl.SSLContext:
    """A client that verifies the node against the test CA (and presents a certificate)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificates.ca))
    if with_certificate:
        context.load_cert_chain(certificates.client_cert, certificates.client_key)
    return context


def _tls_associate(port: int, context: ssl.SSLContext, with_store: bool = False) -> Association:
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    if with_store:
        ae.requested_contexts = [
            *ae.requested_contexts,
            build_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian]),
        ]
    return ae.associate("127.0.0.1", port, ae_title="LUNGNODE", tls_args=(context, SERVER_NAME))


# Each node runs in one process, and in two (``ingest_processes``): the node
# hands connections to a worker process, and sequential associations
# alternate between the two, so every test below runs TLS in both.
@pytest.fixture(params=[1, 2], ids=["one-process", "two-processes"])
def tls_node(
    request: pytest.FixtureRequest,
    certificates: Certificates,
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
) -> Node:
    settings = make_settings(
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        ingest_processes=request.param,
    )
    return start_node(settings, serve_http=False)


@pytest.fixture(params=[1, 2], ids=["one-process", "two-processes"])
def mutual_tls_node(
    request: pytest.FixtureRequest,
    certificates: Certificates,
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
) -> Node:
    settings = make_settings(
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        tls_ca=certificates.ca,
        ingest_processes=request.param,
    )
    return start_node(settings, serve_http=False)


def _refused(attempt: Callable[[], Association]) -> Association:
    """Run an association attempt the node must refuse; close what the SCU leaves open."""
    assoc = attempt()
    close_dropped(assoc)
    return assoc


def _echo_and_store(node: Node, context: ssl.SSLContext) -> None:
    datasets = make_ct_series(2, rows=32, columns=32)
    assoc = _tls_associate(node.scp.port, context, with_store=True)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
    assert statuses == [0x0000, 0x0000]
    with node.sessions() as session:
        received = set(session.scalars(select(Instance.sop_instance_uid)))
    assert received == {str(ds.SOPInstanceUID) for ds in datasets}


def test_tls_echo_and_store(tls_node: Node, certificates: Certificates) -> None:
    _echo_and_store(tls_node, _client_context(certificates, with_certificate=False))


def test_plain_association_to_the_tls_port_fails(
    tls_node: Node, certificates: Certificates
) -> None:
    assoc = _refused(lambda: associate(tls_node.scp.port))
    assert not assoc.is_established
    assert row_count(tls_node, Instance) == 0
    # The failed attempt did not take the listener down.
    assoc = _tls_associate(tls_node.scp.port, _client_context(certificates, with_certificate=False))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_client_certificate_signed_by_the_ca_is_accepted(
    mutual_tls_node: Node, certificates: Certificates
) -> None:
    _echo_and_store(mutual_tls_node, _client_context(certificates, with_certificate=True))


def test_client_without_a_certificate_is_refused(
    mutual_tls_node: Node, certificates: Certificates
) -> None:
    context = _client_context(certificates, with_certificate=False)
    assoc = _refused(lambda: _tls_associate(mutual_tls_node.scp.port, context, with_store=True))
    assert not assoc.is_established
    assert row_count(mutual_tls_node, Instance) == 0
    # A client with a certificate still gets in afterwards.
    assoc = _tls_associate(
        mutual_tls_node.scp.port, _client_context(certificates, with_certificate=True)
    )
    assert assoc.is_established
    assoc.release()
