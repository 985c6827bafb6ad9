"""Several processes on one database: each job, completion and delivery is taken once.

Every "process" here is an engine of its own (its own connections and, on SQLite,
its own write lock), as the scaled roles have; the database alone keeps them
apart. On PostgreSQL (``LUNGNODE_TEST_DATABASE=postgresql``) that is row locks
and ``FOR UPDATE SKIP LOCKED``; on SQLite, BEGIN IMMEDIATE.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select

from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.jobs import JobRepository
from lungnode.db.migrate import upgrade
from lungnode.db.models import Delivery, Instance, Job, Series
from lungnode.db.repo import NodeRepository
from lungnode.db.session import make_engine, make_session_factory
from lungnode.dicom.scu import Destination, Outcome, SendResult
from lungnode.peers import Peer
from lungnode.pipeline.outbox import Outbox
from tests.conftest import Databases

PROCESSES = 4


@pytest.fixture
def engines(databases: Databases) -> Iterator[Callable[[], Engine]]:
    """Engines on one migrated database, one per simulated process."""
    url = databases.fresh()
    upgrade(url)
    made: list[Engine] = []

    def _engine() -> Engine:
        made.append(make_engine(url))
        return made[-1]

    yield _engine
    for engine in made:
        engine.dispose()


def _series_with_jobs(engine: Engine, jobs: int) -> list[int]:
    with make_session_factory(engine).begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid=f"1.2.{time.time_ns()}")
        session.add(series)
        session.flush()
        rows = [Job(series_id=series.id, version=v) for v in range(1, jobs + 1)]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def test_concurrent_workers_claim_each_due_job_once(engines: Callable[[], Engine]) -> None:
    job_ids = _series_with_jobs(engines(), 40)
    repos = [JobRepository(make_session_factory(engines())) for _ in range(PROCESSES)]
    start = threading.Barrier(PROCESSES)

    def work(repo: JobRepository) -> list[tuple[int, int]]:
        """Every worker tries every job, as redelivered broker messages would make it."""
        start.wait()
        claimed = []
        for job_id in job_ids:
            if (attempt := repo.claim_job(job_id)) is not None:
                claimed.append((job_id, attempt))
        return claimed

    with ThreadPoolExecutor(PROCESSES) as pool:
        results = list(pool.map(work, repos))
    claimed = [job_id for result in results for job_id, _ in result]
    assert sorted(claimed) == job_ids, "a job was claimed twice, or not at all"
    assert {attempt for result in results for _, attempt in result} == {1}
    # Claimed means running: nothing is left for a late worker.
    assert repos[0].due_job_ids() == []
    assert repos[0].claim_job(job_ids[0]) is None


def test_claiming_one_job_by_id_from_two_workers_runs_it_once(
    engines: Callable[[], Engine],
) -> None:
    """The broker may hand one id to two workers (redelivery): one of them claims it."""
    (job_id,) = _series_with_jobs(engines(), 1)
    repos = [JobRepository(make_session_factory(engines())) for _ in range(PROCESSES)]
    start = threading.Barrier(PROCESSES)

    def claim(repo: JobRepository) -> int | None:
        start.wait()
        return repo.claim_job(job_id)

    with ThreadPoolExecutor(PROCESSES) as pool:
        attempts = list(pool.map(claim, repos))
    assert sorted(attempts, key=lambda a: a is None) == [1] + [None] * (PROCESSES - 1)


def _pause_after_reading_the_series(engine: Engine, meet: threading.Barrier) -> None:
    """Hold the completing transaction just after it read the series row, until the
    other completer has read it too, or for at most ``meet``'s timeout."""

    @event.listens_for(engine, "after_cursor_execute")
    def _meet(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM series" in statement:
            if "WHERE series.id =" in statement:
                try:
                    meet.wait()
                except threading.BrokenBarrierError:
                    pass  # the other completer waits on our lock: go on alone


def test_two_receiving_nodes_complete_a_series_once(
    engines: Callable[[], Engine], tmp_path: Path
) -> None:
    """Both SCPs find the series complete at the same moment: one job is queued.

    Each completer pauses after reading the series until the other has read it
    too. Without a lock on the row both would read it receiving and queue
    version 1 twice; with it the second waits, then finds it complete.
    """
    setup = engines()
    with make_session_factory(setup).begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3")
        session.add(series)
        session.flush()
        session.add_all(
            Instance(
                series_id=series.id,
                sop_instance_uid=f"1.2.3.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"{n}.dcm",
                size_bytes=1,
            )
            for n in range(3)
        )
        series_id = series.id
    meet = threading.Barrier(2, timeout=2.0)
    repos = []
    for _ in range(2):
        engine = engines()
        _pause_after_reading_the_series(engine, meet)
        repos.append(NodeRepository(make_session_factory(engine), tmp_path))

    def complete(repo: NodeRepository) -> int | None:
        return repo.complete_series(series_id, "quiet", "no new instance for 15 s")

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(complete, repos))
    assert len([o for o in outcomes if o is not None]) == 1, outcomes
    with make_session_factory(setup)() as session:
        jobs = session.execute(select(Job.version, Job.instance_count)).all()
    assert [tuple(job) for job in jobs] == [(1, 3)]


