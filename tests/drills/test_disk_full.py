"""Disk full drill (docs/reliability.md, "Disk full").

The node's storage is a small tmpfs of its own. A filler file fills it while a PACS
sends, and the drill holds it full, then deletes the filler:

- intake: every C-STORE answers 0x0000 (the instance complete on disk and in the
  database) or 0xA700 (out of resources: not in the database, no ``.part`` left);
  the instances stored before keep their checksums; ``/health`` answers 503 while
  the disk is full and 200 after; once there is room the same association stores
  again, and the refused instances sent again are all stored, without a restart.
  Twice: with a reserve (``min_free_disk_mb``), refused by the free-space check,
  and with none, refused by the write's own ENOSPC (and, on SQLite, by the
  database on the same disk that cannot grow).
- results: a job whose outputs cannot be written waits ("storage full" in
  ``GET /jobs``, the attempts not counted, nothing written, recorded or sent)
  however often it tries, and is done by itself once there is room.

Short variant in every test run; ``LUNGNODE_DRILLS=long`` fills a larger disk with
larger slices and holds it full for a minute.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Delivery, Instance, Job, Prediction
from tests.conftest import Databases
from tests.dicom.helpers import associate, wait_until
from tests.drills.conftest import Drill
from tests.support.small_disk import fill, small_disk
from tests.support.synthetic import make_ct_series

pytestmark = [pytest.mark.drill, pytest.mark.slow]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
ADMIN_PASSWORD = "disk-full-drill-admin"
MIB = 2**20


# -- figures ------------------------------------------------------------------------


INTAKE = (
    "case",
    "disk, slices",
    "accepted / refused while filling",
    "first refusal / first 503, after the burst began",
    "held full: refused again, /health",
    "stores again after space returned (same association)",
    "/health 200 again after space returned",
)
RESULTS = (
    "case",
    "disk, series",
    "first wait after filling (model warm-up included)",
    "held full",
    "waits while full, attempts counted at the end (max)",
    "/health while full",
    "job done after space returned",
)


@dataclass
class Figures:
    intake: list[tuple[str, ...]] = field(default_factory=list)
    results: list[tuple[str, ...]] = field(default_factory=list)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


@pytest.fixture(scope="module")
def figures(drill: Drill) -> Iterator[Figures]:
    collected = Figures()
    yield collected
    parts = [
        table(header, rows)
        for header, rows in ((INTAKE, collected.intake), (RESULTS, collected.results))
        if rows
    ]
    if parts:
        drill.report("disk_full", "\n\n".join(parts))


# -- helpers ------------------------------------------------------------------------


class HealthWatch:
    """Polls ``/api/v1/health`` on a thread; keeps (monotonic time, status) of each answer."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/api/v1/health"
        self.samples: list[tuple[float, int]] = []
        self.last_body: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.is_set():
            code, body = health(self.url)
            self.samples.append((time.monotonic(), code))
            self.last_body = body
            self._stop.wait(0.05)

    def first(self, code: int, after: float) -> float | None:
        return next((t for t, c in list(self.samples) if c == code and t >= after), None)

    def codes(self, start: float, end: float) -> set[int]:
        return {c for t, c in list(self.samples) if start <= t <= end}


def health(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)
    except URLError:
        return -1, {}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_files(node: Node) -> dict[str, Path]:
    """SOP Instance UID -> stored file, by the node's database."""
    with node.sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    return {uid: node.settings.resolve_stored(path) for uid, path in rows}


def leftovers(root: Path) -> list[Path]:
    """Temporary files (``.*.part``) anywhere under ``root``: a write left half done."""
    return sorted(root.rglob("*.part"))


def assert_complete(path: Path, sent: Dataset) -> None:
    """The stored file is the instance that was sent, whole."""
    stored = dcmread(path)
    assert str(stored.SOPInstanceUID) == str(sent.SOPInstanceUID)
    assert stored.PixelData == sent.PixelData, f"{path.name}: pixel data differs"


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


@dataclass(frozen=True)
class Plan:
    disk_mb: int
    rows: int
    baseline: int
    burst: int
    headroom_mb: float
    hold_seconds: float


def plan(drill: Drill) -> Plan:
    if drill.long:
        return Plan(disk_mb=192, rows=512, baseline=120, burst=160, headroom_mb=24, hold_seconds=60)
    return Plan(disk_mb=24, rows=256, baseline=12, burst=40, headroom_mb=2, hold_seconds=2)


# -- intake -------------------------------------------------------------------------


