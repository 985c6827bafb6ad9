"""Measure STOW-RS ingest of lungnode against C-STORE into the same node, in one run.

    python scripts/bench_stow.py [--slices 300] [--requests 10] [--repeat 1] [--json out.json]

What is measured: the synthetic 512x512 16-bit CT series of
``scripts/bench_ingest.py`` (Explicit VR Little Endian, ``tests.support.synthetic``),
sent over 127.0.0.1 to a ``lungnode serve`` started fresh, on free ports and with
empty storage, for every case:

* ``C-STORE 1 assoc``: DCMTK ``storescu``, one association, all instances
  (``bench_ingest.send``, with TCP_NODELAY);
* ``STOW 1 request``: one ``POST /dicomweb/studies`` with every instance;
* ``STOW N requests``: the instances split into ``--requests`` requests, sent one
  after another on one keep-alive connection.

The STOW bodies are built in the sender's memory before the clock starts; the
wall time runs from the first request to the last response. Both routes end in
the same intake (fsync of the file and its folder before the answer), so the
difference is what HTTP, the multipart parsing and the spooling of each part
cost against DIMSE. After each case the node's instance count is checked
against the number sent; a case that lost instances is marked invalid (exit
status 1). The node runs with its defaults (``ingest_processes`` 0: one
receiving process per core for C-STORE; STOW-RS is served by the node's HTTP
threads). The numbers are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench_ingest import (  # noqa: E402
    CALLING_AE,
    HOST,
    Receiver,
    free_port,
    make_folders,
    send,
    start,
    stop,
    wait_model_ready,
    wait_ready,
)

PASSWORD = "bench-stow-admin-password"
BOUNDARY = "lungnode-bench-stow-boundary"


@dataclass
class Case:
    name: str
    instances: int
    megabytes: float
    wall_s: list[float] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def valid(self) -> bool:
        return not self.error and bool(self.stored) and min(self.stored) == self.instances

    @property
    def instances_per_s(self) -> float:
        return self.instances / statistics.median(self.wall_s) if self.wall_s else 0.0


@contextmanager
def node(work: Path) -> Iterator[tuple[Receiver, str]]:
    """``lungnode serve`` on free ports and empty storage; (its SCP, its HTTP base URL)."""
    storage = work / "storage"
    storage.mkdir(parents=True)
    log = work / "lungnode.log"
    port, http_port = free_port(), free_port()
    env = dict(os.environ) | {
        "LUNGNODE_ENV": "testing",
        "LUNGNODE_STORAGE_DIR": str(storage),
        "LUNGNODE_DICOM_HOST": HOST,
        "LUNGNODE_DICOM_PORT": str(port),
        "LUNGNODE_HTTP_HOST": HOST,
        "LUNGNODE_HTTP_PORT": str(http_port),
        "LUNGNODE_PEERS": f"bench={CALLING_AE}@{HOST}:11119",
        "LUNGNODE_MIN_FREE_DISK_MB": "0",
        "LUNGNODE_LOG_LEVEL": "WARNING",
        "LUNGNODE_ADMIN_PASSWORD": PASSWORD,
        "LUNGNODE_RATE_LIMIT_DEFAULT": "100000/minute",
        # The node of this checkout, whatever an installed lungnode runs.
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    exe = Path(sys.executable).with_name("lungnode")
    argv = [str(exe) if exe.exists() else "lungnode", "serve"]
    db = storage / "lungnode.db"

    def count() -> int:
        with sqlite3.connect(db) as con:
            return int(con.execute("SELECT COUNT(*) FROM instance").fetchone()[0])

    process = start(argv, log, env)
    try:
        wait_ready(process, "LUNGNODE", port, log)
        base = f"http://{HOST}:{http_port}"
        # Measure the node warm: its model warm-up would compete with the first case.
        wait_model_ready(f"{base}/api/v1/health")
        yield Receiver("lungnode", "LUNGNODE", port, "fsync per instance", count, process), base
    finally:
        stop(process)


def multipart_body(payloads: list[bytes]) -> bytes:
    body = bytearray()
    for payload in payloads:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += payload + b"\r\n"
    body += f"--{BOUNDARY}--\r\n".encode()
    return bytes(body)


def stow(base: str, files: list[Path], requests_count: int) -> float:
    """Send the files in ``requests_count`` STOW-RS requests, one after another; wall time."""
    size = -(-len(files) // requests_count)
    bodies = [
        multipart_body([path.read_bytes() for path in files[i : i + size]])
        for i in range(0, len(files), size)
    ]
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "Accept": "application/dicom+json",
    }
    with requests.Session() as session:
        session.auth = ("admin", PASSWORD)
        t0 = time.perf_counter()
        for body in bodies:
            response = session.post(
                f"{base}/dicomweb/studies", data=body, headers=headers, timeout=600
            )
            if response.status_code != 200:
                answer = f"{response.status_code}: {response.text[:200]}"
                raise RuntimeError(f"STOW-RS answered {answer}")
        return time.perf_counter() - t0


def stored_count(target: Receiver, expected: int) -> int:
    deadline = time.monotonic() + 10.0
    count = target.count_stored()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        count = target.count_stored()
    return count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--requests", type=int, default=10, help="requests of the split case")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the median is shown")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on PATH")

    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-stow-") as tmp:
        (folder,), _four, megabytes = make_folders(Path(tmp) / "series", args.slices)
        files = sorted(folder.iterdir())
        print(f"{args.slices} slices, {megabytes:.1f} MB")
        names = ["C-STORE 1 assoc", "STOW 1 request", f"STOW {args.requests} requests"]
        for name in names:
            case = Case(name, args.slices, megabytes)
            cases.append(case)
            try:
                for k in range(args.repeat):
                    work = Path(tmp) / f"{name.replace(' ', '-')}-{k}"
                    with node(work) as (target, base):
                        if name.startswith("C-STORE"):
                            case.wall_s.append(send(target, [folder], work))
                        else:
                            count = 1 if name == "STOW 1 request" else args.requests
                            case.wall_s.append(stow(base, files, count))
                        case.stored.append(stored_count(target, args.slices))
                    shutil.rmtree(work / "storage", ignore_errors=True)
            except (RuntimeError, OSError, sqlite3.Error, requests.RequestException) as exc:
                case.error = str(exc).strip().splitlines()[0][:200]
                print(f"{name}: {exc}", file=sys.stderr)
            print(f"  {name:<20}done", flush=True)

    print(f"\n{'case':<20}{'sent':>6}{'stored':>8}{'wall s':>8}{'inst/s':>9}{'MB/s':>8}")
    for case in cases:
        if case.error:
            print(f"{case.name:<20}{case.instances:>6}  ERROR: {case.error}")
            continue
        wall = statistics.median(case.wall_s)
        flag = "" if case.valid else "  INVALID: instances lost"
        print(
            f"{case.name:<20}{case.instances:>6}{min(case.stored):>8}{wall:>8.2f}"
            f"{case.instances_per_s:>9.1f}{case.megabytes / wall:>8.1f}{flag}"
        )
    if args.json:
        rows = [asdict(c) | {"instances_per_s": c.instances_per_s, "valid": c.valid} for c in cases]
        args.json.write_text(json.dumps({"slices": args.slices, "cases": rows}, indent=2))
    return 0 if all(case.valid for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
