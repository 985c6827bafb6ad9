"""Whether instances are arriving at full speed: then speculative work waits.

Slice pre-scoring (``pipeline.prescore``) scores a series while it arrives, so
that a series with a declared count has its results sooner. On two cores, with
the sender on the same machine, it cost intake a third of its speed, although
it runs niced and asks :class:`~lungnode.pipeline.spare_cpu.SpareCpu` first
(``docs/benchmarks.md``, "eighth session": 366 against 538 instances/s on one
association, 502 against 633 on four, pre-scoring on against off, interleaved
rounds). A 300-slice series arrives in under a second, a few of the
pre-scorer's turns: the CPU check, averaged over a turn, cannot tell a burst
from a lull in time, and one core left idle does not make a second thread
harmless to the one that receives.

So the pre-scorer also asks :class:`IntakePace` before each batch, and waits
while instances arrive faster than ``busy_rate`` a second (100: a sender at
full speed delivers several hundred 512x512 CT slices a second here; a PACS
trickling a series in at a few dozen a second is not slowed by pre-scoring,
and it goes on). Once the burst ends, the pre-scorer catches up: with the grace
rule during the grace, with a declared count the job scores what is left (the
last slice to the results in the PACS took 0.74 s p50 without pre-scoring,
against 0.29 s with it; the goal is 1.0 s).

The pace is read from the newest instance's id (ids only grow), sampled at
most every ``min_interval`` seconds; between samples the last answer stands.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Instances a second above which intake is at full speed.
BUSY_RATE = 100.0


class IntakePace:
    """Call it: True while instances arrived faster than ``busy_rate`` a second.

    ``newest_id`` returns the id of the newest instance stored (None: none yet).
    The rate is the ids gained between two samples over the time between them.
    """

    def __init__(
        self,
        newest_id: Callable[[], int | None],
        busy_rate: float = BUSY_RATE,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = 0.05,
    ) -> None:
        self.newest_id = newest_id
        self.busy_rate = busy_rate
        self.clock = clock
        self.min_interval = min_interval
        #: (clock, newest id) of the last sample.
        self._last: tuple[float, int] | None = None
        self._busy = False

    def __call__(self) -> bool:
        now = self.clock()
        if self._last is not None and now - self._last[0] < self.min_interval:
            return self._busy
        newest = self.newest_id() or 0
        if self._last is not None:
            then, before = self._last
            # Fewer ids than before (the newest rows removed): nothing arrived.
            arrived = max(0, newest - before)
            self._busy = arrived / max(now - then, 1e-9) > self.busy_rate
        self._last = (now, newest)
        return self._busy
