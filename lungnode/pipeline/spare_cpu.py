"""Whether the machine has CPU to spare: what speculative work asks before it runs.

Slice pre-scoring (``pipeline.prescore``) moves work that the series job would
do anyway to the time the series arrives. That only pays while the cores are
not all busy: on a node receiving at full speed (several associations, the
senders on the same cores) it takes CPU from intake, even at a lower priority
(``docs/benchmarks.md``, "DICOM ingest"). So the pre-scorer asks
:class:`SpareCpu` before each turn, and waits while fewer than
``needed_cores`` cores were idle over the last interval; the job scores what
it has not.

The measure is the kernel's: idle and I/O-wait time of all CPUs from
``/proc/stat`` between two calls, plus the CPU time the asking thread used
meanwhile (that would be idle if it had not run). Where ``/proc/stat`` cannot be
read (not Linux), there is always CPU to spare, as before. In a container whose
``/proc/stat`` is the host's, the answer is the host's: on a large host with
idle cores, pre-scoring runs as it did without this check.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

#: (idle ticks, all ticks) summed over every core, or None where unknown.
CpuTimes = Callable[[], "tuple[int, int] | None"]

_PROC_STAT = Path("/proc/stat")


def proc_stat_times() -> tuple[int, int] | None:
    """Idle (idle + iowait) and total ticks of the first line of /proc/stat."""
    try:
        with _PROC_STAT.open() as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    # counted in user already.
    ticks = [int(value) for value in fields[1:9]]
    return ticks[3] + ticks[4], sum(ticks)


class SpareCpu:
    """Call it: True when at least ``needed_cores`` cores were idle since the last call.

    Calls closer together than ``min_interval`` seconds get the previous answer,
    so that a loop may ask before each batch. ``cpus`` is how many CPUs the times
    sum over (the machine's); ``own_cpu`` is the asking thread's CPU time.
    """

    def __init__(
        self,
        needed_cores: float = 0.5,
        *,
        times: CpuTimes = proc_stat_times,
        cpus: int | None = None,
        own_cpu: Callable[[], float] = time.thread_time,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = 0.1,
    ) -> None:
        self.needed_cores = needed_cores
        self.times = times
        self.cpus = cpus or os.cpu_count() or 1
        self.own_cpu = own_cpu
        self.clock = clock
        self.min_interval = min_interval
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        #: (clock, own CPU time, CPU times) at the last measurement.
        self._last: tuple[float, float, tuple[int, int]] | None = None
        self._answer = True

    def __call__(self) -> bool:
        now, last = self.clock(), self._last
        if last is not None and now - last[0] < self.min_interval:
            return self._answer
        own, times = self.own_cpu(), self.times()
        if times is None:
            return True
        self._last = (now, own, times)
        if last is None:
            return self._answer
        idle, total = times[0] - last[2][0], times[1] - last[2][1]
        if total <= 0:
            return self._answer
        spare_ticks = idle + (own - last[1]) * self._ticks_per_s
        self._answer = spare_ticks / total * self.cpus >= self.needed_cores
        return self._answer
