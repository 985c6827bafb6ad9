"""The outbox's rows: one Delivery per result object per destination.

A delivery is ``pending`` until its destination acknowledged it (``done``) or
it failed for good (``dead``, the dead letters). Each attempt is recorded:
the count, the last status and error, and when the next attempt is due.
The path of a result object is kept relative to ``storage_dir`` and handed
out absolute.

Several outbox processes may share the database (the scaled roles). An outbox
sends only the deliveries it has *claimed* (:meth:`DeliveryRepository.claim_due`):
their next attempt is pushed to the end of a lease in the same transaction that
picks them, so no other outbox finds them due while they are sent; the outcome
then records the real next attempt. If the sender dies, the deliveries are due
again when the lease runs out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import resolve_stored
from lungnode.db.models import Delivery, DeliveryState
from lungnode.db.session import read_sessions, write_transaction


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DueDelivery:
    id: int
    destination: str
    sop_instance_uid: str
    #: Absolute: resolved against ``storage_dir``.
    path: str
    attempts: int


def _due_rows(moment: datetime, limit: int) -> Any:  # a Select of the five columns
    """Pending deliveries whose next attempt is due at ``moment``, oldest first."""
    return (
        select(
            Delivery.id,
            Delivery.destination,
            Delivery.sop_instance_uid,
            Delivery.path,
            Delivery.attempts,
        )
        .where(
            Delivery.state == DeliveryState.PENDING.value,
            Delivery.next_attempt_at <= moment,
        )
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    )


class DeliveryRepository:
    def __init__(self, sessions: sessionmaker[Session], storage_dir: Path) -> None:
        self.sessions = sessions
        self.storage_dir = storage_dir
        self._reads = read_sessions(sessions)

    def _due_delivery(self, row: Any) -> DueDelivery:
        return DueDelivery(
            row.id,
            row.destination,
            row.sop_instance_uid,
            str(resolve_stored(row.path, self.storage_dir)),
            row.attempts,
        )

    def due(self, now: datetime | None = None, limit: int = 500) -> list[DueDelivery]:
        """Pending deliveries whose next attempt is due, oldest first."""
        moment = now or _now()
        with self._reads() as session:
            rows = session.execute(_due_rows(moment, limit)).all()
        return [self._due_delivery(row) for row in rows]

    def claim_due(
        self,
        lease_seconds_each: float,
        *,
        now: datetime | None = None,
        limit: int = 500,
        skip_destinations: Collection[str] = (),
        only: Collection[int] | None = None,
    ) -> list[DueDelivery]:
        """Take the due deliveries (oldest first) for this sender, on a lease.

        The lease is ``lease_seconds_each`` per delivery of the largest batch for one
        destination, plus one, so it outlasts sending that batch one object at a time.
        On PostgreSQL the rows are picked ``FOR UPDATE SKIP LOCKED``: deliveries
        another outbox is claiming are passed over, not waited for. SQLite
        serialises writers (BEGIN IMMEDIATE), so its claims take turns. ``only``
        limits the claim to these delivery ids.
        """
        moment = now or _now()
        with write_transaction(self.sessions) as session:
            statement = _due_rows(moment, limit).with_for_update(skip_locked=True)
            if skip_destinations:
                statement = statement.where(Delivery.destination.not_in(skip_destinations))
            if only is not None:
                statement = statement.where(Delivery.id.in_(list(only)))
            rows = session.execute(statement).all()
            if not rows:
                return []
            per_destination = Counter(row.destination for row in rows)
            lease = lease_seconds_each * (max(per_destination.values()) + 1)
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_([row.id for row in rows]))
                .values(next_attempt_at=moment + timedelta(seconds=lease))
            )
        return [self._due_delivery(row) for row in rows]

    def release(self, delivery_ids: Collection[int]) -> None:
        """Give claimed deliveries back unsent: due again now, for any sender."""
        if not delivery_ids:
            return
        with write_transaction(self.sessions) as session:
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(list(delivery_ids)),
                    Delivery.state == DeliveryState.PENDING.value,
                )
                .values(next_attempt_at=_now())
            )

    def release_all(self) -> int:
        """Every pending delivery due now; the number made due.

        For a sender that knows it is the only one on its database (``serve``) at
        its start: deliveries that a crash or a stop left claimed would otherwise
        wait out their lease, and those waiting out a back-off are tried once at
        once (a restart is when an operator expects things to move).
        """
        moment = _now()
        with write_transaction(self.sessions) as session:
            result = session.execute(
                update(Delivery)
                .where(
                    Delivery.state == DeliveryState.PENDING.value,
                    Delivery.next_attempt_at > moment,
                )
                .values(next_attempt_at=moment)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def mark_done(self, delivery_id: int, status: int | None) -> None:
        with write_transaction(self.sessions) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    state=DeliveryState.DONE.value,
                    attempts=Delivery.attempts + 1,
                    last_status=status,
                    last_error=None,
                    updated_at=_now(),
                )
            )

    def mark_retry(
        self, delivery_id: int, status: int | None, error: str, delay_seconds: float
    ) -> None:
        with write_transaction(self.sessions) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    attempts=Delivery.attempts + 1,
                    last_status=status,
                    last_error=error,
                    next_attempt_at=_now() + timedelta(seconds=delay_seconds),
                    updated_at=_now(),
                )
            )

    def mark_dead(self, delivery_id: int, status: int | None, error: str) -> None:
        with write_transaction(self.sessions) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    state=DeliveryState.DEAD.value,
                    attempts=Delivery.attempts + 1,
                    last_status=status,
                    last_error=error,
                    updated_at=_now(),
                )
            )

    def dead_letters(self) -> list[Delivery]:
        with self._reads() as session:
            return list(
                session.scalars(
                    select(Delivery)
                    .where(Delivery.state == DeliveryState.DEAD.value)
                    .order_by(Delivery.updated_at.desc())
                )
            )

    def retry(self, delivery_ids: list[int] | None = None) -> int:
        """Put dead letters (all, or these ids) back to pending, due now."""
        with write_transaction(self.sessions) as session:
            statement = update(Delivery).where(Delivery.state == DeliveryState.DEAD.value)
            if delivery_ids is not None:
                statement = statement.where(Delivery.id.in_(delivery_ids))
            result = session.execute(
                statement.values(
                    state=DeliveryState.PENDING.value,
                    attempts=0,
                    next_attempt_at=_now(),
                    updated_at=_now(),
                )
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def claim(self, delivery_ids: Collection[int], lease_seconds_each: float) -> list[DueDelivery]:
        """Take these deliveries, those still pending and due, for one sender.

        The scaled roles' way (``lungnode beat`` names them in a broker message, a
        worker sends them): the claim of :meth:`claim_due`, limited to these ids, so
        a second message naming them (a re-send, or a redelivery) finds nothing due.
        """
        if not delivery_ids:
            return []
        return self.claim_due(lease_seconds_each, only=delivery_ids)
