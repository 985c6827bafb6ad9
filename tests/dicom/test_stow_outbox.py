"""The outbox to DICOMweb destinations (STOW-RS, PS3.18 10.5): Orthanc's DICOMweb
plugin as the real peer, and a scripted STOW-RS server for the answers Orthanc does
not give on demand (202 with a failed instance, 409, 4xx, 5xx, TLS)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.migrate import upgrade
from lungnode.db.models import Delivery, Job, Series
from lungnode.db.session import make_engine, make_session_factory
from lungnode.peers import DicomwebPeer
from lungnode.pipeline.outbox import Outbox, RetryPolicy
from tests.conftest import Databases, require_tool
from tests.dicom.stow_stub import StowRequest, StowStub, store_response
from tests.pacs import Orthanc
from tests.support.synthetic import make_ct_series, write_series

FAST = RetryPolicy(base_seconds=0.2, cap_seconds=1.0, max_attempts=6)


@pytest.fixture
def deliveries(tmp_path: Path, databases: Databases) -> Iterator[DeliveryRepository]:
    url = databases.fresh()
    upgrade(url)
    engine = make_engine(url)
    yield DeliveryRepository(make_session_factory(engine), tmp_path / "storage")
    engine.dispose()


def queue_files(repo: DeliveryRepository, paths: list[Path], destination: str) -> None:
    """Rows as the job runner leaves them: one per object."""
    with repo.sessions.begin() as session:
        series = Series(study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{time.time_ns()}")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, state="done")
        session.add(job)
        session.flush()
        for path in paths:
            session.add(
                Delivery(
                    job_id=job.id,
                    destination=destination,
                    path=str(path),
                    sop_class_uid=str(CTImageStorage),
                    sop_instance_uid=path.stem,
                )
            )


def rows(repo: DeliveryRepository) -> list[Delivery]:
    with repo.sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def by_uid(repo: DeliveryRepository) -> dict[str, Delivery]:
    return {row.sop_instance_uid: row for row in rows(repo)}


@pytest.fixture
def result_files(tmp_path: Path) -> list[Path]:
    return write_series(make_ct_series(4, rows=32, columns=32), tmp_path / "results")


def outbox_for(repo: DeliveryRepository, *peers: DicomwebPeer, **kwargs: Any) -> Outbox:
    known = {peer.name: peer for peer in peers}
    return Outbox(repo, {}, "LUNGNODE", FAST, dicomweb_peers=known, **kwargs)


def wait_due(repo: DeliveryRepository) -> None:
    """Sleep until the last pending delivery is due."""
    due = max(r.next_attempt_at.timestamp() for r in rows(repo) if r.state == "pending")
    time.sleep(max(0.0, due - time.time()) + 0.05)


# -- Orthanc's DICOMweb plugin --------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(require_tool("Orthanc"), tmp_path / "orthanc", {}, dicomweb_servers={})
    server.start()
    yield server
    server.stop()


def test_orthanc_stores_everything_by_stow(
    deliveries: DeliveryRepository, result_files: list[Path], orthanc: Orthanc
) -> None:
    peer = DicomwebPeer.parse(f"orthanc={orthanc.dicomweb_url}")
    queue_files(deliveries, result_files, "orthanc")
    outbox_for(deliveries, peer).deliver_all_due()
    assert {(r.state, r.attempts, r.last_status) for r in rows(deliveries)} == {("done", 1, 200)}
    assert orthanc.instance_uids() == {p.stem for p in result_files}


def test_orthanc_down_then_up_everything_arrives(
    deliveries: DeliveryRepository, result_files: list[Path], orthanc: Orthanc
) -> None:
    peer = DicomwebPeer.parse(f"orthanc={orthanc.dicomweb_url}")
    orthanc.stop()
    queue_files(deliveries, result_files, "orthanc")
    outbox = outbox_for(deliveries, peer, seed=7, timeout=5)
    schedule = []
    for _ in range(3):
        before = time.time()
        outbox.deliver_all_due()
        row = rows(deliveries)[0]
        schedule.append(row.next_attempt_at.timestamp() - before)
        assert row.state == "pending" and row.last_status is None
        assert (row.last_error or "").startswith("no response: ")
        wait_due(deliveries)
    # The back-off is the outbox's: attempts counted, delays growing.
    assert {r.attempts for r in rows(deliveries)} == {3}
    assert schedule[0] < schedule[2]
    orthanc.start()
    outbox.deliver_all_due()
    assert {(r.state, r.last_status, r.last_error) for r in rows(deliveries)} == {
        ("done", 200, None)
    }
    assert orthanc.instance_uids() == {p.stem for p in result_files}


class AuthenticatingOrthanc(Orthanc):
    """Orthanc with HTTP Basic authentication on (its REST API and DICOMweb alike)."""

    USER, PASSWORD = "lungnode", "stow-password"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = json.loads(self.config_path.read_text())
        config["AuthenticationEnabled"] = True
        config["RegisteredUsers"] = {self.USER: self.PASSWORD}
        self.config_path.write_text(json.dumps(config, indent=2))

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path)
        token = b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


def test_orthanc_refusing_the_credentials_is_a_dead_letter(
    deliveries: DeliveryRepository, result_files: list[Path], tmp_path: Path
) -> None:
    orthanc = AuthenticatingOrthanc(
        require_tool("Orthanc"), tmp_path / "orthanc", {}, dicomweb_servers={}
    )
    orthanc.start()
    try:
        queue_files(deliveries, result_files[:2], "anonymous")
        queue_files(deliveries, result_files[2:], "known")
        anonymous = DicomwebPeer.parse(f"anonymous={orthanc.dicomweb_url}")
        wrong = DicomwebPeer.parse(f"known={orthanc.dicomweb_url};user=lungnode;password=wrong")
        outbox_for(deliveries, anonymous, wrong).deliver_all_due()
        assert {(r.state, r.attempts, r.last_status) for r in rows(deliveries)} == {
            ("dead", 1, 401)
        }
        assert all(r.last_error == "HTTP 401: Unauthorized" for r in rows(deliveries))
        assert len(deliveries.dead_letters()) == 4
        # The operator fixes the password and retries the dead letters: delivered.
        right = DicomwebPeer.parse(
            f"known={orthanc.dicomweb_url};user=lungnode;password={orthanc.PASSWORD}"
        )
        deliveries.retry([r.id for r in rows(deliveries) if r.destination == "known"])
        outbox_for(deliveries, anonymous, right).deliver_all_due()
        assert {(r.destination, r.state) for r in rows(deliveries)} == {
            ("anonymous", "dead"),
            ("known", "done"),
        }
        assert orthanc.instance_uids() == {p.stem for p in result_files[2:]}
    finally:
        orthanc.stop()


# -- a scripted STOW-RS server ---------------------------------------------------------


def test_one_request_per_study_batch_bounded_in_count(
    deliveries: DeliveryRepository, tmp_path: Path
) -> None:
    first = write_series(make_ct_series(5, rows=16, columns=16), tmp_path / "a")
    second = write_series(make_ct_series(2, rows=16, columns=16), tmp_path / "b")
    queue_files(deliveries, first + second, "stub")
    with StowStub() as stub:
        peer = DicomwebPeer.parse(f"stub={stub.url};max_instances=3")
        outbox_for(deliveries, peer).deliver_all_due()
    study = {
        p.stem: str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in first + second
    }
    assert sorted(len(r.instances) for r in stub.requests) == [2, 2, 3]
    for request in stub.requests:
        (uid,) = {study[sop] for sop in request.instances}  # one study per request
        assert request.path == f"/dicom-web/studies/{uid}"
        assert request.headers["Accept"] == "application/dicom+json"
        assert request.headers["Content-Type"].startswith('multipart/related; type="application/')
    assert {r.state for r in rows(deliveries)} == {"done"}


def test_a_202_with_an_out_of_resources_instance_retries_that_one(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    queue_files(deliveries, result_files, "stub")
    failing = result_files[1].stem
    answers: list[int] = []

    def respond(request: StowRequest) -> tuple[int, Dataset | None]:
        answers.append(len(request.instances))
        if len(answers) == 1:
            return 202, store_response(request, failed={failing: 0xA700})
        return 200, store_response(request, failed={})

    with StowStub(respond) as stub:
        outbox = outbox_for(deliveries, DicomwebPeer.parse(f"stub={stub.url}"))
        outbox.deliver_all_due()
        states = by_uid(deliveries)
        assert (states[failing].state, states[failing].last_status) == ("pending", 0xA700)
        assert states[failing].last_error == "FailureReason 0xA700: out of resources (HTTP 202)"
        assert {(r.state, r.last_status) for u, r in states.items() if u != failing} == {
            ("done", 202)
        }
        wait_due(deliveries)
        outbox.deliver_all_due()
    assert answers == [4, 1]  # only the failed instance went again
    assert {r.state for r in rows(deliveries)} == {"done"}


def test_a_202_with_a_refused_instance_dead_letters_that_one(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    queue_files(deliveries, result_files, "stub")
    refused = result_files[0].stem

    def respond(request: StowRequest) -> tuple[int, Dataset | None]:
        return 202, store_response(request, failed={refused: 0xC000})

    with StowStub(respond) as stub:
        outbox_for(deliveries, DicomwebPeer.parse(f"stub={stub.url}")).deliver_all_due()
    states = by_uid(deliveries)
    assert (states[refused].state, states[refused].last_status) == ("dead", 0xC000)
    assert states[refused].last_error == "FailureReason 0xC000: cannot understand (HTTP 202)"
    assert {r.state for u, r in states.items() if u != refused} == {"done"}


def test_a_409_is_read_per_instance(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    """Nothing stored: the instance named with a final reason is dead, the others
    failed with it and are retried."""
    queue_files(deliveries, result_files, "stub")
    refused = result_files[2].stem

    def respond(request: StowRequest) -> tuple[int, Dataset | None]:
        answer = store_response(request, failed={refused: 0xA900})
        answer.ReferencedSOPSequence = []
        return 409, answer

    with StowStub(respond) as stub:
        outbox_for(deliveries, DicomwebPeer.parse(f"stub={stub.url}")).deliver_all_due()
    states = by_uid(deliveries)
    assert (states[refused].state, states[refused].last_status) == ("dead", 0xA900)
    others = {(r.state, r.last_status) for u, r in states.items() if u != refused}
    assert others == {("pending", 409)}


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (400, "dead"),
        (401, "dead"),
        (403, "dead"),
        (404, "dead"),
        (413, "dead"),
        (415, "dead"),
        (408, "pending"),
        (429, "pending"),
        (500, "pending"),
        (503, "pending"),
    ],
)
def test_http_statuses_are_classified(
    deliveries: DeliveryRepository, result_files: list[Path], status: int, state: str
) -> None:
    queue_files(deliveries, result_files[:2], "stub")
    with StowStub(lambda _request: (status, None)) as stub:
        outbox_for(deliveries, DicomwebPeer.parse(f"stub={stub.url}")).deliver_all_due()
    assert {(r.state, r.attempts, r.last_status) for r in rows(deliveries)} == {(state, 1, status)}
    assert all((r.last_error or "").startswith(f"HTTP {status}: ") for r in rows(deliveries))


def test_a_bearer_token_from_a_file_is_sent(
    deliveries: DeliveryRepository, result_files: list[Path], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-value\n")

    def respond(request: StowRequest) -> tuple[int, Dataset | None]:
        if request.headers.get("Authorization") != "Bearer t0ken-value":
            return 401, None
        return 200, store_response(request, failed={})

    queue_files(deliveries, result_files, "stub")
    with StowStub(respond) as stub:
        peer = DicomwebPeer.parse(f"stub={stub.url};token_file={token_file}")
        assert "t0ken-value" not in str(peer) and "t0ken-value" not in repr(peer)
        outbox_for(deliveries, peer).deliver_all_due()
    assert {(r.state, r.last_status) for r in rows(deliveries)} == {("done", 200)}


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    cert, key = tmp_path / "stow.crt", tmp_path / "stow.key"
    result = subprocess.run(
        [
            require_tool("openssl"), "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
            "-out", str(cert), "-days", "2", "-sha256", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cert, key


def test_tls_is_verified_against_the_destinations_ca(
    deliveries: DeliveryRepository, result_files: list[Path], certificate: tuple[Path, Path]
) -> None:
    with StowStub(certificate=certificate) as stub:
        queue_files(deliveries, result_files[:1], "unknown-ca")
        queue_files(deliveries, result_files[1:2], "own-ca")
        queue_files(deliveries, result_files[2:], "unverified")
        peers = [
            DicomwebPeer.parse(f"unknown-ca={stub.url}"),
            DicomwebPeer.parse(f"own-ca={stub.url};ca={certificate[0]}"),
            DicomwebPeer.parse(f"unverified={stub.url};verify=false"),
        ]
        outbox_for(deliveries, *peers).deliver_all_due()
    states = {r.destination: r for r in rows(deliveries)}
    # A certificate nobody vouches for: no response, retried (it may be fixed).
    assert states["unknown-ca"].state == "pending"
    assert "CERTIFICATE_VERIFY_FAILED" in (states["unknown-ca"].last_error or "")
    assert (states["own-ca"].state, states["own-ca"].last_status) == ("done", 200)
    assert (states["unverified"].state, states["unverified"].last_status) == ("done", 200)
    assert len(stub.requests) == 2
