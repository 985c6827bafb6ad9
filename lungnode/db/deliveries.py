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

With Storage Commitment (PS3.4 Annex J) a delivered object is ``sent``, not
``done``: :meth:`DeliveryRepository.mark_sent` records the transaction that
asks for it before the N-ACTION goes out, a report commits it or records why
not (:meth:`DeliveryRepository.apply_commitment_report`, idempotent: only a
``sent`` delivery of that transaction changes), and a failure or an overdue
report puts it back to ``pending`` or ``dead``
(:meth:`DeliveryRepository.commitment_failed`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
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
    #: What a commitment request names (PS3.4 J.3.2, Referenced SOP Sequence).
    sop_class_uid: str = ""


@dataclass(frozen=True)
class AwaitedCommitment:
    """A ``sent`` delivery whose commitment report failed it or is overdue."""

    id: int
    destination: str
    transaction_uid: str
    attempts: int
    #: The Failure Reason of a failed report, and what it meant; None: no report.
    last_status: int | None
    last_error: str | None


def _due_rows(moment: datetime, limit: int) -> Any:  # a Select of the six columns
    """Pending deliveries whose next attempt is due at ``moment``, oldest first."""
    return (
        select(
            Delivery.id,
            Delivery.destination,
            Delivery.sop_instance_uid,
            Delivery.path,
            Delivery.attempts,
            Delivery.sop_class_uid,
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
            row.sop_class_uid,
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

    # -- Storage Commitment (PS3.4 Annex J) ------------------------------------------

    def mark_sent(
        self,
        statuses: Mapping[int, int | None],
        transaction_uid: str,
        report_due_seconds: float,
    ) -> None:
        """Delivered (``statuses``: delivery id -> C-STORE status) and to be committed
        by ``transaction_uid``, whose report is due within ``report_due_seconds``.
        Written before the N-ACTION goes out: a crash after it loses nothing."""
        moment = _now()
        with write_transaction(self.sessions) as session:
            for delivery_id, status in statuses.items():
                session.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id)
                    .values(
                        state=DeliveryState.SENT.value,
                        attempts=Delivery.attempts + 1,
                        last_status=status,
                        last_error=None,
                        commit_transaction_uid=transaction_uid,
                        commit_due_at=moment + timedelta(seconds=report_due_seconds),
                        updated_at=moment,
                    )
                )

    def apply_commitment_report(
        self,
        transaction_uid: str,
        committed: Sequence[str],
        failed: Mapping[str, tuple[int | None, str]],
    ) -> bool:
        """Apply an N-EVENT-REPORT: committed SOP Instance UIDs become ``committed``;
        failed ones (UID -> Failure Reason and its meaning) are due for the retry
        policy at once. Only ``sent`` deliveries of this transaction change, so a
        report applied twice changes nothing more. False: no delivery was ever
        asked for by this transaction."""
        moment = _now()
        with write_transaction(self.sessions) as session:
            known = session.scalar(
                select(Delivery.id).where(Delivery.commit_transaction_uid == transaction_uid)
            )
            if known is None:
                return False
            awaiting = (
                Delivery.commit_transaction_uid == transaction_uid,
                Delivery.state == DeliveryState.SENT.value,
            )
            if committed:
                session.execute(
                    update(Delivery)
                    .where(*awaiting, Delivery.sop_instance_uid.in_(list(committed)))
                    .values(
                        state=DeliveryState.COMMITTED.value,
                        commit_due_at=None,
                        last_error=None,
                        updated_at=moment,
                    )
                )
            for sop_instance_uid, (reason, meaning) in failed.items():
                session.execute(
                    update(Delivery)
                    .where(*awaiting, Delivery.sop_instance_uid == sop_instance_uid)
                    .values(
                        last_status=reason,
                        last_error=f"storage commitment failed: {meaning}",
                        commit_due_at=moment,
                        updated_at=moment,
                    )
                )
            return True

    def awaited_commitments(
        self, now: datetime | None = None, limit: int = 500
    ) -> list[AwaitedCommitment]:
        """``sent`` deliveries whose report failed them or is overdue, oldest first."""
        moment = now or _now()
        with self._reads() as session:
            rows = session.execute(
                select(
                    Delivery.id,
                    Delivery.destination,
                    Delivery.commit_transaction_uid,
                    Delivery.attempts,
                    Delivery.last_status,
                    Delivery.last_error,
                )
                .where(
                    Delivery.state == DeliveryState.SENT.value,
                    Delivery.commit_due_at <= moment,
                )
                .order_by(Delivery.commit_due_at, Delivery.id)
                .limit(limit)
            ).all()
        return [
            AwaitedCommitment(
                row.id,
                row.destination,
                str(row.commit_transaction_uid or ""),
                row.attempts,
                row.last_status,
                row.last_error,
            )
            for row in rows
        ]

    def commitment_failed(
        self,
        delivery_id: int,
        transaction_uid: str,
        status: int | None,
        error: str,
        retry_in: float | None,
    ) -> bool:
        """A ``sent`` delivery of ``transaction_uid`` was not committed: ``pending``
        again in ``retry_in`` seconds (it is sent and asked for again), or ``dead``
        when None. The attempt was counted when it was sent. False when the delivery
        had moved on (committed meanwhile, or another transaction)."""
        moment = _now()
        values: dict[str, Any] = {
            "last_status": status,
            "last_error": error,
            "commit_due_at": None,
            "updated_at": moment,
        }
        if retry_in is None:
            values["state"] = DeliveryState.DEAD.value
        else:
            values["state"] = DeliveryState.PENDING.value
            values["next_attempt_at"] = moment + timedelta(seconds=retry_in)
        with write_transaction(self.sessions) as session:
            result = session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery_id,
                    Delivery.commit_transaction_uid == transaction_uid,
                    Delivery.state == DeliveryState.SENT.value,
                )
                .values(**values)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

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
