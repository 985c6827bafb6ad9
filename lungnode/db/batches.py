"""The items of ``/batch-predict``: created with the batch, claimed by whichever
process runs them (the API's own, or a Celery worker), and settled into the
batch's status.

The rows are the truth; a broker message only says "predict item N". Every
transition is a guarded update, so a second message for an item (a re-send by
``lungnode beat``, a redelivery after a crash) finds nothing to do:

- ``pending -> running``: :meth:`BatchItems.claim`, one more attempt, a lease;
- ``running -> done``: :meth:`BatchItems.record_done`, in the transaction that
  writes the prediction, guarded by the attempt: a worker whose lease ran out
  and whose item was given to another writes nothing;
- ``running -> failed``: the image was refused (not CT, unreadable), or the last
  attempt failed;
- ``running -> pending``: :meth:`BatchItems.release`, an attempt whose worker
  died or failed on a fault of the node, to be tried again.

The batch is ``pending`` until one of its items is claimed, ``running`` until
every item has ended, then ``done`` (all predicted), ``partial`` or ``failed``
(none). The last item to end settles it, holding the batch row's lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from lungnode.db.models import BatchItem, BatchItemState, BatchPrediction, BatchStatus
from lungnode.db.session import read_sessions, write_transaction
from lungnode.errors import ItemNotRunning

PENDING = BatchItemState.PENDING.value
RUNNING = BatchItemState.RUNNING.value
DONE = BatchItemState.DONE.value
FAILED = BatchItemState.FAILED.value


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class NewItem:
    """One image of a new batch: a stored upload, or the error that refused it."""

    position: int
    file_id: str | None
    kind: str | None = None
    #: Relative to ``storage_dir``.
    image_path: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClaimedItem:
    """A running attempt at one item, and what its prediction needs."""

    id: int
    batch_id: int
    attempt: int
    user_id: int | None
    file_id: str | None
    kind: str
    image_path: str
    study_instance_uid: str | None
    series_instance_uid: str | None


@dataclass(frozen=True)
class WaitingItem:
    id: int
    attempts: int
    #: When it last became pending: created, or released after a lost attempt.
    since: datetime


def error_of(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """An item's error, shaped as the API's error answers."""
    return {"code": code, "message": message, "details": details or {}}


class BatchItems:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._reads = read_sessions(sessions)

    def create(self, user_id: int, name: str, items: list[NewItem]) -> tuple[int, list[int]]:
        """A batch and its items; returns its id and the ids of the items to predict."""
        with write_transaction(self.sessions) as session:
            batch = BatchPrediction(
                user_id=user_id, batch_name=name, status=BatchStatus.PENDING.value
            )
            session.add(batch)
            session.flush()
            rows = [
                BatchItem(
                    batch_id=batch.id,
                    position=item.position,
                    file_id=item.file_id,
                    kind=item.kind,
                    image_path=item.image_path,
                    study_instance_uid=item.study_instance_uid,
                    series_instance_uid=item.series_instance_uid,
                    state=FAILED if item.error is not None else PENDING,
                    error=item.error,
                    updated_at=_now(),
                )
                for item in items
            ]
            session.add_all(rows)
            session.flush()
            pending = [row.id for row in rows if row.state == PENDING]
            if not pending:
                self._settle(session, batch.id)
            return batch.id, pending

    def claim(self, item_id: int, lease_seconds: float) -> ClaimedItem | None:
        """pending -> running, one more attempt; None when the item is not pending
        (done, failed, or another process runs it)."""
        now = _now()
        with write_transaction(self.sessions) as session:
            claimed = session.execute(
                update(BatchItem)
                .where(BatchItem.id == item_id, BatchItem.state == PENDING)
                .values(
                    state=RUNNING,
                    attempts=BatchItem.attempts + 1,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    updated_at=now,
                )
            )
            if not claimed.rowcount:  # type: ignore[attr-defined]
                return None
            row = session.execute(
                select(BatchItem, BatchPrediction.user_id)
                .join(BatchPrediction, BatchPrediction.id == BatchItem.batch_id)
                .where(BatchItem.id == item_id)
            ).one()
            item: BatchItem = row[0]
            session.execute(
                update(BatchPrediction)
                .where(
                    BatchPrediction.id == item.batch_id,
                    BatchPrediction.status == BatchStatus.PENDING.value,
                )
                .values(status=BatchStatus.RUNNING.value)
            )
            return ClaimedItem(
                item.id,
                item.batch_id,
                item.attempts,
                row[1],
                item.file_id,
                item.kind or "",
                item.image_path or "",
                item.study_instance_uid,
                item.series_instance_uid,
            )

    def record_done(self, session: Session, item: ClaimedItem, prediction_id: int) -> None:
        """running -> done with its prediction, in the caller's transaction (the one
        that writes the prediction). Raises ``ItemNotRunning`` when the attempt is no
        longer the item's: the caller's transaction must then roll back."""
        changed = session.execute(
            update(BatchItem)
            .where(
                BatchItem.id == item.id,
                BatchItem.state == RUNNING,
                BatchItem.attempts == item.attempt,
            )
            .values(
                state=DONE,
                prediction_id=prediction_id,
                error=None,
                lease_until=None,
                updated_at=_now(),
            )
        )
        if not changed.rowcount:  # type: ignore[attr-defined]
            raise ItemNotRunning(f"batch item {item.id} attempt {item.attempt} is over")
        self._settle(session, item.batch_id)

    def record_failed(self, item: ClaimedItem, error: dict[str, Any]) -> bool:
        """running -> failed for good (the image was refused); False when the attempt
        was no longer the item's."""
        return self._end_attempt(item.id, item.attempt, FAILED, error)

    def release(self, item_id: int, attempt: int, error: dict[str, Any], *, final: bool) -> bool:
        """An attempt that ended without a result (its worker died, or a fault of the
        node): pending again, or failed with ``error`` when it was the last one."""
        return self._end_attempt(item_id, attempt, FAILED if final else PENDING, error)

    def running_attempt(self, item_id: int) -> int | None:
        with self._reads() as session:
            return session.scalar(
                select(BatchItem.attempts).where(
                    BatchItem.id == item_id, BatchItem.state == RUNNING
                )
            )

    def waiting(self) -> list[WaitingItem]:
        """Pending items, oldest first: what ``lungnode beat`` makes sure is carried."""
        with self._reads() as session:
            rows = session.execute(
                select(BatchItem.id, BatchItem.attempts, BatchItem.updated_at)
                .where(BatchItem.state == PENDING)
                .order_by(BatchItem.id)
            ).all()
        return [WaitingItem(row.id, row.attempts, row.updated_at) for row in rows]

    def lost(self, now: datetime | None = None) -> list[tuple[int, int]]:
        """``(id, attempt)`` of running items whose lease has run out."""
        with self._reads() as session:
            rows = session.execute(
                select(BatchItem.id, BatchItem.attempts).where(
                    BatchItem.state == RUNNING, BatchItem.lease_until < (now or _now())
                )
            ).all()
        return [(row.id, row.attempts) for row in rows]

    def _end_attempt(
        self, item_id: int, attempt: int, state: str, error: dict[str, Any] | None
    ) -> bool:
        with write_transaction(self.sessions) as session:
            changed = session.execute(
                update(BatchItem)
                .where(
                    BatchItem.id == item_id,
                    BatchItem.state == RUNNING,
                    BatchItem.attempts == attempt,
                )
                .values(state=state, error=error, lease_until=None, updated_at=_now())
                .returning(BatchItem.batch_id)
            ).scalar()
            if changed is None:
                return False
            if state != PENDING:
                self._settle(session, changed)
            return True

    @staticmethod
    def _settle(session: Session, batch_id: int) -> None:
        """Once every item has ended, the batch's status says how. Holds the batch
        row's lock (PostgreSQL), so the last two items ending at once cannot both
        see the other still running."""
        # FOR NO KEY UPDATE: it does not wait on the key-share lock that inserting a
        # prediction (whose batch_id refers to this row) takes in the same transaction.
        session.execute(
            select(BatchPrediction.id)
            .where(BatchPrediction.id == batch_id)
            .with_for_update(key_share=True)
        )
        counts: dict[str, int] = {
            state: count
            for state, count in session.execute(
                select(BatchItem.state, func.count())
                .where(BatchItem.batch_id == batch_id)
                .group_by(BatchItem.state)
            )
        }
        if counts.get(PENDING) or counts.get(RUNNING):
            return
        done, total = counts.get(DONE, 0), sum(counts.values())
        status = (
            BatchStatus.DONE
            if done == total
            else BatchStatus.PARTIAL
            if done
            else BatchStatus.FAILED
        )
        session.execute(
            update(BatchPrediction)
            .where(BatchPrediction.id == batch_id)
            .values(status=status.value)
        )
