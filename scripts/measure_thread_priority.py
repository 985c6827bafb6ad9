"""How long a thread waits for the interpreter lock beside a lower-priority thread.

    python scripts/measure_thread_priority.py [--seconds 8] [--modes none,nice5,nice10,nice19,idle]

Why lungnode's slice pre-scorer runs at nice +10 and no lower
(``pipeline.prescore.PRESCORE_NICENESS``): the thread shares the node's
interpreter lock with the API, the series jobs and the node's own
associations. While every core is busy with other processes (ingest workers,
senders), the scheduler runs a low-priority thread rarely; when it is taken off
the CPU holding the lock, every other thread of the process waits until it runs
again.

For each mode this script starts one busy process per core (normal priority),
runs a pure-Python loop on a thread of its own at that priority (``none``: the
process's; ``niceN``: nice N; ``idle``: SCHED_IDLE), and measures how late a
normal thread of the same process wakes from 5 ms sleeps, which is how long it
waited for the lock. Linux only. The numbers in the constant's comment come
from this script (2 cores, 2026-12-07).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

SLEEP_S = 0.005


def measure(mode: str, seconds: float) -> list[float]:
    """The lateness of each 5 ms sleep of a normal thread, in seconds."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(len(os.sched_getaffinity(0)))
    ]
    stop = threading.Event()

    def background() -> None:
        thread = threading.get_native_id()
        if mode == "idle":
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        elif mode.startswith("nice"):
            os.setpriority(os.PRIO_PROCESS, thread, int(mode[4:]))
        total = 0
        while not stop.is_set():
            for i in range(10_000):
                total += i

    worker = threading.Thread(target=background, daemon=True)
    worker.start()
    late: list[float] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            time.sleep(SLEEP_S)
            late.append(time.perf_counter() - started - SLEEP_S)
    finally:
        stop.set()
        for hog in hogs:
            hog.kill()
            hog.wait()
        worker.join()
    return sorted(late)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--modes", default="none,nice5,nice10,nice19,idle")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        parser.error("per-thread priorities are Linux's")
    print(f"{'mode':<8}{'sleeps':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for mode in args.modes.split(","):
        late = measure(mode.strip(), args.seconds)
        p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
        print(
            f"{mode:<8}{len(late):>8}{statistics.median(late) * 1000:>9.1f}"
            f"{p99 * 1000:>9.1f}{late[-1] * 1000:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
