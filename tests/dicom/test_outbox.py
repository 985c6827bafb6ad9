"""The outbox against real peers: Orthanc, and pynetdicom SCPs that answer badly."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.migrate import upgrade
from lungnode.db.models import Delivery, Job, Series
from lungnode.db.session import make_engine, make_session_factory
from lungnode.peers import Peer
from lungnode.pipeline.outbox import Outbox, RetryPolicy
from tests.conftest import Databases, require_tool
from tests.dicom.helpers import wait_until
from tests.pacs import ORTHANC_AE, Orthanc, free_port
from tests.support.synthetic import make_ct_series, write_series

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"

FAST = RetryPolicy(base_seconds=0.2, cap_seconds=1.0, max_attempts=6)


@pytest.fixture
def deliveries(tmp_path: Path, databases: Databases) -> Iterator[DeliveryRepository]:
    url = databases.fresh()
    upgrade(url)
    engine = make_engine(url)
    yield DeliveryRepository(make_session_factory(engine), tmp_path / "storage")
    engine.dispose()


def queue_files(repo: DeliveryRepository, paths: list[Path], destinations: list[str]) -> None:
    """Rows as the job runner leaves them: one per object per destination."""
    with repo.sessions.begin() as session:
        series = Series(study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{time.time_ns()}")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, state="done")
        session.add(job)
        session.flush()
        for destination in destinations:
            for path in paths:
                uid = path.stem
                session.add(
                    Delivery(
                        job_id=job.id,
                        destination=destination,
                        path=str(path),
                        sop_class_uid=str(CTImageStorage),
                        sop_instance_uid=uid,
                    )
                )


def rows(repo: DeliveryRepository) -> list[Delivery]:
    with repo.sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


@pytest.fixture
def result_files(tmp_path: Path) -> list[Path]:
    return write_series(make_ct_series(4, rows=32, columns=32), tmp_path / "results")


class FakePACS:
    """A pynetdicom Storage SCP that answers every C-STORE with a chosen status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.received: list[str] = []
        self.ae = AE(ae_title="FAKEPACS")
        self.ae.add_supported_context(CTImageStorage)
        self.port = free_port()

    def _on_store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def __enter__(self) -> FakePACS:
        self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def __exit__(self, *args: object) -> None:
        self.ae.shutdown()

    @property
    def peer(self) -> Peer:
        return Peer("fake", "FAKEPACS", "127.0.0.1", self.port)


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    policy = RetryPolicy(base_seconds=2.0, cap_seconds=60.0, max_attempts=10)
    rng = random.Random(1)
    for attempt, step in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (9, 60.0)]:
        delays = {policy.delay(attempt, rng) for _ in range(50)}
        assert all(step / 2 <= d <= step for d in delays)
        assert len(delays) > 1  # jitter


