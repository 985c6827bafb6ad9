"""The completion timer: applies the series rules and queues jobs (embedded mode).

State lives in the database, so a restart re-derives everything: a series still
``receiving`` after a crash is judged again on the next tick. Its quiet timer
counts only time the node was running: while the node was down no sender could
send, so a series cut by a stop gets the whole quiet time again to be resent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from lungnode.db.repo import InstanceRow, NodeRepository, ReceivingSeries
from lungnode.series.assembler import (
    RULE_ASSOCIATION_RELEASED,
    CompletionRules,
    Decision,
    InstanceGeometry,
    SeriesSnapshot,
    decide,
)

logger = logging.getLogger(__name__)


def _geometry_of(row: InstanceRow) -> InstanceGeometry:
    """One instance's geometry as the assembler takes it."""
    _id, position, orientation, frames = row
    return InstanceGeometry(
        tuple(position) if position and len(position) == 3 else None,  # type: ignore[arg-type]
        tuple(orientation) if orientation and len(orientation) == 6 else None,  # type: ignore[arg-type]
        frames,
    )


def snapshot_of(series: ReceivingSeries, instances: list[InstanceGeometry]) -> SeriesSnapshot:
    """Turn database facts into the assembler's input, in seconds since the epoch."""
    ended = [s.ended_at for s in series.senders if s.ended_at is not None]
    return SeriesSnapshot(
        instances=instances,
        declared_count=series.declared_count,
        last_received_at=series.last_received_at.timestamp(),
        senders_open=any(s.ended_at is None for s in series.senders),
        senders_released=bool(series.senders)
        and all(s.outcome == "released" for s in series.senders),
        last_sender_ended_at=max(ended).timestamp() if ended else None,
    )


class CompletionWatcher:
    """Checks receiving series every tick, or at once when woken."""

    def __init__(
        self,
        repo: NodeRepository,
        rules: CompletionRules,
        on_job_queued: Callable[[int], None],
        interval: float = 0.5,
        on_settling: Callable[[int], None] | None = None,
    ) -> None:
        """``on_settling(series_id)`` is called once each time a series starts waiting
        out its grace (senders released, an even stack), and again if it changes."""
        self.repo = repo
        self.rules = rules
        self.on_job_queued = on_job_queued
        self.on_settling = on_settling
        self.interval = interval
        #: Per series: what it looked like when ``on_settling`` was last called.
        self._settling: dict[int, tuple[int, float | None]] = {}
        #: Per receiving series: the highest instance id read, and the geometry of
        #: its instances so far (each tick reads only the instances above that id).
        self._geometry: dict[int, tuple[int, list[InstanceGeometry]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_decisions: dict[str, Decision] = {}
        #: When this watcher started (epoch seconds); quiet time before it is not counted.
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = datetime.now(UTC).timestamp()
        self._thread = threading.Thread(target=self._run, name="series-completion", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval
            try:
                self.check_once()
                # Wake exactly when a grace period or quiet timer runs out, not up to
                # one interval later.
                due = [
                    d.recheck_in for d in self.last_decisions.values() if d.recheck_in is not None
                ]
                if due:
                    wait = max(0.01, min(wait, min(due)))
            except Exception:
                logger.exception("series completion check failed; retrying")
            self._wake.wait(wait)
            self._wake.clear()

    def check_once(self, now: float | None = None) -> list[int]:
        """One pass over the receiving series; returns the ids of queued jobs."""
        queued = []
        moment = datetime.now(UTC).timestamp() if now is None else now
        decisions: dict[str, Decision] = {}
        receiving = self.repo.receiving_series(
            {series_id: last for series_id, (last, _held) in self._geometry.items()}
        )
        for series in receiving:
            snapshot = snapshot_of(series, self._instances_of(series))
            if snapshot.last_received_at < self.started_at:
                snapshot = dataclasses.replace(snapshot, last_received_at=self.started_at)
            decision = decide(snapshot, moment, self.rules)
            decisions[series.series_instance_uid] = decision
            if not decision.complete or decision.rule is None:
                self._maybe_settling(series.series_id, snapshot, decision)
                continue
            self._settling.pop(series.series_id, None)
            job_id = self.repo.complete_series(series.series_id, decision.rule, decision.reason)
            if job_id is not None:
                queued.append(job_id)
                self.on_job_queued(job_id)
        self.last_decisions = decisions
        still = {series.series_id for series in receiving}
        for series_id in [s for s in self._settling if s not in still]:
            del self._settling[series_id]
        for series_id in [s for s in self._geometry if s not in still]:
            del self._geometry[series_id]
        return queued

    def _instances_of(self, series: ReceivingSeries) -> list[InstanceGeometry]:
        """The geometry of every instance of the series: what this watcher read before
        and what arrived since. When that does not add up to the series' count, an
        instance below the last id read committed late (several receiving processes)
        or one was removed, and the series is read afresh."""
        rows = series.geometry
        last, held = self._geometry.get(series.series_id, (None, []))
        instances = held + [_geometry_of(row) for row in rows]
        if len(instances) != series.instance_count:
            rows = self.repo.instance_geometry(series.series_id)
            instances = [_geometry_of(row) for row in rows]
            last = None
        if rows:
            last = rows[-1][0] if last is None else max(last, rows[-1][0])
        if last is not None:
            self._geometry[series.series_id] = (last, instances)
        return instances

    def _maybe_settling(self, series_id: int, snapshot: SeriesSnapshot, decision: Decision) -> None:
        if self.on_settling is None or decision.awaiting != RULE_ASSOCIATION_RELEASED:
            return
        state = (len(snapshot.instances), snapshot.last_sender_ended_at)
        if self._settling.get(series_id) == state:
            return
        self._settling[series_id] = state
        try:
            self.on_settling(series_id)
        except Exception:
            logger.exception("preparing series %d failed to start", series_id)
