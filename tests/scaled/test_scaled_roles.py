"""The scaled topology as real processes: one ``scp``, one ``api``, two ``worker``s
and ``beat`` on a Redis broker and the test's database (SQLite, or PostgreSQL in
the second pass), the bundled demo model, results delivered to a real PACS.

- 4 series sent at once are each analysed exactly once, every result reaches
  Orthanc, and the api shows the jobs and predictions;
- a worker killed with SIGKILL in the middle of a job (its pool process, or the
  whole worker) loses nothing: the job runs again and finishes once, and the
  PACS receives each result object once;
- with the broker down for 30 s during intake, the scp keeps acknowledging
  (instances are durable in the database) and the jobs run once the broker is back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.conftest import SENDER_AE, require_tool
from tests.dicom.helpers import associate, free_port, wait_until
from tests.pacs import ORTHANC_AE, Orthanc
from tests.scaled.conftest import ADMIN_PASSWORD, APIClient, Cluster, Role, WaitFor
from tests.support.synthetic import make_ct_series

pytestmark = [pytest.mark.scaled, pytest.mark.slow]

WARM = "ready (warmed in"
#: Series of the end-to-end test: small (64x64, 8 slices), enough to prove "once".
N_SERIES = 4
#: How long the broker is down in the outage test (the issue's figure).
BROKER_OUTAGE_SECONDS = 30.0


def _send(port: int, datasets: list[Dataset], calling_ae: str = SENDER_AE) -> list[int]:
    contexts = [(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)]
    assoc = associate(port, contexts, calling_ae=calling_ae)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _send_at_once(port: int, series: list[list[Dataset]], calling_ae: str) -> None:
    statuses: dict[int, list[int]] = {}
    threads = [
        threading.Thread(
            target=lambda k=k, s=s: statuses.__setitem__(k, _send(port, s, calling_ae))
        )
        for k, s in enumerate(series)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(statuses[k] == [0] * len(s) for k, s in enumerate(series))


def _job_runs(workers: list[Role]) -> Counter[str]:
    """How many attempts each job had, by the workers' logs ("job N running")."""
    runs: Counter[str] = Counter()
    for worker in workers:
        for line in worker.log_text().splitlines():
            if "running (attempt" in line:
                runs[line.split(" job ", 1)[1].split()[0]] += 1
    return runs


def _start_workers(cluster: Cluster, count: int) -> list[Role]:
    workers = [cluster.start("worker") for _ in range(count)]
    for worker in workers:
        cluster.wait_for_log(worker, WARM, timeout=240)
    return workers


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(require_tool("Orthanc"), tmp_path / "orthanc", {})
    server.start()
    yield server
    server.stop()


def test_series_sent_at_once_are_each_analysed_once_and_reach_orthanc(
    cluster: Cluster, wait_for: WaitFor, orthanc: Orthanc
) -> None:
    """The issue's scaled end to end: one scp, one api, two workers and beat; 4 series
    sent at once are each analysed once, every result reaches Orthanc, and the api
    (another process, on the same database) shows the 4 jobs and predictions."""
    cluster.settings["LUNGNODE_PEERS"] = f"orthanc={ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}"
    temporary = cluster.tmp_path / "tmp"
    temporary.mkdir()
    cluster.settings["TMPDIR"] = str(temporary)
    scp = cluster.start("scp")
    assert scp.dicom_port is not None
    # Its /health asks the scp's port (as compose points LUNGNODE_DICOM_HOST at the scp).
    api = cluster.start("api", LUNGNODE_DICOM_PORT=str(scp.dicom_port))
    assert api.http_port is not None
    cluster.start("beat")
    workers = _start_workers(cluster, 2)
    series = [make_ct_series(8, rows=64, columns=64, seed=k) for k in range(N_SERIES)]
    # Orthanc routes the studies: the results go back to the peer that sent them.
    _send_at_once(scp.dicom_port, series, calling_ae=ORTHANC_AE)

    def finished() -> bool:
        jobs = cluster.query("SELECT state FROM job")
        pending = cluster.query("SELECT COUNT(*) FROM delivery WHERE state != 'done'")
        return len(jobs) == N_SERIES and {s for (s,) in jobs} == {"done"} and pending == [(0,)]

    wait_for(finished, 300, f"{N_SERIES} jobs done and their results delivered")
    assert cluster.query("SELECT attempts FROM job") == [(1,)] * N_SERIES
    assert sorted(_job_runs(workers).values()) == [1] * N_SERIES, cluster.logs()
    assert cluster.query("SELECT COUNT(DISTINCT job_id) FROM prediction") == [(N_SERIES,)]
    delivered = {str(uid) for (uid,) in cluster.query("SELECT sop_instance_uid FROM delivery")}
    assert cluster.query("SELECT MAX(attempts) FROM delivery") == [(1,)]
    sent = {str(ds.SOPInstanceUID) for s in series for ds in s}
    assert orthanc.instance_uids() == delivered, "every result, and only results, in Orthanc"
    assert not sent & delivered and len(delivered) >= 3 * N_SERIES  # SC(s), PDF, SR each

    # The api role sees what the scp and the workers wrote.
    anonymous = APIClient(api.http_port)
    status, health = anonymous.request("GET", "/health")
    assert status == 200 and health["status"] == "ok", health
    admin = anonymous.login("admin", ADMIN_PASSWORD)
    status, jobs = admin.request("GET", "/jobs?per_page=100")
    assert status == 200 and jobs["total"] == N_SERIES, jobs
    assert {job["state"] for job in jobs["items"]} == {"done"}
    status, history = admin.request("GET", "/history?source=dicom&per_page=100")
    assert status == 200 and history["total"] == N_SERIES, history
    series_uids = {str(s[0].SeriesInstanceUID) for s in series}
    assert {item["series_instance_uid"] for item in history["items"]} == series_uids

    # TensorFlow's autograph files: written by the workers' pool processes, and gone
    # with them (they end with os._exit, which skips autograph's own removal).
    assert list(temporary.glob("__autograph_generated_file*.py")), "no model was loaded"
    cluster.stop_all()
    assert list(temporary.glob("__autograph_generated_file*.py")) == [], cluster.logs()


