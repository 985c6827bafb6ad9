"""Measure the node's cold start and its stop under a running job, in one run.

    python scripts/bench_cold_start.py [--slices 300] [--keep] [--json results.json]

Each node is a real ``lungnode serve``, started cold (a fresh process: no
TensorFlow, no model, no traced graph), with the default settings but for free
ports, a temporary working directory with the default relative ``storage/``,
the repository's ``models/``, and one peer (this script's AE title, with
nothing listening for the results: deliveries wait in the outbox and do not
take part in the figures). Series are synthetic 512x512 16-bit CT series
(``make_ct_series``), each with its own UIDs, sent with DCMTK ``storescu``
over one association (with ``TCP_NODELAY=1``); without DCMTK, pynetdicom sends.

What is measured:

1. **Start.** Seconds from the process's start to the first C-ECHO answer
   (the SCP), and to ``/api/v1/health`` saying ``"state": "ready"`` (the
   model warmed); the node's own ``warm_up_seconds`` too.
2. **Jobs.** Job start to done (the job row's ``started_at`` to
   ``finished_at``) of the first series after the warm-up, then of
   ``--warm`` more series (warm). ``--repeat`` cold nodes; the medians are
   compared: the first series must be within 1.3x of a warm one. (On a
   shared machine one job varies by +-50 %, hence the repeats.)
3. **Stop.** SIGTERM to ``serve`` ``--signal-after`` seconds (0.2) after a
   series' job starts (the node warm): seconds until the process has exited,
   with the default ``stop_timeout_seconds`` and with ``--tight-bound`` (0: do
   not wait for the job), and the job's state after the stop; for the second,
   a restart on the same storage, the job run to the end, and the number of
   predictions it left (must be 1).

A node whose health has no ``state`` (before the warm-up existed) counts as
ready at its first 200, so the script also measures older versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.error import HTTPError, URLError

from pydicom.uid import generate_uid

# The test-data generators live with the tests (they ship in neither wheel nor image): a
# script run as `python scripts/x.py` puts the repository root on sys.path first.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.synthetic import make_ct_series, write_series  # noqa: E402

HOST = "127.0.0.1"
CALLING_AE = "BENCH"
LUNGNODE = Path(sys.executable).with_name("lungnode")
NODELAY_ENV = dict(os.environ) | {"TCP_NODELAY": "1"}
TARGET_RATIO = 1.3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Serve:
    """One ``lungnode serve`` process, started at ``started`` (time.monotonic())."""

    process: subprocess.Popen[bytes]
    work: Path
    dicom_port: int
    http_port: int
    started: float
    log: Path

    @property
    def database(self) -> Path:
        return self.work / "storage" / "lungnode.db"

    def health(self) -> tuple[int, dict[str, object]]:
        url = f"http://{HOST}:{self.http_port}/api/v1/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.load(response)
        except HTTPError as exc:
            return exc.code, json.load(exc)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=10)
        try:
            return connection.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []  # not migrated yet
        finally:
            connection.close()


@contextmanager
def serve(work: Path, **settings: str) -> Iterator[Serve]:
    """Start ``lungnode serve`` in ``work``; kill what is left of it afterwards."""
    work.mkdir(parents=True, exist_ok=True)
    dicom_port = int(settings.pop("dicom_port", free_port()))
    http_port = free_port()
    env = {
        **os.environ,
        "LUNGNODE_CONFIG": str(work / "no-config.toml"),
        "LUNGNODE_DICOM_HOST": HOST,
        "LUNGNODE_DICOM_PORT": str(dicom_port),
        "LUNGNODE_HTTP_PORT": str(http_port),
        "LUNGNODE_PEERS": f"bench={CALLING_AE}@{HOST}:{free_port()}",
        "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
        "LUNGNODE_ADMIN_PASSWORD": "bench-admin-password",
        **{f"LUNGNODE_{key.upper()}": value for key, value in settings.items()},
    }
    log = work / f"serve-{len(list(work.glob('serve-*.log')))}.log"
    with log.open("wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            [str(LUNGNODE), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
            start_new_session=True,
        )
    node = Serve(process, work, dicom_port, http_port, started, log)
    try:
        yield node
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.network_timeout = 2
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(HOST, port, ae_title="LUNGNODE")
    except OSError:
        return False
    if not assoc.is_established:
        return False
    answered = "Status" in (status := assoc.send_c_echo()) and status.Status == 0
    assoc.release()
    return bool(answered)


def _alive(node: Serve) -> None:
    if node.process.poll() is not None:
        raise RuntimeError(f"serve exited:\n{node.log.read_text(errors='replace')[-3000:]}")


def wait_echo(node: Serve) -> float:
    """Seconds from the process's start to the SCP's first C-ECHO answer."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        _alive(node)
        if _echo(node.dicom_port):
            return time.monotonic() - node.started
        time.sleep(0.05)
    raise RuntimeError("no C-ECHO answer within 120 s")