def test_final_failure_is_dead_lettered_with_reason(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    with FakePACS(0xA900) as pacs:
        queue_files(deliveries, result_files, ["fake"])
        Outbox(deliveries, {"fake": pacs.peer}, "LUNGNODE", FAST).deliver_all_due()
    assert len(pacs.received) == 4
    assert {(r.state, r.attempts, r.last_status) for r in rows(deliveries)} == {("dead", 1, 0xA900)}
    assert all("0xA900" in (r.last_error or "") for r in rows(deliveries))
    assert len(deliveries.dead_letters()) == 4
    # An operator retries the dead letters: they are pending again, due now.
    assert deliveries.retry() == 4
    assert {r.state for r in rows(deliveries)} == {"pending"}


def test_out_of_resources_is_retried_later(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    with FakePACS(0xA700) as pacs:
        queue_files(deliveries, result_files[:1], ["fake"])
        policy = RetryPolicy(base_seconds=60.0, cap_seconds=600.0, max_attempts=5)
        Outbox(deliveries, {"fake": pacs.peer}, "LUNGNODE", policy).deliver_all_due()
    (row,) = rows(deliveries)
    assert (row.state, row.attempts, row.last_status) == ("pending", 1, 0xA700)
    assert 30 <= (row.next_attempt_at - row.updated_at).total_seconds() <= 60


def test_unreachable_destination_does_not_block_the_others(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    # A "PACS" that accepts TCP and never answers: association set-up hangs until timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    hung = Peer("hung", "HUNG", "127.0.0.1", silent.getsockname()[1])
    try:
        with FakePACS(0x0000) as pacs:
            queue_files(deliveries, result_files, ["hung", "fake"])
            outbox = Outbox(
                deliveries, {"hung": hung, "fake": pacs.peer}, "LUNGNODE", FAST, timeout=8
            )
            started = time.monotonic()
            futures = outbox.dispatch()
            while len(pacs.received) < 4 and time.monotonic() - started < 8:
                time.sleep(0.05)
            assert len(pacs.received) == 4
            assert time.monotonic() - started < 6  # did not wait for the hung destination
            for future in futures:
                future.result()
    finally:
        silent.close()
    by_destination = {(r.destination, r.state) for r in rows(deliveries)}
    assert by_destination == {("fake", "done"), ("hung", "pending")}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(require_tool("Orthanc"), tmp_path / "orthanc", {})
    server.start()
    yield server
    server.stop()


def test_orthanc_receives_everything(
    deliveries: DeliveryRepository, result_files: list[Path], orthanc: Orthanc
) -> None:
    peer = Peer("pacs", ORTHANC_AE, "127.0.0.1", orthanc.dicom_port)
    queue_files(deliveries, result_files, ["pacs"])
    Outbox(deliveries, {"pacs": peer}, "LUNGNODE", FAST).deliver_all_due()
    assert {r.state for r in rows(deliveries)} == {"done"}
    assert orthanc.instance_uids() == {p.stem for p in result_files}


def test_pacs_down_then_up_everything_arrives(
    deliveries: DeliveryRepository, result_files: list[Path], orthanc: Orthanc
) -> None:
    peer = Peer("pacs", ORTHANC_AE, "127.0.0.1", orthanc.dicom_port)
    orthanc.stop()
    queue_files(deliveries, result_files, ["pacs"])
    outbox = Outbox(deliveries, {"pacs": peer}, "LUNGNODE", FAST, seed=7)
    schedule = []
    for _ in range(3):
        before = time.time()
        outbox.deliver_all_due()
        row = rows(deliveries)[0]
        schedule.append(row.next_attempt_at.timestamp() - before)
        assert row.state == "pending" and "no association" in (row.last_error or "")
        time.sleep(max(0.0, row.next_attempt_at.timestamp() - time.time()) + 0.05)
    # The back-off is visible in the database: attempts counted, delays growing.
    assert rows(deliveries)[0].attempts == 3
    assert schedule[0] < schedule[2]
    orthanc.start()
    outbox.deliver_all_due()
    assert {r.state for r in rows(deliveries)} == {"done"}
    assert orthanc.instance_uids() == {p.stem for p in result_files}
    # Sending again (as after a crash before recording) keeps one copy per instance.
    deliveries.retry()
    with deliveries.sessions.begin() as session:
        for row in session.scalars(select(Delivery)):
            row.state = "pending"
    outbox.deliver_all_due()
    assert len(orthanc.get("/instances")) == len(result_files)


def test_outbox_thread_delivers_when_woken(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    with FakePACS(0x0000) as pacs:
        outbox = Outbox(deliveries, {"fake": pacs.peer}, "LUNGNODE", FAST, interval=30)
        outbox.start()
        try:
            queue_files(deliveries, result_files, ["fake"])
            outbox.wake()
            deadline = time.monotonic() + 10
            while {r.state for r in rows(deliveries)} != {"done"}:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            outbox.stop()
    assert len(pacs.received) == 4


def test_a_node_start_sends_at_once_what_a_crash_left_claimed(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    result_files: list[Path],
) -> None:
    """A node killed while it sent leaves its deliveries claimed on a lease (meant for
    the scaled roles' other senders); its next start sends them at once, not after
    the lease (the crash drill found a restart waiting it out)."""
    with FakePACS(0x0000) as pacs:
        settings = make_settings(
            peers=f"fake=FAKEPACS@127.0.0.1:{pacs.port}",
            delivery_timeout=60.0,
            delivery_check_interval=0.1,
        )
        upgrade(settings.effective_database_url)
        engine = make_engine(settings.effective_database_url)
        repo = DeliveryRepository(make_session_factory(engine), settings.storage_dir)
        queue_files(repo, result_files, ["fake"])
        assert len(repo.claim_due(settings.delivery_timeout)) == 4  # then the kill
        assert repo.due() == []  # nobody's to send for the next 5 minutes
        start_node(settings, serve_http=False)
        delivered = wait_until(
            lambda: {r.state for r in rows(repo)} == {"done"}, timeout=20, step=0.1
        )
        engine.dispose()
    assert delivered, [(r.state, r.next_attempt_at) for r in rows(repo)]
    assert sorted(pacs.received) == sorted(path.stem for path in result_files)


class PickyPACS(FakePACS):
    """A Storage SCP that answers only to its own AE title: any other called AE
    title is rejected-permanent (service user, called AE title not recognised)."""

    def __init__(self) -> None:
        super().__init__(0x0000)
        self.ae.require_called_aet = True


def test_a_permanently_rejected_association_is_dead_lettered_at_once(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    with PickyPACS() as pacs:
        queue_files(deliveries, result_files[:2], ["wrong"])
        wrong = Peer("wrong", "NOTTHEPACS", "127.0.0.1", pacs.port)
        Outbox(deliveries, {"wrong": wrong}, "LUNGNODE", FAST).deliver_all_due()
    assert pacs.received == []
    assert [(r.state, r.attempts) for r in rows(deliveries)] == [("dead", 1)] * 2
    for row in rows(deliveries):
        assert "Rejected Permanent" in (row.last_error or "")
        assert "Called AE title not recognised" in (row.last_error or "")


class BusyPACS(FakePACS):
    """A Storage SCP at its association limit: one association is held open, and
    every other is rejected-transient (service provider, local limit exceeded)."""

    def __enter__(self) -> BusyPACS:
        self.ae.maximum_associations = 1
        super().__enter__()
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(CTImageStorage)
        self.held = holder.associate("127.0.0.1", self.port, ae_title="FAKEPACS")
        assert self.held.is_established
        return self

    def __exit__(self, *args: object) -> None:
        self.held.release()
        super().__exit__(*args)


def test_a_transiently_rejected_association_is_retried(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    with BusyPACS(0x0000) as pacs:
        queue_files(deliveries, result_files[:1], ["fake"])
        Outbox(deliveries, {"fake": pacs.peer}, "LUNGNODE", FAST).deliver_all_due()
    assert pacs.received == []
    (row,) = rows(deliveries)
    assert (row.state, row.attempts) == ("pending", 1)
    assert "Rejected Transient" in (row.last_error or "")


def _as_parametric_map(path: Path) -> Path:
    """A copy of a result file that claims the Parametric Map SOP class."""
    dataset = dcmread(path)
    dataset.SOPClassUID = PARAMETRIC_MAP
    dataset.file_meta.MediaStorageSOPClassUID = PARAMETRIC_MAP
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    target = path.with_name(f"{dataset.SOPInstanceUID}.dcm")  # queue_files: stem = UID
    dataset.save_as(target, enforce_file_format=True)
    return target


def test_a_sop_class_the_pacs_does_not_store_is_dead_and_the_rest_go_on(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    """An older PACS without the Parametric Map: that object is a dead letter at once,
    with the reason, and the objects after it in the batch are still delivered."""
    files = [result_files[0], _as_parametric_map(result_files[1]), result_files[2]]
    with FakePACS(0x0000) as pacs:  # CT Image Storage only
        queue_files(deliveries, files, ["fake"])
        Outbox(deliveries, {"fake": pacs.peer}, "LUNGNODE", FAST).deliver_all_due()
    assert len(pacs.received) == 2
    states = {row.path: (row.state, row.attempts, row.last_error) for row in rows(deliveries)}
    assert [s[:2] for s in states.values()].count(("done", 1)) == 2
    (dead,) = [s for s in states.values() if s[0] == "dead"]
    assert dead[1] == 1 and "does not accept Parametric Map Storage" in (dead[2] or "")


def test_a_pacs_that_accepts_none_of_the_contexts_dead_letters_at_once(
    deliveries: DeliveryRepository, result_files: list[Path]
) -> None:
    with FakePACS(0x0000) as pacs:
        queue_files(deliveries, [_as_parametric_map(result_files[0])], ["fake"])
        Outbox(deliveries, {"fake": pacs.peer}, "LUNGNODE", FAST).deliver_all_due()
    assert pacs.received == []
    ((state, attempts, error),) = [(r.state, r.attempts, r.last_error) for r in rows(deliveries)]
    assert (state, attempts) == ("dead", 1)
    assert "does not accept Parametric Map Storage" in (error or "")
