"""Measure DICOM ingest throughput of lungnode against real peers, in one run.

    python scripts/bench_ingest.py [--slices 300] [--repeat 1]
        [--only lungnode,lungnode-pynetdicom,orthanc,pynetdicom,dcmtk]
        [--ingest-processes N] [--json results.json]

``lungnode`` is the node as configured by default; ``lungnode-pynetdicom`` the
same node with ``store_receiver = "pynetdicom"`` (every association through
pynetdicom, as before the lean receiver), for an A/B in one run.

What is measured: a synthetic 512x512 16-bit CT series (Explicit VR Little
Endian, ``tests.support.synthetic``) is sent with DCMTK ``storescu`` (C++, so
the sender does not compete for the Python interpreter) to each receiver in
turn, over 127.0.0.1 only:

* ``1 assoc``: one storescu process, one association, all instances;
* ``4 assoc``: the files split into four folders, four storescu processes
  started together; the aggregate rate is instances / wall time of the slowest;
* ``1 Nagle``: as ``1 assoc``, from a sender that leaves Nagle's algorithm on
  (DCMTK's default, see "Nagle" below).

The fsync limit: at the start of every round and after the last, one thread
writes files of the same size the way a durable store must at the least (write
to a temporary name, fsync, rename, fsync the folder); its files/s is what one
association could reach if receiving cost nothing. The goals are ratios within
the run: lungnode at least 1.5x Orthanc on one association and on four, and at
least 50% of the fsync limit on four (the exit status is 1 when one is missed or
a run lost instances).

Wall time runs from storescu's start to its exit, so it includes association
set-up and storescu reading the files. Every receiver is started fresh, on
free ports and with empty storage, for every run; after each run the stored
instance count is checked against the number sent, and a run that lost
instances is marked invalid. With ``--repeat K`` the receivers run in K rounds
(each round every receiver and scenario once, the receivers' order rotated), so
that a machine's drift touches all of them alike, and the median wall time is
shown; the fsync limit is the median of its measurements.

How to read it: ``inst/s`` and ``MB/s`` (file bytes sent / wall time) per
receiver and scenario; ``CPU ms``: the CPU time the receiver's processes (its
whole process group) used during the send, per instance (lungnode's includes the
slice pre-scoring done meanwhile, and none of the analysis, which starts after);
``sys %``: the kernel's share of that CPU time (socket reads, page-cache writes,
fsyncs); ``sender``: the CPU time of the storescu senders, per instance; ``busy``:
how many cores the whole machine kept busy during the send (``/proc/stat``; of
``os.cpu_count()``). When ``busy`` is near the core count, the run measures who
needs the least CPU per instance, senders included, more than who waits least.
The receivers do not promise the same durability: lungnode fsyncs every
instance (file and directory) before it answers, and Orthanc does too when
``SyncStorageArea`` is on; the pynetdicom and DCMTK storescp apps only write
files (no fsync), so they are an upper bound for "just receive and write"
rather than a like-for-like peer. Each receiver runs
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
import urllib.error
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
RECEIVERS = ("lungnode", "lungnode-pynetdicom", "orthanc", "pynetdicom", "dcmtk")
#: name: (associations, whether the senders set TCP_NODELAY)
SCENARIOS = {"1 assoc": (1, True), "4 assoc": (4, True), "1 Nagle": (1, False)}
#: Goals, as ratios measured in one run: lungnode over Orthanc per scenario, and
#: lungnode over the one-thread fsync limit (docs/benchmarks.md).
GOAL_OVER_ORTHANC = 1.5
GOAL_OF_FSYNC_LIMIT = 0.5
STOP_TIMEOUT_S = 10.0
NODELAY_ENV = dict(os.environ) | {"TCP_NODELAY": "1"}  # see "Nagle" above
NAGLE_ENV = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}


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
    #: CPU seconds of the receiver's processes (all of its process group) over each send.
    cpu_s: list[float] = field(default_factory=list)
    #: The kernel's part of ``cpu_s``.
    sys_s: list[float] = field(default_factory=list)
    #: CPU seconds of the storescu senders over each send.
    sender_cpu_s: list[float] = field(default_factory=list)
    #: Cores busy on the whole machine over each send (``/proc/stat``), of ``os.cpu_count()``.
    busy_cores: list[float] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    durability: str = ""
    error: str = ""

    @property
    def valid(self) -> bool:
        return not self.error and bool(self.stored) and min(self.stored) == self.instances

    @property
    def instances_per_s(self) -> float:
        return self.instances / statistics.median(self.wall_s) if self.wall_s else 0.0

    @property
    def cpu_ms_per_instance(self) -> float:
        return statistics.median(self.cpu_s) / self.instances * 1000 if self.cpu_s else 0.0

    @property
    def sender_cpu_ms_per_instance(self) -> float:
        if not self.sender_cpu_s:
            return 0.0
        return statistics.median(self.sender_cpu_s) / self.instances * 1000

    @property
    def sys_percent(self) -> float:
        total = sum(self.cpu_s)
        return 100 * sum(self.sys_s) / total if total else 0.0


def group_cpu_seconds(group: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every process in process group ``group``, with
    the children they have reaped (Linux /proc; a forking server's finished children
    count, through the parent's cutime and cstime)."""
    user = system = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == group:  # pgrp
            user += int(fields[11]) + int(fields[13])  # utime, cutime
            system += int(fields[12]) + int(fields[14])  # stime, cstime
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def machine_ticks() -> tuple[int, int]:
    """(busy, all) ticks of every core so far, from the first line of /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def senders_cpu_seconds() -> float:
    """CPU seconds of the children this script has waited for (the storescu senders)."""
    times = os.times()
    return times.children_user + times.children_system


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


def wait_model_ready(health_url: str) -> None:
    deadline = time.monotonic() + 180.0
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 503 while a check fails
            body = json.loads(exc.read() or b"{}")
        except OSError:
            body = {}
        model = body.get("checks", {}).get("model", {})
        if model.get("state") in ("ready", "on_demand"):
            return
        if model.get("state") == "failed":
            raise RuntimeError(f"the node's model warm-up failed: {model}")
        time.sleep(0.5)
    raise RuntimeError("the node's model was not ready within 180 s")


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
    if name in ("lungnode", "lungnode-pynetdicom"):
        processes = ingest_processes or len(os.sched_getaffinity(0))
        # "lungnode-pynetdicom": the node with store_receiver = "pynetdicom" (A/B of the
        # lean receiver, docs/benchmarks.md); "lungnode": its default.
        receiver_setting = "pynetdicom" if name == "lungnode-pynetdicom" else None
        ae, durability = "LUNGNODE", f"fsync per instance, {processes} process(es)"
        if receiver_setting:
            durability += f", {receiver_setting} receiver"
        env = dict(os.environ) | {
            "LUNGNODE_ENV": "testing",
            "LUNGNODE_STORAGE_DIR": str(storage),
            "LUNGNODE_DICOM_HOST": HOST,
            "LUNGNODE_DICOM_PORT": str(port),
            "LUNGNODE_HTTP_PORT": str(api_port := free_port()),
            "LUNGNODE_PEERS": f"bench={CALLING_AE}@{HOST}:11119",
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_LOG_LEVEL": "WARNING",
            "LUNGNODE_MAX_ASSOCIATIONS": "8",
            "LUNGNODE_INGEST_PROCESSES": str(ingest_processes),
            **({"LUNGNODE_STORE_RECEIVER": receiver_setting} if receiver_setting else {}),
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
        if name.startswith("lungnode"):
            # Measure the node warm: its model warm-up (TensorFlow on every core for
            # some seconds after start) would otherwise compete with the first run.
            wait_model_ready(f"http://{HOST}:{api_port}/api/v1/health")
        if name == "orthanc":
            http_json(f"http://{HOST}:{http_port}/system")
        yield Receiver(name, ae, port, durability, count, process)
    finally:
        stop(process)


def fsync_limit(directory: Path, size: int, count: int) -> float:
    """Files/s of one thread doing what a durable store does at the least: write ``size``
    bytes to a temporary name, fsync, rename into place, fsync the folder."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(count):
        temporary, final = directory / f".{i}.part", directory / f"{i}.dcm"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, final)
        folder = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    rate = count / (time.perf_counter() - t0)
    shutil.rmtree(directory, ignore_errors=True)
    return rate