def _queue_deliveries(engine: Engine, storage: Path, count: int) -> list[str]:
    storage.mkdir(parents=True, exist_ok=True)
    (job_id,) = _series_with_jobs(engine, 1)
    uids = [f"1.2.9.{n}" for n in range(count)]
    with make_session_factory(engine).begin() as session:
        for uid in uids:
            (storage / f"{uid}.dcm").write_bytes(b"result")
            session.add(
                Delivery(
                    job_id=job_id,
                    destination="pacs",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    sop_instance_uid=uid,
                    path=f"{uid}.dcm",
                )
            )
    return uids


def test_two_outboxes_never_send_one_delivery_at_once(
    engines: Callable[[], Engine], tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    uids = _queue_deliveries(engines(), storage, 12)
    sent: Counter[str] = Counter()
    sent_lock = threading.Lock()

    def slow_pacs(paths: Sequence[Path], destination: Destination, **_: Any) -> list[SendResult]:
        time.sleep(0.3)  # long enough for the other outbox to look meanwhile
        with sent_lock:
            sent.update(path.stem for path in paths)
        return [SendResult(path, 0x0000, Outcome.DELIVERED) for path in paths]

    peers = {"pacs": Peer("pacs", "PACS", "127.0.0.1", 104)}
    outboxes = [
        Outbox(
            DeliveryRepository(make_session_factory(engines()), storage),
            peers,
            "LUNGNODE",
            sender=slow_pacs,
        )
        for _ in range(2)
    ]
    start = threading.Barrier(2)

    def run(outbox: Outbox) -> None:
        start.wait()
        outbox.deliver_all_due()

    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(run, outboxes))
    finally:
        for outbox in outboxes:
            outbox.stop()
    assert sorted(sent) == sorted(uids) and set(sent.values()) == {1}, sent
    with make_session_factory(engines())() as session:
        states = session.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state)
        ).all()
    assert [tuple(state) for state in states] == [("done", 12)]


def test_claimed_deliveries_are_leased_and_released(
    engines: Callable[[], Engine], tmp_path: Path
) -> None:
    """A claim hides the deliveries from other senders until its lease ends or they are
    given back; a sender that died leaves them due once the lease is over."""
    storage = tmp_path / "storage"
    uids = _queue_deliveries(engines(), storage, 3)
    first = DeliveryRepository(make_session_factory(engines()), storage)
    second = DeliveryRepository(make_session_factory(engines()), storage)
    claimed = first.claim_due(10.0)
    assert sorted(d.sop_instance_uid for d in claimed) == uids
    assert second.claim_due(10.0) == []
    # The lease covers the whole batch: 10 s per object, and one more.
    assert second.claim_due(10.0, now=datetime.now(UTC) + timedelta(seconds=35)) == []
    assert len(second.claim_due(10.0, now=datetime.now(UTC) + timedelta(seconds=41))) == 3
    # Given back unsent: due again at once.
    second.release([claimed[0].id])
    assert [d.id for d in first.claim_due(10.0)] == [claimed[0].id]
    assert second.claim_due(10.0, skip_destinations={"pacs"}) == []
