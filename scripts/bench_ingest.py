"""Measure DICOM ingest throughput of lungnode against real peers, in one run.

    python scripts/bench_ingest.py [--slices 300] [--repeat 1]
        [--only lungnode,orthanc,pynetdicom,dcmtk] [--ingest-processes N]
        [--json results.json]

What is measured: a synthetic 512x512 16-bit CT series (Explicit VR Little
Endian, ``tests.support.synthetic``) is sent with DCMTK ``storescu`` (C++, so
the sender does not compete for the Python interpreter) to each receiver in
turn, over 127.0.0.1 only:

* ``1 assoc``: one storescu process, one association, all instances;
* ``4 assoc``: the files split into four folders, four storescu processes
  started together; the aggregate rate is instances / wall time of the slowest.

Wall time runs from storescu's start to its exit, so it includes association
set-up and storescu reading the files. Every receiver is started fresh, on
free ports and with empty storage, for every run; after each run the stored
instance count is checked against the number sent, and a run that lost
instances is marked invalid. With ``--repeat K`` the median wall time is shown.

How to read it: ``inst/s`` and ``MB/s`` (file bytes sent / wall time) per
receiver and scenario. The receivers do not promise the same durability:
lungnode fsyncs every instance (file and directory) before it answers, and
Orthanc does too when ``SyncStorageArea`` is on; the pynetdicom and DCMTK
storescp apps only write files (no fsync), so they are an upper bound for
"just receive and write" rather than a like-for-like peer. Each receiver runs
with its default maximum PDU size. The numbers are noisy on a shared machine.

Nagle: DCMTK leaves Nagle's algorithm on unless the environment sets
``TCP_NODELAY=1``; with it on, every C-STORE waits for a delayed ACK (about
40 ms) and a single association tops out near 20 instances/s whatever the
receiver does. So storescu, DCMTK storescp and Orthanc (built on DCMTK) run
with ``TCP_NODELAY=1``; the Python receivers use their own sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The test-data generators live in tests/support (not shipped in lungnode), so a
# script run as `python scripts/x.py` puts the repository root on sys.path first.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.synthetic import make_ct_series, write_series  # noqa: E402

HOST = "127.0.0.1"
CALLING_AE = "BENCH"
RECEIVERS = ("lungnode", "orthanc", "pynetdicom", "dcmtk")
SCENARIOS = {"1 assoc": 1, "4 assoc": 4}
REQUIREMENTS = {"1 assoc": 200.0, "4 assoc": 300.0}  # lungnode, instances/s
STOP_TIMEOUT_S = 10.0
NODELAY_ENV = dict(os.environ) | {"TCP_NODELAY": "1"}  # see "Nagle" above


@dataclass
class Receiver:
    """A started receiver: its AE, port, how to count what it stored, its process."""

    name: str
    ae_title: str
    port: int
    durability: str
    count_stored: Callable[[], int]
    process: subprocess.Popen[bytes]


@dataclass
class Result:
    receiver: str
    scenario: str
    instances: int
    megabytes: float
    wall_s: list[float] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    durability: str = ""
    error: str = ""

    @property
    def valid(self) -> bool:
        return not self.error and bool(self.stored) and min(self.stored) == self.instances

    @property
    def instances_per_s(self) -> float:
        return self.instances / statistics.median(self.wall_s) if self.wall_s else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process in its own process group, so that it and its children can be stopped."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone within the timeout."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    try:  # children of a forking server may outlive the leader
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_ready(process: subprocess.Popen[bytes], ae_title: str, port: int, log: Path) -> None:
    """Wait until the receiver answers a C-ECHO (and has not died)."""
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"exited with {process.returncode} before answering:\n{tail}")
        echo = subprocess.run(
            ["echoscu", "-aet", CALLING_AE, "-aec", ae_title, "-to", "2", HOST, str(port)],
            capture_output=True,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.25)
    raise RuntimeError(f"no C-ECHO answer on port {port} within 120 s")


def count_files(directory: Path) -> Callable[[], int]:
    return lambda: sum(1 for p in directory.rglob("*") if p.is_file())


def orthanc_version() -> str:
    out = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    return found.group(0) if found else "unknown"


def http_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.loads(response.read()))


@contextmanager
def receiver(name: str, work: Path, ingest_processes: int = 0) -> Iterator[Receiver]:
    """Start one receiver fresh on free ports with empty storage; stop it on exit."""
    storage = work / "storage"
    storage.mkdir(parents=True)
    log = work / f"{name}.log"
    port = free_port()
    if name == "lungnode":
        processes = ingest_processes or len(os.sched_getaffinity(0))
        ae, durability = "LUNGNODE", f"fsync per instance, {processes} process(es)"
        env = dict(os.environ) | {
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_STORAGE_DIR": str(storage),
            "LUNGNODE_DICOM_HOST": HOST,
            "LUNGNODE_DICOM_PORT": str(port),
            "LUNGNODE_HTTP_PORT": str(free_port()),
            "LUNGNODE_PEERS": f"bench={CALLING_AE}@{HOST}:11119",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_LOG_LEVEL": "WARNING",
            "LUNGNODE_MAX_ASSOCIATIONS": "8",
            "LUNGNODE_INGEST_PROCESSES": str(ingest_processes),
        }
        exe = Path(sys.executable).with_name("lungnode")
        argv = [str(exe) if exe.exists() else "lungnode", "serve"]
        db = storage / "lungnode.db"

        def count() -> int:
            with sqlite3.connect(db) as con:
                return int(con.execute("SELECT COUNT(*) FROM instance").fetchone()[0])

    elif name == "orthanc":
        ae, http_port = "ORTHANC", free_port()
        version = orthanc_version()
        parts = tuple(int(x) for x in version.split(".")) if version != "unknown" else (0,)
        config: dict[str, object] = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(work / "index"),
            "DicomAet": ae,
            "DicomPort": port,
            "HttpPort": http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageCompression": False,
            "Plugins": [],
        }
        if parts >= (1, 7, 4):  # SyncStorageArea (fsync of the storage area) exists from 1.7.4
            config["SyncStorageArea"] = True
            durability = f"Orthanc {version}, SyncStorageArea=true"
        else:
            durability = f"Orthanc {version}, no SyncStorageArea option"
        (work / "orthanc.json").write_text(json.dumps(config, indent=2))
        argv = ["Orthanc", str(work / "orthanc.json")]
        env = NODELAY_ENV

        def count() -> int:
            stats = http_json(f"http://{HOST}:{http_port}/statistics")
            return int(str(stats["CountInstances"]))

    elif name == "pynetdicom":
        ae, durability, env = "STORESCP", "files, no fsync", None
        argv = [sys.executable, "-m", "pynetdicom", "storescp", str(port)]
        argv += ["-aet", ae, "-ba", HOST, "-od", str(storage), "-q"]
        count = count_files(storage)
    elif name == "dcmtk":
        ae, durability, env = "STORESCP", "files, no fsync (--fork)", NODELAY_ENV
        argv = ["storescp", "--fork", "-aet", ae, "-od", str(storage), str(port)]
        count = count_files(storage)
    else:
        raise ValueError(f"unknown receiver {name!r}; choose from {', '.join(RECEIVERS)}")

    process = start(argv, log, env)
    try:
        wait_ready(process, ae, port, log)
        if name == "orthanc":
            http_json(f"http://{HOST}:{http_port}/system")
        yield Receiver(name, ae, port, durability, count, process)
    finally:
        stop(process)


def send(target: Receiver, folders: list[Path], work: Path) -> float:
    """Run one storescu per folder, all at once; the wall time until the last one exits."""
    senders: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        for i, folder in enumerate(folders):
            argv = ["storescu", "-aet", CALLING_AE, "-aec", target.ae_title]
            argv += [HOST, str(target.port), "+sd", str(folder)]
            senders.append(start(argv, work / f"storescu-{i}.log", NODELAY_ENV))
        codes = [p.wait() for p in senders]
        wall = time.perf_counter() - t0
    finally:
        for p in senders:
            stop(p)
    if any(codes):
        raise RuntimeError(f"storescu exit codes {codes}; see {work}/storescu-*.log")
    return wall


def stored_count(target: Receiver, expected: int) -> int:
    """The receiver's stored count, polled briefly in case indexing trails the responses."""
    deadline = time.monotonic() + 10.0
    count = target.count_stored()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        count = target.count_stored()
    return count