def send(target: Receiver, folders: list[Path], work: Path, nodelay: bool = True) -> float:
    """Run one storescu per folder, all at once; the wall time until the last one exits."""
    senders: list[subprocess.Popen[bytes]] = []
    t0 = time.perf_counter()
    try:
        for i, folder in enumerate(folders):
            argv = ["storescu", "-aet", CALLING_AE, "-aec", target.ae_title]
            argv += [HOST, str(target.port), "+sd", str(folder)]
            env = NODELAY_ENV if nodelay else NAGLE_ENV
            senders.append(start(argv, work / f"storescu-{i}.log", env))
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
    head += f"{'inst/s':>9}{'MB/s':>8}{'CPU ms':>8}{'sys %':>7}{'sender':>8}{'busy':>6}"
    print(f"\n{head}  durability  (median of {repeat})")
    for r in results:
        if r.error:
            print(f"{r.receiver:<11}{r.scenario:<9}{r.instances:>6}  ERROR: {r.error}")
            continue
        wall = statistics.median(r.wall_s)
        flag = "" if r.valid else "  INVALID: instances lost"
        print(
            f"{r.receiver:<11}{r.scenario:<9}{r.instances:>6}{min(r.stored):>8}{wall:>8.2f}"
            f"{r.instances_per_s:>9.1f}{r.megabytes / wall:>8.1f}{r.cpu_ms_per_instance:>8.2f}"
            f"{r.sys_percent:>7.0f}{r.sender_cpu_ms_per_instance:>8.2f}"
            f"{statistics.median(r.busy_cores) if r.busy_cores else 0.0:>6.2f}"
            f"  {r.durability}{flag}"
        )


