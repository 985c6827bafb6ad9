"""Throughput of the scaled roles with 1 and with 2 Celery workers, and the queue's overhead.

    python scripts/bench_scaled.py [--series 8] [--slices 300] [--rows 512] [--workers 1,2]

For each worker count, a fresh topology runs as local processes: a Redis of
its own on a free port, one ``lungnode scp``, ``lungnode beat`` and the
workers, on a fresh storage folder (SQLite in WAL mode, or
``--database-url``). Every worker is warm before anything is timed. Then:

1. *Queue overhead*: series are sent one at a time, each once the previous
   job is done, so every job finds an idle worker. Overhead is the job row's
   ``started_at - created_at``: from the series' completion (job queued,
   message published) to a worker's claim, through Redis and Celery. p50 and p95.
2. *Throughput*: ``--series`` series are sent at once (DCMTK ``storescu``, one
   association each, declared instance count, so each completes when its last
   slice is in) and the clock runs from the first job queued to the last job
   done. Series per minute; scaling efficiency = throughput(2) / (2 × throughput(1)).

TensorFlow gets ``cores / workers`` intra-op threads per worker, so one worker
may use every core and two share them. Results go nowhere (no destination), so
only reception and analysis are measured. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydicom import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import Engine  # noqa: E402

from lungnode.db.session import make_engine  # noqa: E402
from tests.pacs import free_port  # noqa: E402
from tests.support.synthetic import make_ct_series, write_series  # noqa: E402

LUNGNODE = Path(sys.executable).with_name("lungnode")


def wait(predicate: object, timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step)


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Topology:
    """Redis, scp, beat and ``workers`` worker processes on one fresh storage."""

    def __init__(self, work: Path, workers: int, database_url: str) -> None:
        self.work = work
        self.storage = work / "storage"
        self.redis_port = free_port()
        self.dicom_port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        cores = len(os.sched_getaffinity(0))
        threads = str(max(1, cores // workers))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LUNGNODE_")},
            "LUNGNODE_CONFIG": str(work / "none.toml"),
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_STORAGE_DIR": str(self.storage),
            "LUNGNODE_DATABASE_URL": database_url,
            "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
            "LUNGNODE_QUEUE": "celery",
            "LUNGNODE_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "LUNGNODE_DICOM_HOST": "127.0.0.1",
            "LUNGNODE_DICOM_PORT": str(self.dicom_port),
            "LUNGNODE_ALLOW_UNKNOWN_CALLERS": "true",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_INGEST_PROCESSES": "1",
            "LUNGNODE_MAX_ASSOCIATIONS": "32",
            "LUNGNODE_JOB_CHECK_INTERVAL": "0.5",
            "TF_NUM_INTRAOP_THREADS": threads,
            "TF_NUM_INTEROP_THREADS": "1",
            "OMP_NUM_THREADS": threads,
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        self.workers = workers
        self._engine: Engine | None = None

    def _start(self, name: str, command: list[str]) -> Path:
        log = self.work / f"{name}.log"
        with log.open("wb") as stream:
            self.processes.append(
                subprocess.Popen(
                    command,
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.work,
                    start_new_session=True,
                )
            )
        self.logs.append(log)
        return log

    def start(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise SystemExit("redis-server is not installed")
        self._start(
            "redis",
            [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", ""],
        )
        wait(lambda: port_open(self.redis_port), 15, "redis")
        self._start("scp", [str(LUNGNODE), "scp"])
        wait(lambda: port_open(self.dicom_port), 60, "the scp")
        self._start("beat", [str(LUNGNODE), "beat"])
        logs = [self._start(f"worker-{k}", [str(LUNGNODE), "worker"]) for k in range(self.workers)]
        for log in logs:
            wait(
                lambda log=log: "ready (warmed in" in log.read_text(errors="replace"), 300, log.name
            )

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def jobs(self) -> list[tuple[str, datetime, datetime, datetime]]:
        from sqlalchemy import select

        from lungnode.db.models import Job

        if self._engine is None:
            url = self.env["LUNGNODE_DATABASE_URL"] or f"sqlite:///{self.storage / 'lungnode.db'}"
            self._engine = make_engine(url)
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(Job.state, Job.created_at, Job.started_at, Job.finished_at).order_by(Job.id)
            ).all()
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    def send(self, folders: list[Path]) -> None:
        """Each folder over its own association, all at once (DCMTK storescu)."""
        logs = [self.work / f"storescu-{time.monotonic_ns()}-{k}.log" for k in range(len(folders))]
        senders = []
        for folder, log in zip(folders, logs, strict=True):
            with log.open("wb") as stream:
                senders.append(
                    subprocess.Popen(
                        [
                            "storescu",
                            "-aec",
                            "LUNGNODE",
                            "127.0.0.1",
                            str(self.dicom_port),
                            "+sd",
                            str(folder),
                        ],
                        stdout=stream,
                        stderr=subprocess.STDOUT,
                    )
                )
        for sender, log in zip(senders, logs, strict=True):
            if sender.wait(timeout=900) != 0:
                raise RuntimeError(f"storescu failed: {log.read_text(errors='replace')[-2000:]}")


def write_copy(datasets: list[Dataset], folder: Path) -> Path:
    """The series under fresh study, series and instance UIDs."""
    study, series = generate_uid(), generate_uid()
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_series(datasets, folder)
    return folder


def _time(moment: datetime | None) -> float:
    assert moment is not None
    return moment.timestamp()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def measure(
    work: Path, workers: int, folders: list[Path], solo: list[Path], database_url: str
) -> dict[str, float]:
    topology = Topology(work, workers, database_url or "")
    try:
        topology.start()
        # 1. Queue overhead, one job at a time on idle workers.
        for k, folder in enumerate(solo):
            topology.send([folder])
            wait(lambda k=k: [j[0] for j in topology.jobs()].count("done") == k + 1, 600, "job")
        alone = topology.jobs()
        overheads = [_time(started) - _time(created) for _, created, started, _ in alone]
        job_seconds = [_time(finished) - _time(started) for _, _, started, finished in alone]
        overhead_runs = len(solo)
        # 2. Throughput, all series at once.
        topology.send(folders)
        total = overhead_runs + len(folders)
        wait(lambda: [j[0] for j in topology.jobs()].count("done") == total, 3600, "all jobs", 1.0)
        batch = topology.jobs()[overhead_runs:]
        first_queued = min(_time(created) for _, created, _, _ in batch)
        last_done = max(_time(finished) for _, _, _, finished in batch)
        makespan = last_done - first_queued
        return {
            "workers": workers,
            "series": len(folders),
            "makespan_s": round(makespan, 2),
            "series_per_minute": round(60 * len(folders) / makespan, 2),
            "job_seconds_alone_p50": round(statistics.median(job_seconds), 2),
            "queue_overhead_ms_p50": round(1000 * statistics.median(overheads), 1),
            "queue_overhead_ms_p95": round(1000 * percentile(overheads, 0.95), 1),
        }
    finally:
        topology.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--overhead-runs", type=int, default=5)
    parser.add_argument("--database-url", default="", help="default: SQLite in the storage")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("DCMTK storescu is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-scaled-") as temp:
        root = Path(temp)
        # One phantom series, written again under fresh UIDs for every copy (a
        # series sent twice would be a duplicate): generating phantoms is slow.
        base = make_ct_series(args.slices, rows=args.rows, columns=args.rows)
        folders = [write_copy(base, root / "series" / str(k)) for k in range(args.series)]
        # The one-at-a-time runs have copies of their own.
        solo = [write_copy(base, root / "solo" / str(k)) for k in range(args.overhead_runs)]
        results = []
        for count in [int(n) for n in args.workers.split(",")]:
            work = root / f"workers-{count}"
            work.mkdir()
            # The same files for each worker count: every run has a fresh storage.
            results.append(measure(work, count, folders, solo, args.database_url))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    summary: dict[str, object] = {
        "cores": len(os.sched_getaffinity(0)),
        "slices": args.slices,
        "rows": args.rows,
        "runs": results,
    }
    by_workers = {int(r["workers"]): r["series_per_minute"] for r in results}
    if 1 in by_workers and 2 in by_workers:
        summary["scaling_efficiency"] = round(by_workers[2] / (2 * by_workers[1]), 2)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for r in results:
            print(
                f"{r['workers']} worker(s): {r['series']} series in {r['makespan_s']} s "
                f"= {r['series_per_minute']} series/min; one job alone "
                f"{r['job_seconds_alone_p50']} s; queue overhead p50 "
                f"{r['queue_overhead_ms_p50']} ms, p95 {r['queue_overhead_ms_p95']} ms"
            )
        if "scaling_efficiency" in summary:
            print(f"scaling efficiency: {summary['scaling_efficiency']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
