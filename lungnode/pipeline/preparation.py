"""The thread that prepares settling series (``SeriesJob.prepare``), one at a time.

While a released series waits out its grace (``pipeline.completion``), the embedded
node analyses and renders it here, so that its job only writes, records and sends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Preparations:
    """Runs ``SeriesJob.prepare`` for settling series on one daemon thread, one at a time.

    A series asked for again while it waits is prepared once.
    """

    def __init__(self, prepare: Callable[[int], bool]) -> None:
        self._prepare = prepare
        self._waiting: dict[int, None] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, series_id: int) -> None:
        with self._cond:
            self._waiting[series_id] = None
            self._cond.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="series-prepare", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                series_id = next(iter(self._waiting))
                del self._waiting[series_id]
            self._prepare(series_id)