def wait_ready(node: Serve) -> tuple[float, object]:
    """Seconds from the process's start to a ready model; the node's own warm-up time."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        _alive(node)
        try:
            status, body = node.health()
        except (URLError, OSError, ValueError):
            status, body = 0, {}
        checks = body.get("checks", {}) if body else {}
        model = checks.get("model", {}) if isinstance(checks, dict) else {}
        state = model.get("state")
        if state == "failed":
            raise RuntimeError(f"the model failed to warm: {model}")
        if state == "ready" or (state is None and status == 200):
            return time.monotonic() - node.started, model.get("warm_up_seconds")
        time.sleep(0.05)
    raise RuntimeError("the model was not ready within 300 s")


def send(node: Serve, folder: Path) -> None:
    if shutil.which("storescu"):
        argv = ["storescu", "-aet", CALLING_AE, "-aec", "LUNGNODE", HOST, str(node.dicom_port)]
        subprocess.run([*argv, "+sd", str(folder)], check=True, env=NODELAY_ENV)
        return
    from lungnode.dicom.scu import Destination, send_files

    destination = Destination.parse(f"LUNGNODE@{HOST}:{node.dicom_port}")
    send_files(sorted(folder.glob("*.dcm")), destination, calling_ae=CALLING_AE)


def job_row(node: Serve, job_id: int) -> tuple[str, str | None, str | None] | None:
    rows = node.query(f"SELECT state, started_at, finished_at FROM job WHERE id = {job_id}")
    return rows[0] if rows else None  # type: ignore[return-value]


def wait_job(node: Serve, job_id: int, states: tuple[str, ...], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = job_row(node, job_id)
        if row is not None and row[0] in states:
            return
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} not {states} within {timeout} s: {job_row(node, job_id)}")


def job_seconds(node: Serve, job_id: int) -> float:
    wait_job(node, job_id, ("done", "failed"))
    row = job_row(node, job_id)
    assert row is not None and row[1] and row[2], row
    if row[0] != "done":
        raise RuntimeError(f"job {job_id} failed; see {node.log}")
    return (datetime.fromisoformat(row[2]) - datetime.fromisoformat(row[1])).total_seconds()


def stop_mid_job(node: Serve, folder: Path, job_id: int, after: float) -> tuple[float, str]:
    """Send a series, SIGTERM the node ``after`` s into its job; the stop's seconds, the
    job's state then."""
    send(node, folder)
    wait_job(node, job_id, ("running",))
    time.sleep(after)
    started = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    code = node.process.wait(120)
    seconds = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"serve exited {code} on SIGTERM; see {node.log}")
    row = job_row(node, job_id)
    return seconds, str(row[0]) if row else "?"


