"""``pipeline.spare_cpu``: pre-scoring asks whether the machine has CPU to spare."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from lungnode.pipeline.spare_cpu import SpareCpu, proc_stat_times
from tests.conftest import unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def spare(times: list[tuple[int, int]], own: list[float], **kwargs: object) -> list[bool]:
    """The answers of a SpareCpu on 2 CPUs, 100 ticks/s, one call every 0.2 s."""
    clock, readings, cpu = Clock(), iter(times), iter(own)
    check = SpareCpu(
        0.5, times=lambda: next(readings), cpus=2, own_cpu=lambda: next(cpu), clock=clock
    )
    check._ticks_per_s = 100
    answers = []
    for _ in times:
        answers.append(check())
        clock.now += 0.2
    return answers


def test_idle_cores_say_yes_busy_cores_say_no() -> None:
    # 0.2 s on 2 CPUs is 40 ticks. Idle ticks: 30 (1.5 cores), then 5 (0.25), then 10 (0.5).
    times = [(0, 0), (30, 40), (35, 80), (45, 120)]
    assert spare(times, [0.0] * 4) == [True, True, False, True]


def test_the_askers_own_cpu_counts_as_spare() -> None:
    # Nothing idle, but this thread itself used 0.1 s (10 ticks = 0.5 cores) of it.
    times = [(0, 0), (0, 40)]
    assert spare(times, [0.0, 0.1]) == [True, True]
    assert spare(times, [0.0, 0.05]) == [True, False]


def test_calls_closer_than_the_interval_repeat_the_last_answer() -> None:
    clock, readings = Clock(), iter([(0, 0), (0, 40), (40, 80)])
    check = SpareCpu(0.5, times=lambda: next(readings), cpus=2, own_cpu=lambda: 0.0, clock=clock)
    check._ticks_per_s = 100
    assert check() is True  # nothing known yet
    clock.now = 0.2
    assert check() is False  # busy
    clock.now = 0.25
    assert check() is False  # too soon to measure again: the last answer
    clock.now = 0.45
    assert check() is True


def test_without_proc_stat_there_is_always_cpu_to_spare() -> None:
    assert SpareCpu(times=lambda: None)() is True


def test_a_busy_machine_is_seen_busy_and_an_idle_one_idle() -> None:
    """The real /proc/stat: every CPU kept busy by other processes, then left idle."""
    if proc_stat_times() is None:
        unavailable("/proc/stat is Linux's")
    cpus = os.cpu_count() or 1
    check = SpareCpu(0.5)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        time.sleep(0.5)
        check()
        time.sleep(0.5)
        busy = check()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    time.sleep(0.3)
    check()
    time.sleep(0.5)
    assert busy is False
    assert check() is True