def make_folders(root: Path, n_slices: int) -> tuple[list[Path], list[Path], float]:
    """Write the series once, and hard-link it into four folders for the parallel senders."""
    files = write_series(make_ct_series(n_slices), root / "all")
    parts = [root / f"part{i}" for i in range(4)]
    for i, path in enumerate(sorted(files)):
        parts[i % 4].mkdir(exist_ok=True)
        os.link(path, parts[i % 4] / path.name)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    return [root / "all"], [p for p in parts if p.exists()], megabytes


def print_table(results: list[Result], repeat: int) -> None:
    head = f"{'receiver':<11}{'scenario':<9}{'sent':>6}{'stored':>8}{'wall s':>8}"
    print(f"\n{head}{'inst/s':>9}{'MB/s':>8}  durability  (median of {repeat})")
    for r in results:
        if r.error:
            print(f"{r.receiver:<11}{r.scenario:<9}{r.instances:>6}  ERROR: {r.error}")
            continue
        wall = statistics.median(r.wall_s)
        flag = "" if r.valid else "  INVALID: instances lost"
        print(
            f"{r.receiver:<11}{r.scenario:<9}{r.instances:>6}{min(r.stored):>8}{wall:>8.2f}"
            f"{r.instances_per_s:>9.1f}{r.megabytes / wall:>8.1f}  {r.durability}{flag}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the median is shown")
    parser.add_argument("--only", default=",".join(RECEIVERS), help="comma-separated receivers")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--ingest-processes",
        type=int,
        default=0,
        help="lungnode's ingest_processes (default 0: one per CPU core, as the node's default)",
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := set(names) - set(RECEIVERS):
        parser.error(f"unknown receivers {sorted(unknown)}; choose from {', '.join(RECEIVERS)}")
    for tool in ("storescu", "echoscu", *(["Orthanc"] if "orthanc" in names else [])):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on PATH")
    # SIGTERM takes the same path as Ctrl-C, so every finally block stops its processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-") as tmp:
        t0 = time.perf_counter()
        one, four, megabytes = make_folders(Path(tmp) / "series", args.slices)
        written_s = time.perf_counter() - t0
        print(f"{args.slices} slices, {megabytes:.1f} MB, written in {written_s:.1f} s")
        for name in names:
            for scenario, n_assoc in SCENARIOS.items():
                folders = one if n_assoc == 1 else four
                result = Result(name, scenario, args.slices, megabytes)
                results.append(result)
                work = Path(tmp) / f"{name}-{n_assoc}-0"
                try:
                    for k in range(args.repeat):
                        work = Path(tmp) / f"{name}-{n_assoc}-{k}"
                        with receiver(name, work, args.ingest_processes) as target:
                            result.durability = target.durability
                            result.wall_s.append(send(target, folders, work))
                            result.stored.append(stored_count(target, args.slices))
                        shutil.rmtree(work / "storage", ignore_errors=True)
                except (RuntimeError, OSError, sqlite3.Error, ValueError) as exc:
                    result.error = str(exc).strip().splitlines()[0][:200]
                    log = work / f"{name}.log"
                    print(f"{name} {scenario}: {exc}", file=sys.stderr)
                    if log.exists():
                        print(log.read_text(errors="replace")[-1500:], file=sys.stderr)
                print(f"  {name:<11}{scenario:<9}done", flush=True)

    print_table(results, args.repeat)
    failed = any(not r.valid for r in results)
    lungnode = {r.scenario: r for r in results if r.receiver == "lungnode"}
    if lungnode:
        print("\nlungnode requirements:")
        for scenario, floor in REQUIREMENTS.items():
            r = lungnode.get(scenario)
            ok = r is not None and r.valid and r.instances_per_s >= floor
            failed |= not ok
            what = "over one association" if scenario == "1 assoc" else "aggregate over 4"
            got = f"{r.instances_per_s:.1f}" if r and r.valid else "invalid"
            print(f"  >= {floor:.0f} instances/s {what:<22} {got:>8}  {'PASS' if ok else 'FAIL'}")
    if args.json:
        rows = [
            asdict(r) | {"instances_per_s": r.instances_per_s, "valid": r.valid} for r in results
        ]
        args.json.write_text(json.dumps({"slices": args.slices, "results": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