def make_series(root: Path, count: int, slices: int) -> list[Path]:
    """``count`` folders of one series each: the same pixels, fresh UIDs per series."""
    datasets = make_ct_series(slices)
    folders = []
    for k in range(count):
        series_uid = generate_uid()
        for ds in datasets:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        folders.append(root / f"series-{k}")
        write_series(datasets, folders[-1])
    return folders


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="cold nodes to start (median)")
    parser.add_argument("--warm", type=int, default=3, help="warm series per node (median)")
    parser.add_argument(
        "--signal-after", type=float, default=0.2, help="seconds into a job to send SIGTERM"
    )
    parser.add_argument(
        "--tight-bound", type=float, default=0.0, help="stop_timeout_seconds of the second stop"
    )
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lungnode-cold-start-"))
    runs: dict[str, list[float]] = {"echo_s": [], "ready_s": [], "warm_up_s": []}
    runs |= {"first_job_s": [], "warm_job_s": []}
    stops: dict[str, object] = {}
    try:
        count = args.warm + 2
        print(f"writing {count} series of {args.slices} slices under {work} ...", flush=True)
        series = make_series(work / "series", count, args.slices)
        for run in range(args.repeat):
            with serve(work / f"node-{run}") as node:
                runs["echo_s"].append(wait_echo(node))
                ready_s, warm_up = wait_ready(node)
                runs["ready_s"].append(ready_s)
                if isinstance(warm_up, int | float):
                    runs["warm_up_s"].append(float(warm_up))
                for k in range(args.warm + 1):
                    send(node, series[k])
                    seconds = job_seconds(node, k + 1)
                    runs["first_job_s" if k == 0 else "warm_job_s"].append(seconds)
                if run == 0:
                    seconds, state = stop_mid_job(
                        node, series[args.warm + 1], args.warm + 2, args.signal_after
                    )
                    stops |= {"default_s": seconds, "default_job": state}
                print(f"node {run + 1} of {args.repeat}: {runs}", flush=True)

        with serve(work / "node-tight", stop_timeout_seconds=str(args.tight_bound)) as node:
            wait_echo(node)
            wait_ready(node)
            seconds, state = stop_mid_job(node, series[0], 1, args.signal_after)
            stops |= {"tight_s": seconds, "tight_job": state}
            port = str(node.dicom_port)
        with serve(work / "node-tight", dicom_port=port) as node:
            wait_job(node, 1, ("done",))
            predictions = node.query("SELECT COUNT(*) FROM prediction WHERE job_id = 1")
            stops["predictions_after_restart"] = predictions[0][0]
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in runs.items() if values}
    ratio = median["first_job_s"] / median["warm_job_s"]
    missed = "" if ratio <= TARGET_RATIO else "  MISSED"
    each = ", ".join(f"{v:.2f}" for v in runs["first_job_s"])
    rows = [
        ("SCP answers C-ECHO, from the process's start", f"{median['echo_s']:.1f} s"),
        ("model ready (health 'ready'), from the process's start", f"{median['ready_s']:.1f} s"),
        ("  the node's warm-up (warm_up_seconds)", f"{median.get('warm_up_s', 0):.1f} s"),
        ("first series after the warm-up: job start to done", f"{median['first_job_s']:.2f} s"),
        ("  each node's", each),
        ("later series (warm): job start to done", f"{median['warm_job_s']:.2f} s"),
        (f"first / warm (target <= {TARGET_RATIO})", f"{ratio:.2f}{missed}"),
        (
            f"SIGTERM {args.signal_after:g} s into a job, stop_timeout_seconds default",
            f"{stops['default_s']:.2f} s, job {stops['default_job']}",
        ),
        (
            f"SIGTERM {args.signal_after:g} s into a job, stop_timeout_seconds = "
            f"{args.tight_bound:g}",
            f"{stops['tight_s']:.2f} s, job {stops['tight_job']}",
        ),
        ("  that job after a restart: predictions", str(stops["predictions_after_restart"])),
    ]
    print(
        f"\n{args.slices}-slice series; lungnode serve started cold {args.repeat} time(s), "
        f"{args.warm} warm series each; medians"
    )
    for label, value in rows:
        print(f"  {label:<62} {value}")
    if args.json:
        document = {"slices": args.slices, "runs": runs, "stops": stops, "ratio": ratio}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    raise SystemExit(main())
