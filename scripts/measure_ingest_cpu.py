"""CPU time the receiving process spends per received instance, by storage receiver.

    python scripts/measure_ingest_cpu.py [--slices 150] [--receivers lean,pynetdicom]
        [--rounds 2]

One Storage SCP (``dicom.scp.StorageSCP``) runs in this process with the node's
intake (file fsynced, folder fsynced, row committed on SQLite) on a temporary
folder; DCMTK ``storescu`` (another process, ``TCP_NODELAY=1``) sends a
synthetic 512x512 series over one association. The process's CPU time
(``time.process_time``, every thread) over the send, divided by the slices, is
what one instance costs the receiver, whatever the disk does; the wall rate is
printed too but depends on the fsyncs. Receivers alternate, ``--rounds`` times,
so that a shared machine's drift touches both alike.
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
from lungnode.dicom.intake import Intake  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--receivers", default="lean,pynetdicom")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        parser.error("storescu is not on PATH")
    logging.basicConfig(level=logging.WARNING)
    receivers = [name.strip() for name in args.receivers.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="lungnode-cpu-") as tmp:
        series = Path(tmp) / "series"
        write_series(make_ct_series(args.slices, rows=512, columns=512), series)
        for round_number in range(args.rounds):
            for receiver in receivers:
                cpu_ms, rate = measure(
                    receiver, series, args.slices, Path(tmp) / f"{receiver}-{round_number}"
                )
                print(f"{receiver:<11} CPU {cpu_ms:5.2f} ms/instance  {rate:6.1f} inst/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