@pytest.mark.parametrize("reserve_mb", [0, 3], ids=["no-reserve-enospc", "reserve"])
def test_intake_refuses_while_the_disk_is_full_and_resumes_by_itself(
    reserve_mb: int,
    drill: Drill,
    figures: Figures,
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    size = plan(drill)
    with small_disk(tmp_path / "disk", size.disk_mb) as disk:
        storage = disk / "storage"
        node = start_node(
            make_settings(storage_dir=storage, min_free_disk_mb=reserve_mb, workers=0)
        )
        baseline = make_ct_series(size.baseline, rows=size.rows, columns=size.rows, seed=1)
        burst = make_ct_series(size.burst, rows=size.rows, columns=size.rows, seed=2)
        contexts = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in burst})

        # Stored before the disk fills: they must come out of it untouched.
        sender = associate(node.scp.port, contexts)
        assert sender.is_established
        try:
            assert _send(sender, baseline) == [SUCCESS] * len(baseline)
            before = {uid: sha256(path) for uid, path in stored_files(node).items()}
            assert len(before) == len(baseline)

            filler = disk / "filler"
            fill(filler, leave_bytes=int((reserve_mb + size.headroom_mb) * MIB))
            with HealthWatch(node.http_port) as watch:
                started = time.monotonic()
                statuses, answered = _send_timed(sender, burst)
                filled = time.monotonic()
                accepted = [d for d, s in zip(burst, statuses, strict=True) if s == SUCCESS]
                refused = [d for d, s in zip(burst, statuses, strict=True) if s != SUCCESS]
                # Refused, never dropped: the sender is told to try again later.
                assert set(statuses) <= {SUCCESS, OUT_OF_RESOURCES}, statuses
                assert accepted and refused, statuses
                assert statuses[-1] == OUT_OF_RESOURCES, statuses
                first_refusal = answered[statuses.index(OUT_OF_RESOURCES)]
                # Why, in the log: the reserve's check, or the full disk itself (the
                # instance's write, or the database on the same disk).
                why = {
                    r.getMessage().split("0xA700: ", 1)[1].split(":")[0]
                    for r in caplog.records
                    if "refused with 0xA700" in r.getMessage()
                }
                assert why == {"storage is nearly full" if reserve_mb else "storage is full"}
                assert wait_until(lambda: watch.first(503, started) is not None, timeout=10)
                turned_503 = watch.first(503, started)
                assert turned_503 is not None and turned_503 <= filled + 2.0
                disk_check = watch.last_body["checks"]["disk"]
                assert watch.last_body["failing"] == ["disk"], watch.last_body
                assert disk_check["error"].startswith("storage full:"), disk_check

                # Held full: every instance sent again is refused, health stays 503.
                held_from = time.monotonic()
                held_refusals = 0
                while time.monotonic() - held_from < size.hold_seconds:
                    retry = refused[held_refusals % len(refused)]
                    assert _send(sender, [retry]) == [OUT_OF_RESOURCES]
                    held_refusals += 1
                    time.sleep(0.25)
                held_until = time.monotonic()
                assert watch.codes(held_from, held_until) == {503}

                # Acknowledged means complete, on disk and in the database; refused
                # means absent from the database; nothing half-written anywhere.
                files = stored_files(node)
                assert set(files) == {str(d.SOPInstanceUID) for d in baseline + accepted}
                for dataset in accepted:
                    assert_complete(files[str(dataset.SOPInstanceUID)], dataset)
                assert leftovers(disk) == []
                assert {uid: sha256(files[uid]) for uid in before} == before

                # Space returns: the same association stores again, without a restart.
                filler.unlink()
                freed = time.monotonic()
                assert _send(sender, refused[:1]) == [SUCCESS]
                resumed = time.monotonic() - freed
                assert wait_until(lambda: watch.first(200, freed) is not None, timeout=10)
                healthy = watch.first(200, freed)
        finally:
            sender.release()
        # And a new one takes every refused instance sent again.
        again = associate(node.scp.port, contexts)
        assert again.is_established
        try:
            assert _send(again, refused[1:]) == [SUCCESS] * (len(refused) - 1)
        finally:
            again.release()

        files = stored_files(node)
        assert set(files) == {str(d.SOPInstanceUID) for d in baseline + burst}
        for dataset in burst:
            assert_complete(files[str(dataset.SOPInstanceUID)], dataset)
        assert {uid: sha256(files[uid]) for uid in before} == before
        assert leftovers(disk) == []
        node.stop()

    assert healthy is not None
    figures.intake.append(
        (
            f"reserve {reserve_mb} MiB" if reserve_mb else "no reserve (ENOSPC)",
            f"{size.disk_mb} MiB tmpfs, {len(baseline)} + {len(burst)} slices "
            f"of {size.rows}x{size.rows}",
            f"{len(accepted)} / {len(refused)}",
            f"{first_refusal - started:.2f} s / {turned_503 - started:.2f} s",
            f"{held_until - held_from:.0f} s: {held_refusals} x 0xA700, 503 throughout",
            seconds(resumed),
            seconds(healthy - freed),
        )
    )


def _send(assoc: Any, datasets: Sequence[Dataset]) -> list[int]:
    return _send_timed(assoc, datasets)[0]


def _send_timed(assoc: Any, datasets: Sequence[Dataset]) -> tuple[list[int], list[float]]:
    """C-STORE each data set on an open association: its status, and when it came."""
    statuses: list[int] = []
    moments: list[float] = []
    for dataset in datasets:
        response = assoc.send_c_store(dataset)
        statuses.append(int(response.Status) if "Status" in response else -1)
        moments.append(time.monotonic())
    return statuses, moments