class CountingPeer:
    """A Storage SCP that counts every C-STORE it receives, by SOP Instance UID."""

    AE_TITLE = "PEER"

    def __init__(self) -> None:
        self.port = free_port()
        self.received: Counter[str] = Counter()
        ae = AE(ae_title=self.AE_TITLE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: evt.Event) -> int:
        self.received[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000


@pytest.fixture(scope="module")
def full_size_series() -> list[Dataset]:
    """300 slices of 512x512, so that a job runs a second or more and a kill lands
    inside it. Built once for the module's three kill tests: the phantom costs 8 to
    30 s of CPU a time on two cores, and the tests only send it, each to a cluster,
    a database and a peer of its own, so the shared UIDs never meet."""
    return make_ct_series(300, rows=512, columns=512)


@pytest.fixture
def peer() -> Iterator[CountingPeer]:
    server = CountingPeer()
    yield server
    server.server.shutdown()


@pytest.mark.parametrize("victim", ["pool-process", "whole-worker"])
def test_a_worker_killed_mid_job_loses_nothing_and_sends_nothing_twice(
    cluster: Cluster,
    wait_for: WaitFor,
    peer: CountingPeer,
    victim: str,
    full_size_series: list[Dataset],
) -> None:
    cluster.settings["LUNGNODE_PEERS"] = (
        f"scu={SENDER_AE}@127.0.0.1:11119,peer={peer.AE_TITLE}@127.0.0.1:{peer.port}"
    )
    cluster.settings["LUNGNODE_RESULT_DESTINATIONS"] = "peer"
    scp = cluster.start("scp")
    cluster.start("beat")
    workers = _start_workers(cluster, 2)
    assert scp.dicom_port is not None
    # Full-size slices, so the job runs a second or more: the kill must land inside it.
    datasets = full_size_series
    assert _send(scp.dicom_port, datasets) == [0] * len(datasets)

    def running_worker() -> Role | None:
        return next((w for w in workers if "running (attempt 1" in w.log_text()), None)

    # Looked for often: the window between the job's start and its end is short.
    if not wait_until(lambda: running_worker() is not None, timeout=60, step=0.02):
        pytest.fail(f"timed out waiting for the job to start\n{cluster.logs()}")
    victim_worker = running_worker()
    assert victim_worker is not None
    if victim == "pool-process":
        (child,) = victim_worker.children()
        os.kill(child, signal.SIGKILL)
    else:
        os.killpg(victim_worker.process.pid, signal.SIGKILL)
    # Killed mid-job: nothing recorded (the worker's parent may already have queued it again).
    assert cluster.query("SELECT COUNT(*) FROM prediction") == [(0,)], "killed after the job ended"

    def finished() -> bool:
        pending = cluster.query("SELECT COUNT(*) FROM delivery WHERE state != 'done'")
        return cluster.query("SELECT state FROM job") == [("done",)] and pending == [(0,)]

    wait_for(finished, 240, "the job to finish after the kill")
    ((attempts, last_error),) = cluster.query("SELECT attempts, last_error FROM job")
    assert attempts == 2 and str(last_error).startswith("worker lost"), cluster.logs()
    assert cluster.query("SELECT COUNT(*) FROM prediction") == [(1,)]
    delivered = [str(uid) for (uid,) in cluster.query("SELECT sop_instance_uid FROM delivery")]
    wait_for(lambda: set(peer.received) == set(delivered), 10, "the PACS to hold every result")
    assert set(peer.received.values()) == {1}, f"sent more than once: {peer.received}"


def test_intake_goes_on_while_the_broker_is_down_and_jobs_run_after(
    cluster: Cluster, wait_for: WaitFor
) -> None:
    """Redis is stopped for 30 s during intake: one series arrives as it stops, one
    halfway through; both are acknowledged and queued, and run once Redis is back."""
    scp = cluster.start("scp")
    cluster.start("beat")
    workers = _start_workers(cluster, 1)
    assert scp.dicom_port is not None
    series = [make_ct_series(16, rows=128, columns=128, seed=k) for k in range(2)]

    def queued(count: int) -> Callable[[], bool]:
        return lambda: (
            cluster.query("SELECT COUNT(*) FROM job WHERE state = 'queued'") == [(count,)]
        )

    cluster.broker.stop()
    stopped = time.monotonic()
    try:
        # Acknowledged: durable in the database, broker or not.
        assert _send(scp.dicom_port, series[0]) == [0] * len(series[0])
        wait_for(queued(1), 30, "the first series to complete while the broker is down")
        threading.Event().wait(max(0.0, stopped + BROKER_OUTAGE_SECONDS / 2 - time.monotonic()))
        assert _send(scp.dicom_port, series[1]) == [0] * len(series[1])
        wait_for(queued(2), 30, "the second series to complete while the broker is down")
        threading.Event().wait(max(0.0, stopped + BROKER_OUTAGE_SECONDS - time.monotonic()))
        assert queued(2)(), "a job ran while the broker was down"
    finally:
        down_for = time.monotonic() - stopped
        cluster.broker.start()  # same port, empty: every message sent before is gone
    assert down_for >= BROKER_OUTAGE_SECONDS
    wait_for(
        lambda: cluster.query("SELECT state FROM job") == [("done",), ("done",)],
        180,
        "the jobs to run once the broker is back",
    )
    assert cluster.query("SELECT attempts FROM job") == [(1,), (1,)]
    assert sorted(_job_runs(workers).values()) == [1, 1]
    assert "did not take its message" in scp.log_text()


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A virtual host of the machine's RabbitMQ for this test alone, removed after."""
    rabbitmqctl = require_tool("rabbitmqctl")
    vhost = f"lungnode-test-{os.getpid()}-{free_port()}"
    subprocess.run([rabbitmqctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(
            [rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run([rabbitmqctl, "delete_vhost", vhost], capture_output=True, timeout=60)


def test_on_rabbitmq_a_killed_pool_process_loses_nothing(
    cluster: Cluster,
    wait_for: WaitFor,
    peer: CountingPeer,
    rabbitmq_url: str,
    full_size_series: list[Dataset],
) -> None:
    """The same roles with RabbitMQ as the broker: AMQP acknowledgements, a job
    whose pool process is killed is put back and finished once."""
    cluster.settings["LUNGNODE_BROKER_URL"] = rabbitmq_url
    cluster.settings["LUNGNODE_PEERS"] = (
        f"scu={SENDER_AE}@127.0.0.1:11119,peer={peer.AE_TITLE}@127.0.0.1:{peer.port}"
    )
    cluster.settings["LUNGNODE_RESULT_DESTINATIONS"] = "peer"
    scp = cluster.start("scp")
    cluster.start("beat")
    (worker,) = _start_workers(cluster, 1)
    assert scp.dicom_port is not None
    # Full-size slices, looked for often: the kill must land inside the job.
    assert _send(scp.dicom_port, full_size_series) == [0] * 300
    if not wait_until(lambda: "running (attempt 1" in worker.log_text(), timeout=60, step=0.02):
        pytest.fail(f"timed out waiting for the job to start\n{cluster.logs()}")
    (child,) = worker.children()
    os.kill(child, signal.SIGKILL)
    assert cluster.query("SELECT COUNT(*) FROM prediction") == [(0,)], "killed after the job ended"

    def finished() -> bool:
        pending = cluster.query("SELECT COUNT(*) FROM delivery WHERE state != 'done'")
        return cluster.query("SELECT state FROM job") == [("done",)] and pending == [(0,)]

    wait_for(finished, 240, "the job to finish after the kill")
    assert cluster.query("SELECT attempts FROM job") == [(2,)]
    delivered = [str(uid) for (uid,) in cluster.query("SELECT sop_instance_uid FROM delivery")]
    wait_for(lambda: set(peer.received) == set(delivered), 10, "the PACS to hold every result")
    assert set(peer.received.values()) == {1}