def check_goals(results: list[Result], fsync_limit_rate: float) -> bool:
    """Print lungnode's ratios to Orthanc and to the fsync limit; True if all goals hold."""
    rates = {(r.receiver, r.scenario): r.instances_per_s for r in results if r.valid}
    if not any(receiver == "lungnode" for receiver, _ in rates):
        return True
    print("\nlungnode goals (ratios in this run):")
    ok = True
    for scenario in SCENARIOS:
        ours, theirs = rates.get(("lungnode", scenario)), rates.get(("orthanc", scenario))
        if ours is None or theirs is None:
            continue
        ratio = ours / theirs
        met = ratio >= GOAL_OVER_ORTHANC
        ok &= met or scenario == "1 Nagle"  # the Nagle case is reported, not a goal
        goal = f">= {GOAL_OVER_ORTHANC}x" if scenario != "1 Nagle" else "(reported)"
        print(
            f"  {scenario:<8} lungnode/Orthanc {ratio:5.2f}x  {goal:<11}"
            f"{'PASS' if met else 'FAIL' if scenario != '1 Nagle' else ''}"
        )
    for scenario in ("1 assoc", "4 assoc"):
        ours = rates.get(("lungnode", scenario))
        if ours is None:
            continue
        share = ours / fsync_limit_rate
        met = share >= GOAL_OF_FSYNC_LIMIT
        print(
            f"  {scenario:<8} of the fsync limit {share:5.0%}  >= {GOAL_OF_FSYNC_LIMIT:.0%}"
            f"       {'PASS' if met else 'FAIL'}"
        )
        if scenario == "4 assoc":
            ok &= met
    return ok


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

    results = {
        (name, scenario): Result(name, scenario, args.slices, 0.0)
        for name in names
        for scenario in SCENARIOS
    }
    limits: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-") as tmp:
        t0 = time.perf_counter()
        one, four, megabytes = make_folders(Path(tmp) / "series", args.slices)
        written_s = time.perf_counter() - t0
        print(f"{args.slices} slices, {megabytes:.1f} MB, written in {written_s:.1f} s")
        file_size = int(megabytes * 1e6 / args.slices)
        for k in range(args.repeat):
            # Rounds, not receiver after receiver: a shared machine's drift (the disk's
            # fsync rate moved by 2x within minutes) then touches every receiver alike.
            limits.append(fsync_limit(Path(tmp) / "fsync-limit", file_size, args.slices))
            print(f"round {k + 1}: fsync limit {limits[-1]:.1f} files/s", flush=True)
            for name in names[k % len(names) :] + names[: k % len(names)]:
                for scenario, (n_assoc, nodelay) in SCENARIOS.items():
                    result = results[(name, scenario)]
                    result.megabytes = megabytes
                    if result.error:
                        continue
                    work = Path(tmp) / f"{name}-{n_assoc}-{int(nodelay)}-{k}"
                    try:
                        with receiver(name, work, args.ingest_processes) as target:
                            result.durability = target.durability
                            folders = one if n_assoc == 1 else four
                            user, system = group_cpu_seconds(target.process.pid)
                            senders, ticks = senders_cpu_seconds(), machine_ticks()
                            result.wall_s.append(send(target, folders, work, nodelay))
                            user_after, system_after = group_cpu_seconds(target.process.pid)
                            busy = [b - a for a, b in zip(ticks, machine_ticks(), strict=True)]
                            result.sender_cpu_s.append(senders_cpu_seconds() - senders)
                            cores = os.cpu_count() or 1
                            result.busy_cores.append(busy[0] / max(busy[1], 1) * cores)
                            result.cpu_s.append(user_after - user + system_after - system)
                            result.sys_s.append(system_after - system)
                            result.stored.append(stored_count(target, args.slices))
                        shutil.rmtree(work / "storage", ignore_errors=True)
                    except (RuntimeError, OSError, sqlite3.Error, ValueError) as exc:
                        result.error = str(exc).strip().splitlines()[0][:200]
                        log = work / f"{name}.log"
                        print(f"{name} {scenario}: {exc}", file=sys.stderr)
                        if log.exists():
                            print(log.read_text(errors="replace")[-1500:], file=sys.stderr)
                    rate = args.slices / result.wall_s[-1] if result.wall_s else 0.0
                    print(f"  {name:<11}{scenario:<9}{rate:7.1f} inst/s", flush=True)
        limits.append(fsync_limit(Path(tmp) / "fsync-limit", file_size, args.slices))
    limit = statistics.median(limits)
    print_table(list(results.values()), args.repeat)
    print(
        f"\nfsync limit (one thread, {file_size // 1024} KB files): median {limit:.1f} files/s"
        f" of {', '.join(f'{x:.0f}' for x in limits)} (each round, and after)"
    )
    failed = any(not r.valid for r in results.values())
    failed |= not check_goals(list(results.values()), limit)
    if args.json:
        rows = [
            asdict(r) | {"instances_per_s": r.instances_per_s, "valid": r.valid}
            for r in results.values()
        ]
        summary = {"slices": args.slices, "fsync_limit_files_per_s": limits, "results": rows}
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