# -- results ------------------------------------------------------------------------


class API:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self._token: str | None = None

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data)
        request.add_header("Content-Type", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.load(response)

    def job(self) -> dict[str, Any]:
        if self._token is None:
            login = {"username": "admin", "password": ADMIN_PASSWORD}
            self._token = str(self._request("/auth/login", login)["access_token"])
        items = self._request("/jobs")["items"]
        assert len(items) == 1, items
        return dict(items[0])


@pytest.mark.sqlite_only(
    "its database is off the full disk on either backend; tests/unit/test_jobs.py "
    "records the wait on PostgreSQL"
)
def test_a_job_that_cannot_write_its_results_waits_and_resumes(
    drill: Drill,
    figures: Figures,
    databases: Databases,
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The results' storage is full (the database lives elsewhere: PostgreSQL, or a
    SQLite file on another disk), so the job reaches its writers and meets ENOSPC."""
    hold = drill.seconds(4.0, 60.0)
    slices = drill.size(8, 40)
    database_home = tmp_path / "database"
    database_home.mkdir()
    disk_mb = drill.size(16, 64)
    with small_disk(tmp_path / "disk", disk_mb) as disk:
        storage = disk / "storage"
        settings = make_settings(
            storage_dir=storage,
            database_url=databases.url(database_home),
            model="lung-ct-demo",
            min_series_slices=5,
            series_grace_seconds=1.0,
            job_max_attempts=2,
            job_retry_base_seconds=0.3,
            job_storage_wait_seconds=0.5,
            job_check_interval=0.1,
            delivery_retry_base_seconds=600.0,
            admin_password=ADMIN_PASSWORD,
        )
        node = start_node(settings, analyse=True)
        api = API(node.http_port)
        series = make_ct_series(slices, rows=128, columns=128, seed=3)
        sender = associate(
            node.scp.port,
            [(str(series[0].SOPClassUID), str(series[0].file_meta.TransferSyntaxUID))],
        )
        assert sender.is_established
        try:
            assert _send(sender, series) == [SUCCESS] * slices
        finally:
            sender.release()
        # Full before the series is even complete (the grace is a second; the model
        # takes longer to warm): the job's first attempt meets a full disk.
        filler = disk / "filler"
        fill(filler)
        filled = time.monotonic()

        def waits() -> int:
            return sum("waits for storage space" in r.getMessage() for r in caplog.records)

        assert wait_until(lambda: waits() >= 1, timeout=180), node.jobs.repo.jobs()
        # The first attempt ran the analysis and met ENOSPC writing its outputs.
        first = next(r for r in caplog.records if "waits for storage space" in r.getMessage())
        assert "cannot write the results" in first.getMessage(), first.getMessage()
        first_wait = time.monotonic()
        job = api.job()
        assert job["state"] in ("queued", "running"), job
        assert job["last_error"].startswith("storage full"), job
        # Held full: it tries again and again, never counted, never failed.
        time.sleep(hold)
        assert wait_until(lambda: waits() > settings.job_max_attempts + 1, timeout=30)
        tries = waits()
        job = api.job()
        assert job["state"] in ("queued", "running") and job["attempts"] <= 1, job
        assert job["last_error"].startswith("storage full"), job
        full_code, body = health(f"{api.base}/health")
        assert full_code == 503 and body["failing"] == ["disk"], body
        # Nothing of it written, recorded or sent.
        with node.sessions() as session:
            assert list(session.scalars(select(Prediction))) == []
            assert list(session.scalars(select(Delivery))) == []
        outputs = [
            p
            for d in ("results", "reports", "heatmaps")
            for p in (storage / d).rglob("*")
            if p.is_file()
        ]
        assert outputs == [] and leftovers(disk) == []

        filler.unlink()
        freed = time.monotonic()
        assert wait_until(lambda: api.job()["state"] == "done", timeout=120), api.job()
        resumed = time.monotonic() - freed
        job = api.job()
        attempts = job["attempts"]
        assert attempts == 1, job
        assert job["details"]["analysed"] is True, job
        with node.sessions() as session:
            predictions = list(session.scalars(select(Prediction)))
            deliveries = list(session.scalars(select(Delivery)))
            state = session.scalar(select(Job.state))
        assert state == "done" and len(predictions) == 1
        kinds = sorted(str(dcmread(settings.resolve_stored(d.path)).Modality) for d in deliveries)
        assert kinds.count("DOC") == 1 and kinds.count("SR") == 1 and len(kinds) > 2, kinds
        assert leftovers(disk) == []
        code, _ = health(f"{api.base}/health")
        assert code == 200
        node.stop()

    figures.results.append(
        (
            "job outputs (SC, PDF, SR)",
            f"{disk_mb} MiB tmpfs, {slices} slices of 128x128",
            f"{first_wait - filled:.1f} s",
            f"{hold:.0f} s",
            f"{tries}, {attempts} ({settings.job_max_attempts})",
            f"{full_code} ({body['checks']['disk']['error'].split(';')[0]})",
            seconds(resumed),
        )
    )
