"""Memory that each DICOM association costs the process that receives it.

    python scripts/measure_association_memory.py [--associations 32] [--slices 4]

Starts ``lungnode serve`` on 127.0.0.1 with one receiving process
(``ingest_processes = 1``) and no analysis worker (``workers = 0``, so no
model is loaded and nothing but the receiver grows), then reads the resident
set size (``VmRSS`` in ``/proc/<pid>/status``) of that process:

* ``none``: after one association has come and gone (pynetdicom's lazy
  imports and the first database connections are then paid for);
* ``idle``: with K associations established at once, nothing sent yet;
* ``active``: the same K associations after each has stored ``--slices``
  512x512 CT instances (the handlers, intake and database have run on
  every one), still open;
* ``after``: once all K are released.

It also reports the CPU time the receiving process spends per second while
the K associations are idle.

The figure quoted next to ``max_associations`` in docs/configuration.md is
``(idle - none) / K`` and ``(active - none) / K``. Each RSS is the median of
five readings 0.2 s apart. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.association import Association  # noqa: E402
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]  # noqa: E402

from lungnode.dicom import reactor  # noqa: E402
from tests.support.synthetic import make_ct_series  # noqa: E402

HOST = "127.0.0.1"
CALLING_AE = "MEMORY"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Median of five VmRSS readings, in KiB."""
    readings = []
    for _ in range(5):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                readings.append(int(line.split()[1]))
        time.sleep(0.2)
    return int(statistics.median(readings))


def associate(port: int) -> Association:
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(HOST, port, ae_title="LUNGNODE")
    if not assoc.is_established:
        raise SystemExit("the node did not accept an association")
    return assoc


def _another_series(template: list[Dataset]) -> list[Dataset]:
    """The same pixels as a new series: new series and instance UIDs."""
    series_uid = generate_uid()
    copies = []
    for ds in template:
        copy = deepcopy(ds)
        copy.SeriesInstanceUID = series_uid
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(copy)
    return copies


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"lungnode serve exited ({process.returncode}):\n{log.read_text()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"lungnode serve did not listen:\n{log.read_text()}")


def measure(associations: int, slices: int, workdir: Path) -> dict[str, int]:
    port = free_port()
    env = {
        **os.environ,
        "LUNGNODE_CONFIG": str(workdir / "none.toml"),
        "LUNGNODE_ENV": "testing",
        "LUNGNODE_STORAGE_DIR": str(workdir / "storage"),
        "LUNGNODE_DICOM_HOST": HOST,
        "LUNGNODE_DICOM_PORT": str(port),
        "LUNGNODE_HTTP_PORT": str(free_port()),
        "LUNGNODE_PEERS": f"memory={CALLING_AE}@{HOST}:11119",
        "LUNGNODE_MIN_FREE_DISK_MB": "0",
        "LUNGNODE_LOG_LEVEL": "WARNING",
        "LUNGNODE_MAX_ASSOCIATIONS": str(associations),
        "LUNGNODE_INGEST_PROCESSES": "1",
        "LUNGNODE_WORKERS": "0",
        # Series stay open: no job, nothing but the receiver runs.
        "LUNGNODE_SERIES_QUIET_SECONDS": "3600",
        "LUNGNODE_SERIES_GRACE_SECONDS": "3600",
    }
    log = workdir / "serve.log"
    with log.open("wb") as stream:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("lungnode")), "serve"],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        template = make_ct_series(slices)
        series = [_another_series(template) for _ in range(associations + 1)]
        wait_listening(process, port, log)
        warm = associate(port)
        for ds in series[-1]:
            warm.send_c_store(ds)
        warm.release()
        time.sleep(1.0)
        figures = {"none": rss_kib(process.pid)}
        held = [associate(port) for _ in range(associations)]
        time.sleep(1.0)
        figures["idle"] = rss_kib(process.pid)
        # CPU the idle associations cost the receiver, per second of wall time.
        before = cpu_seconds(process.pid)
        time.sleep(5.0)
        figures["idle_cpu_ms_per_s"] = round((cpu_seconds(process.pid) - before) / 5.0 * 1000)
        for assoc, datasets in zip(held, series, strict=False):
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if int(status.get("Status", -1)) != 0:
                    raise SystemExit("a C-STORE failed")
        figures["active"] = rss_kib(process.pid)
        for assoc in held:
            assoc.release()
        time.sleep(1.0)
        figures["after"] = rss_kib(process.pid)
        return figures
    finally:
        process.terminate()
        process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=32)
    parser.add_argument("--slices", type=int, default=4)
    args = parser.parse_args()
    # This process holds K associations too: let their threads wait on events,
    # not poll every millisecond, so that they leave the CPU to the node.
    reactor.install()
    with tempfile.TemporaryDirectory(prefix="lungnode-memory-") as tmp:
        figures = measure(args.associations, args.slices, Path(tmp))
    k = args.associations
    print(f"| receiving process, {k} associations | RSS (MiB) | per association (KiB) |")
    print("|---|---:|---:|")
    for name in ("none", "idle", "active", "after"):
        per = (figures[name] - figures["none"]) / k
        print(f"| {name} | {figures[name] / 1024:.1f} | {per:.0f} |")
    idle_cpu = figures["idle_cpu_ms_per_s"]
    print(f"\nCPU of the receiving process with {k} idle associations: {idle_cpu} ms per second")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
