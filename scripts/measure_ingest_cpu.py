"""CPU time the receiving process spends per received instance, by storage receiver.

    python scripts/measure_ingest_cpu.py [--slices 150] [--receivers lean,pynetdicom]
        [--rounds 2] [--steps]

One Storage SCP (``dicom.scp.StorageSCP``) runs in this process with the node's
intake (file fsynced, folder fsynced, row committed on SQLite) on a temporary
folder; DCMTK ``storescu`` (another process, ``TCP_NODELAY=1``) sends a
synthetic 512x512 series over one association. The process's CPU time
(``time.process_time``, every thread) over the send, divided by the slices, is
what one instance costs the receiver, whatever the disk does; the wall rate is
printed too but depends on the fsyncs. Receivers alternate, ``--rounds`` times,
so that a shared machine's drift touches both alike.

``--steps`` also stores the same files once a round with no network, the steps of
``Intake.store`` one after the other in one thread, and prints the thread's CPU
time per instance in each: the header read (``read_instance``), the durable file
(created, written, fsynced, renamed into place, folder fsynced) and the instance
row. That is what an instance costs at the least, with nothing else running;
the difference to the receiver's figure is the network, the DIMSE messages and
whatever the process shares the machine with. (``--receivers ""`` measures the
steps alone; DCMTK is then not needed.)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lungnode.db.migrate import upgrade  # noqa: E402
from lungnode.db.repo import NodeRepository  # noqa: E402
from lungnode.db.session import make_engine, make_session_factory  # noqa: E402
from lungnode.dicom.intake import (  # noqa: E402
    Intake,
    instance_path,
    read_instance,
    write_atomically,
)
from lungnode.dicom.scp import SCPConfig, StorageSCP  # noqa: E402
from tests.support.synthetic import make_ct_series, write_series  # noqa: E402


def measure(receiver: str, series: Path, slices: int, work: Path) -> tuple[float, float]:
    """(CPU ms per instance, instances/s) of one send to a fresh SCP."""
    work.mkdir(parents=True)
    url = f"sqlite:///{work}/lungnode.db"
    upgrade(url)
    engine = make_engine(url)
    repo = NodeRepository(make_session_factory(engine), work)
    intake = Intake(work / "incoming", repo.register_instance)
    config = SCPConfig(
        ae_title="LUNGNODE",
        host="127.0.0.1",
        port=0,
        allowed_callers=None,
        store_receiver=receiver,
    )
    scp = StorageSCP(config, intake, repo)
    scp.start()
    try:
        command = ["storescu", "-aet", "BENCH", "-aec", "LUNGNODE", "127.0.0.1", str(scp.port)]
        environment = dict(os.environ, TCP_NODELAY="1")
        wall, cpu = time.perf_counter(), time.process_time()
        subprocess.run([*command, "+sd", str(series)], env=environment, check=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        scp.stop()
        engine.dispose()
    stored = len(list((work / "incoming").rglob("*.dcm")))
    if stored != slices:
        raise RuntimeError(f"{receiver}: {stored} of {slices} stored")
    return cpu / slices * 1000, slices / wall


def measure_steps(series: Path, work: Path) -> dict[str, float]:
    """CPU ms per instance of each intake step (header, file, row), in this thread."""
    work.mkdir(parents=True)
    url = f"sqlite:///{work}/lungnode.db"
    upgrade(url)
    engine = make_engine(url)
    repo = NodeRepository(make_session_factory(engine), work)
    association = repo.association_started("BENCH", None)
    payloads = [path.read_bytes() for path in sorted(series.iterdir())]
    spent = dict.fromkeys(("header", "file", "row"), 0.0)
    try:
        for encoded in payloads:
            started = time.thread_time()
            facts, _why_not_ct = read_instance(encoded)
            read = time.thread_time()
            path = instance_path(work / "incoming", facts)
            write_atomically(path, encoded)
            written = time.thread_time()
            repo.register_instance(facts, path, len(encoded), association)
            registered = time.thread_time()
            spent["header"] += read - started
            spent["file"] += written - read
            spent["row"] += registered - written
    finally:
        engine.dispose()
    return {step: seconds / len(payloads) * 1000 for step, seconds in spent.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--receivers", default="lean,pynetdicom")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--steps", action="store_true", help="also the intake's steps alone, with no network"
    )
    args = parser.parse_args()
    receivers = [name.strip() for name in args.receivers.split(",") if name.strip()]
    if receivers and shutil.which("storescu") is None:
        parser.error("storescu is not on PATH")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lungnode-cpu-") as tmp:
        series = Path(tmp) / "series"
        write_series(make_ct_series(args.slices, rows=512, columns=512), series)
        for round_number in range(args.rounds):
            for receiver in receivers:
                cpu_ms, rate = measure(
                    receiver, series, args.slices, Path(tmp) / f"{receiver}-{round_number}"
                )
                print(f"{receiver:<11} CPU {cpu_ms:5.2f} ms/instance  {rate:6.1f} inst/s")
            if args.steps:
                steps = measure_steps(series, Path(tmp) / f"steps-{round_number}")
                shown = "  ".join(f"{step} {ms:.3f}" for step, ms in steps.items())
                print(f"{'steps':<11} CPU {sum(steps.values()):5.2f} ms/instance  ({shown})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
