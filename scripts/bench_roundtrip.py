"""From the last slice received to every result object stored in the PACS: one command.

    python scripts/bench_roundtrip.py [--slices 300] [--repeat 3]

A real Orthanc is the PACS; ``lungnode serve`` runs as a subprocess with the
bundled model and its default completion rules. DCMTK ``storescu``, calling
with Orthanc's AE title, sends a fresh synthetic series (512×512, 16-bit,
with a lesion, no declared instance count, so the series completes by the
grace rule: sender released + 2 s) to lungnode, as Orthanc's auto-routing
would; the clock starts
when storescu exits (the last slice acknowledged) and stops when Orthanc holds
every result object of that study. A small series is sent first so that the
model is loaded before anything is timed. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lungnode.ml.phantoms import generate_volume  # noqa: E402
from tests.pacs import ORTHANC_AE, Orthanc, free_port  # noqa: E402
from tests.support.synthetic import make_ct_series, write_series  # noqa: E402

NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def write_lesion_series(directory: Path, slices: int, seed: int, declared: bool = False) -> str:
    volume, _mask = generate_volume(seed, "Adenocarcinoma", slices, 512)
    datasets = make_ct_series(
        slices, slice_hu=volume.__getitem__, seed=seed, declared_count=declared
    )
    write_series(datasets, directory)
    return str(datasets[0].StudyInstanceUID)


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


def results_in_orthanc(orthanc: Orthanc, study_uid: str, sources: int) -> int:
    found = orthanc.post("/tools/lookup", study_uid)
    if not found:
        return 0
    instances = orthanc.get(f"/studies/{found[0]['ID']}/instances")
    return len(instances) - sources


def send_and_time(
    orthanc: Orthanc, port: int, directory: Path, study_uid: str, slices: int, timeout: float
) -> float:
    subprocess.run(
        [
            "storescu",
            "-aet",
            ORTHANC_AE,
            "-aec",
            "LUNGNODE",
            "127.0.0.1",
            str(port),
            "+sd",
            str(directory),
        ],
        check=True,
        env=NODELAY,
        capture_output=True,
    )
    started = time.monotonic()
    # SC (one per key slice, at least one), PM, PDF, SR and KOS: at least 3 objects, then
    # the count must hold still for a moment (all key-slice images arrived).
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - started < timeout:
        count = results_in_orthanc(orthanc, study_uid, 0)
        if count != last:
            last, stable_since = count, time.monotonic()
            arrived = time.monotonic()
        elif count >= 3 and time.monotonic() - stable_since > 1.0:
            return arrived - started
        time.sleep(0.05)
    raise RuntimeError(f"results did not arrive within {timeout} s (have {last})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--declared-count",
        action="store_true",
        help="send ImagesInAcquisition, so completion is immediate (rule 1) instead of "
        "the sender-released grace rule (rule 2, the default here)",
    )
    args = parser.parse_args()
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        port = free_port()
        orthanc = Orthanc(
            "Orthanc", work / "orthanc", {"lungnode": ["LUNGNODE", "127.0.0.1", port]}
        )
        orthanc.start()
        env = {
            **os.environ,
            "LUNGNODE_CONFIG": str(work / "none.toml"),
            "LUNGNODE_STORAGE_DIR": str(work / "storage"),
            "LUNGNODE_DICOM_HOST": "127.0.0.1",
            "LUNGNODE_DICOM_PORT": str(port),
            "LUNGNODE_HTTP_PORT": str(free_port()),
            "LUNGNODE_PEERS": f"orthanc={ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}",
            "LUNGNODE_MODELS_DIR": str(ROOT / "models"),
            "LUNGNODE_MIN_FREE_DISK_MB": "0",
            "LUNGNODE_LOG_LEVEL": "WARNING",
            "LUNGNODE_ADMIN_PASSWORD": "benchmark-only",
        }
        with (work / "serve.log").open("wb") as log:
            node = subprocess.Popen(
                ["lungnode", "serve"],
                env=env,
                cwd=work,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                executable=str(Path(sys.executable).with_name("lungnode")),
            )
        try:
            wait_port(port, 90)
            warm = work / "warm"
            uid = write_lesion_series(warm, 8, seed=1)
            print("warming up (loads the model) ...", flush=True)
            send_and_time(orthanc, port, warm, uid, 8, args.timeout)
            times = []
            for run in range(args.repeat):
                directory = work / f"series-{run}"
                uid = write_lesion_series(directory, args.slices, 100 + run, args.declared_count)
                seconds = send_and_time(orthanc, port, directory, uid, args.slices, args.timeout)
                times.append(seconds)
                print(
                    f"run {run + 1}: last slice -> results in Orthanc {seconds:.2f} s", flush=True
                )
        finally:
            os.killpg(node.pid, signal.SIGTERM)
            node.wait(timeout=60)
            orthanc.stop()
    p50 = statistics.median(times)
    print(
        f"\n{args.slices} slices, {args.repeat} run(s): p50 {p50:.2f} s, "
        f"max {max(times):.2f} s (target p50 <= 5 s: {'PASS' if p50 <= 5 else 'FAIL'})"
    )
    return 0 if p50 <= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
