"""Load drill (docs/reliability.md, "Load"): 20 PACS senders at once, the API read under load.

``lungnode serve`` runs as users run it: a subprocess with its default
``max_associations`` and ``ingest_processes``, the bundled model, and a small
storage SCP of the test's as the PACS that receives the results. Twenty real
associations (pynetdicom SCU threads) each send a different CT series, all at
once, while locust (a subprocess, headless, bounded in users and time, on
127.0.0.1 only) reads ``/api/v1/history`` and ``/api/v1/stats`` with a
viewer's token.

Asserted: all 20 associations are accepted together; no C-STORE fails; no
HTTP answer is a 5xx (nor any other failure); every series is analysed exactly
once (one job per series, done, and one prediction per series in the API's
history). Reported: p50 and p99 of the C-STORE round trip (timed per C-STORE
in the senders) and of the HTTP latency (locust's CSV), and the memory of the
receiving processes with no association, with the 20 established and idle,
and at the peak.

Short variant: 20 senders x 8 slices of 64x64, 5 HTTP users. Long
(``LUNGNODE_DRILLS=long``): 20 senders x 100 slices of 512x512, 20 HTTP users.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association

from lungnode.dicom import reactor
from tests.conftest import Databases, query
from tests.dicom.helpers import close_dropped, free_port, wait_until
from tests.drills.conftest import Drill
from tests.serve import ADMIN_PASSWORD, ServedNode
from tests.support.synthetic import make_ct_series

LOCUSTFILE = Path(__file__).with_name("locustfile_load.py")
SENDERS = 20
SENDER_AE = "LOADPACS"
VIEWER_PASSWORD = "viewer-password-for-the-load-drill"


# -- the node under test -------------------------------------------------------------


def wait_healthy(node: ServedNode, timeout: float) -> None:
    """The API answers and is healthy: the SCP listens (the model may still warm:
    a PACS does not wait for it either, and the series' jobs do)."""

    def ready() -> bool:
        assert node.alive(), node.log_text()[-4000:]
        return http_json("GET", f"{node.base_url}/health")[0] == 200

    assert wait_until(ready, timeout=timeout, step=0.5), node.log_text()[-4000:]


def ingest_worker_pids(node: ServedNode) -> list[int]:
    """The node's ingest worker processes (not multiprocessing's helpers)."""
    pids = set()
    for task in Path(f"/proc/{node.pid}/task").iterdir():
        try:  # a thread or a child may end while we look
            for child in (task / "children").read_text().split():
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    pids.add(int(child))
        except OSError:
            continue
    return sorted(pids)


def receiving_pids(node: ServedNode) -> list[int]:
    return [node.pid, *ingest_worker_pids(node)]


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes together."""
    total_kib = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def connections_held(pids: list[int], port: int) -> int:
    """Established TCP connections to local ``port`` that these processes hold."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                held += 1
    return held


def http_json(
    method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def viewer_token(node: ServedNode) -> str:
    """A viewer (reads history and statistics), created by the first admin over the API."""
    status, admin = http_json(
        "POST", f"{node.base_url}/auth/login", {"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert status == 200, admin
    status, user = http_json(
        "POST",
        f"{node.base_url}/users",
        {"username": "dashboard", "password": VIEWER_PASSWORD, "role": "viewer"},
        token=admin["access_token"],
    )
    assert status == 201, user
    login = {"username": "dashboard", "password": VIEWER_PASSWORD}
    status, viewer = http_json("POST", f"{node.base_url}/auth/login", login)
    assert status == 200, viewer
    return str(viewer["access_token"])


@pytest.fixture
def results_pacs() -> Iterator[list[int]]:
    """A storage SCP that takes the node's results (its AE title is the senders')."""
    received: list[int] = []

    def on_store(event: evt.Event) -> int:
        received.append(1)
        return 0x0000

    ae = AE(ae_title=SENDER_AE)
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    received.append(port)  # the first item is the port; the rest count results
    yield received
    server.shutdown()


# -- the senders ---------------------------------------------------------------------


@dataclass
class Sender:
    """One association sending one series; what each of its C-STOREs answered, and when."""

    datasets: list[Dataset]
    established: bool = False
    statuses: list[int] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)
    started: float = math.inf
    finished: float = 0.0
    error: str | None = None


def series_for(template: list[Dataset], k: int) -> list[Dataset]:
    """The template's slices as a series of patient k: new study, series and instance UIDs."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    copies = []
    for ds in template:
        copy = deepcopy(ds)
        copy.StudyInstanceUID, copy.SeriesInstanceUID = study, series
        copy.FrameOfReferenceUID = frame
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy.PatientID, copy.PatientName = f"LOAD{k:03d}", f"Load^Patient{k:03d}"
        copies.append(copy)
    return copies


def send(port: int, sender: Sender, associated: threading.Barrier, go: threading.Event) -> None:
    """Associate, wait until all are associated and the drill says go, then send."""
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc: Association | None = None
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
        sender.established = bool(assoc.is_established)
        associated.wait(timeout=120)
        if not sender.established or not go.wait(timeout=120):
            return
        sender.started = time.perf_counter()
        for ds in sender.datasets:
            started = time.perf_counter()
            response = assoc.send_c_store(ds)
            sender.round_trips.append(time.perf_counter() - started)
            sender.statuses.append(int(response.Status) if "Status" in response else -1)
        sender.finished = time.perf_counter()
        assoc.release()
    except Exception as exc:  # reported by the drill, which fails on it
        sender.error = f"{type(exc).__name__}: {exc}"
        associated.abort()
    finally:
        if assoc is not None and not (assoc.is_released or assoc.is_rejected):
            close_dropped(assoc)


# -- the HTTP load -------------------------------------------------------------------


def start_locust(
    node: ServedNode, token: str, users: int, seconds: int, prefix: Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "5",
        "--host", f"http://127.0.0.1:{node.http_port}", "--csv", str(prefix),
        "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    with prefix.with_name("locust.log").open("wb") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LUNGNODE_DRILL_TOKEN": token},
            cwd=prefix.parent,
        )


def locust_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- the drill -----------------------------------------------------------------------


@pytest.mark.drill
@pytest.mark.slow
def test_twenty_senders_at_once_under_api_load(
    drill: Drill, tmp_path: Path, databases: Databases, results_pacs: list[int]
) -> None:
    slices, size = drill.size(8, 100), drill.size(64, 512)
    users = drill.size(5, 20)
    # Different pixels for every series in the short variant; the long one copies
    # two phantoms (a 512x512 slice takes a quarter of a second to make).
    templates = [
        make_ct_series(slices, rows=size, columns=size, seed=t)
        for t in range(drill.size(SENDERS, 2))
    ]
    senders = [Sender(series_for(templates[k % len(templates)], k)) for k in range(SENDERS)]
    del templates
    # The senders' pynetdicom threads wait on events rather than poll every
    # millisecond, as the node's do: they share the machine with it.
    reactor.install()

    node = ServedNode(
        tmp_path,
        storage=tmp_path / "storage",
        databases=databases,
        peers=f"pacs={SENDER_AE}@127.0.0.1:{results_pacs[0]}",
        # Every series declares its size: complete at its last instance.
        series_quiet_seconds="30",
        series_check_interval="0.2",
        # The load comes from one address (127.0.0.1): the per-address rate
        # limit (300/minute) would answer most of it 429, which is not load.
        rate_limit_default="1000000/minute",
        access_token_minutes="120",
    )
    locust: subprocess.Popen[bytes] | None = None
    try:
        node.start()
        wait_healthy(node, timeout=drill.seconds(120, 300))
        token = viewer_token(node)
        # Memory per association, measured in the ingest workers: processes that
        # only receive (the node process also loads the model meanwhile).
        workers = ingest_worker_pids(node)
        rss_before = rss_mib(workers)

        # All 20 associate first: the node must hold them at once.
        associated, go = threading.Barrier(SENDERS + 1), threading.Event()
        threads = [
            threading.Thread(
                target=send, args=(node.dicom_port, s, associated, go), name=f"sender-{k}"
            )
            for k, s in enumerate(senders)
        ]
        for thread in threads:
            thread.start()
        associated.wait(timeout=120)
        assert [s.error for s in senders if s.error] == []
        assert sum(s.established for s in senders) == SENDERS, "associations were rejected"
        time.sleep(1.0)
        rss_idle = rss_mib(workers)
        in_workers = connections_held(workers, node.dicom_port)

        prefix = tmp_path / "locust" / "load"
        prefix.parent.mkdir()
        locust = start_locust(node, token, users, int(drill.seconds(240, 1800)), prefix)
        history_csv = prefix.with_name("load_stats_history.csv")
        assert wait_until(
            lambda: history_csv.exists() and len(history_csv.read_text().splitlines()) > 2,
            timeout=60,
            step=0.5,
        ), prefix.with_name("locust.log").read_text()

        peak_workers, peak_all = [rss_idle], [rss_mib(receiving_pids(node))]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                peak_workers.append(rss_mib(workers))
                peak_all.append(rss_mib(receiving_pids(node)))

        sampler = threading.Thread(target=sample, name="rss", daemon=True)
        sampler.start()
        go.set()
        for thread in threads:
            thread.join(timeout=drill.seconds(180, 1800))
        assert not any(thread.is_alive() for thread in threads), "a sender hung"
        stored_at = max(s.finished for s in senders)

        def finished_jobs() -> int:
            finished = "SELECT count(*) FROM job WHERE state IN ('done', 'failed')"
            rows = query(node.database, finished)
            return int(rows[0][0]) if rows else 0

        assert wait_until(
            lambda: finished_jobs() >= SENDERS, timeout=drill.seconds(180, 1800), step=0.5
        ), query(node.database, "SELECT state, count(*) FROM job GROUP BY state")
        analysed_at = time.perf_counter()
        sampling.set()
        sampler.join(5)
        locust.send_signal(signal.SIGTERM)
        assert locust.wait(60) in (0, 1), prefix.with_name("locust.log").read_text()
        # 0: no failure; 1: failures, which the CSV names and the asserts below judge.

        status, history = http_json(
            "GET", f"{node.base_url}/history?source=dicom&per_page=100", token=token
        )
        assert status == 200, history
    finally:
        go_on = locust is not None and locust.poll() is None
        if go_on and locust is not None:
            locust.kill()
            locust.wait(10)
        node.stop()

    # -- DICOM: every C-STORE succeeded, every series analysed exactly once.
    assert [s.error for s in senders if s.error] == []
    statuses = [status for s in senders for status in s.statuses]
    assert len(statuses) == SENDERS * slices
    failed_stores = [status for status in statuses if status != 0x0000]
    assert failed_stores == []
    sent = {str(s.datasets[0].SeriesInstanceUID) for s in senders}
    jobs = query(
        node.database,
        "SELECT series.series_instance_uid, job.state, job.instance_count "
        "FROM job JOIN series ON series.id = job.series_id",
    )
    assert sorted(uid for uid, _state, _count in jobs) == sorted(sent), "one job per series"
    assert {(state, count) for _uid, state, count in jobs} == {("done", slices)}
    predicted = [item["series_instance_uid"] for item in history["items"]]
    assert history["total"] == SENDERS and sorted(predicted) == sorted(sent)
    deliveries = dict(query(node.database, "SELECT state, count(*) FROM delivery GROUP BY state"))

    # -- HTTP: no server error, no failure at all.
    stats = locust_rows(prefix.with_name("load_stats.csv"))
    failures = locust_rows(prefix.with_name("load_failures.csv"))
    server_errors = sum(int(f["Occurrences"]) for f in failures if "server error" in f["Error"])
    assert server_errors == 0, failures
    assert failures == [], failures
    total = next(row for row in stats if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0

    # -- the figures
    round_trips = [t for s in senders for t in s.round_trips]
    started = min(s.started for s in senders)
    rows = [
        ("associations at once (senders)", f"{SENDERS}, all accepted"),
        ("series", f"{SENDERS} x {slices} slices of {size}x{size}, different UIDs"),
        ("C-STOREs", f"{len(statuses)}, failed {len(failed_stores)}"),
        (
            "C-STORE round trip p50 / p99",
            f"{percentile(round_trips, 50) * 1000:.0f} ms / "
            f"{percentile(round_trips, 99) * 1000:.0f} ms",
        ),
        (
            "all sent (first C-STORE to last answer)",
            f"{stored_at - started:.1f} s, {len(statuses) / (stored_at - started):.0f} instances/s",
        ),
        ("all analysed (first C-STORE to last job done)", f"{analysed_at - started:.1f} s"),
        ("jobs", f"{len(jobs)} for {len(sent)} series, all done; {history['total']} predictions"),
        ("result deliveries", ", ".join(f"{k} {v}" for k, v in sorted(deliveries.items()))),
        ("HTTP users (locust)", f"{users}"),
        (
            "HTTP requests",
            f"{total['Request Count']} ({float(total['Requests/s']):.0f}/s), "
            f"5xx {server_errors}, failures {sum(int(f['Occurrences']) for f in failures)}",
        ),
    ]
    for row in stats:
        rows.append(
            (
                f"HTTP latency p50 / p99, {row['Name'].replace('|', '/')}",
                f"{row['50%']} ms / {row['99%']} ms ({row['Request Count']} requests)",
            )
        )
    per_idle = (rss_idle - rss_before) / max(in_workers, 1) * 1024
    rows += [
        (
            f"ingest worker RSS: no association / {in_workers} idle / peak",
            f"{rss_before:.0f} / {rss_idle:.0f} / {max(peak_workers):.0f} MiB "
            f"({per_idle:.0f} KiB per idle association)",
        ),
        ("node and workers RSS at the peak (model loaded)", f"{max(peak_all):.0f} MiB"),
    ]
    table = "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    drill.report("load", table)
