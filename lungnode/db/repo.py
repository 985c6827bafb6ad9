"""The receiving side's rows: associations, instances, series completion, audit.

Each operation is one short transaction. The SCP threads, the completion timer
and the commands call these concurrently; every function opens its own session.
Nothing here knows DICOM networking or the completion rules: it stores and
returns plain facts. Completing a series queues its job in the same
transaction; the job rows from then on are :mod:`lungnode.db.jobs`.
Paths of stored instances go in relative to ``storage_dir`` and come out
absolute (``config.stored_path``, ``config.resolve_stored``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Integer,
    String,
    Table,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import resolve_stored, stored_path
from lungnode.db.driver_statements import execute
from lungnode.db.models import (
    AUDIT_TARGET_LENGTH,
    Association,
    AuditEvent,
    Instance,
    Job,
    Series,
    SeriesState,
)
from lungnode.db.session import read_sessions, write_connection, write_transaction
from lungnode.domain import InstanceFacts

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def _duplicate_sop_instance(exc: IntegrityError) -> bool:
    """Whether ``exc`` is the unique SOP Instance UID of an instance, violated.

    PostgreSQL names the constraint (``instance_sop_instance_uid_key``) in its
    diagnostics; SQLite's message names the column (``instance.sop_instance_uid``).
    A series created twice at once violates another constraint, and is retried.
    """
    diagnostics = getattr(exc.orig, "diag", None)
    constraint = getattr(diagnostics, "constraint_name", None)
    if constraint is not None:
        return str(constraint) == "instance_sop_instance_uid_key"
    return "instance.sop_instance_uid" in str(exc.orig)


@dataclass(frozen=True)
class SenderState:
    ended_at: datetime | None
    outcome: str | None


#: (instance id, position, orientation, number_of_frames) of one instance.
InstanceRow = tuple[int, list[float] | None, list[float] | None, int]


@dataclass(frozen=True)
class ReceivingSeries:
    """A series still receiving, with what the completion rules need."""

    series_id: int
    series_instance_uid: str
    declared_count: int | None
    last_received_at: datetime
    #: How many instances the series has.
    instance_count: int
    #: Its instances above the id the caller holds (``receiving_series``), in id order.
    geometry: list[InstanceRow]
    senders: list[SenderState]


# The ingest hot path runs plain Core statements on the tables: no ORM unit of
# work, and the compiled forms are cached.
_instance_table = cast(Table, Instance.__table__)
_series_table = cast(Table, Series.__table__)
_association_table = cast(Table, Association.__table__)
_INSERT_INSTANCE = insert(_instance_table)
_TOUCH_SERIES = (
    update(_series_table)
    .where(_series_table.c.id == bindparam("sid"))
    .values(
        last_received_at=bindparam("now"),
        declared_count=func.coalesce(
            bindparam("declared", type_=Integer), _series_table.c.declared_count
        ),
        calling_ae=func.coalesce(_series_table.c.calling_ae, bindparam("ae", type_=String)),
    )
)
_REOPEN_SERIES = (
    update(_series_table)
    .where(
        _series_table.c.id == bindparam("sid"),
        _series_table.c.state == SeriesState.COMPLETE.value,
    )
    .values(state=SeriesState.RECEIVING.value, completed_at=None)
)


def _geometry(session: Session, series_id: int, after_id: int | None) -> list[InstanceRow]:
    """(id, position, orientation, frames) of the series' instances, in id order:
    those above ``after_id``, or all of them when it is None."""
    query = select(
        Instance.id, Instance.position, Instance.orientation, Instance.number_of_frames
    ).where(Instance.series_id == series_id)
    if after_id is not None:
        query = query.where(Instance.id > after_id)
    return [
        (int(instance_id), position, orientation, int(frames))
        for instance_id, position, orientation, frames in session.execute(
            query.order_by(Instance.id)
        )
    ]


class NodeRepository:
    def __init__(self, sessions: sessionmaker[Session], storage_dir: Path) -> None:
        self.sessions = sessions
        #: Absolute; instance paths are kept relative to it.
        self.storage_dir = storage_dir
        self._read_sessions = read_sessions(sessions)
        self._series_ids: dict[str, int] = {}
        self._calling_aes: dict[int, str | None] = {}

    def _write(self) -> AbstractContextManager[Session]:
        return write_transaction(self.sessions)

    def _read(self) -> Session:
        return self._read_sessions()

    # -- associations ------------------------------------------------------------

    def association_started(self, calling_ae: str, peer_address: str | None) -> int:
        with self._write() as session:
            row = Association(calling_ae=calling_ae, peer_address=peer_address)
            session.add(row)
            session.flush()
            return row.id

    def association_ended(self, association_id: int, outcome: str) -> None:
        with self._write() as session:
            session.execute(
                update(Association)
                .where(Association.id == association_id, Association.ended_at.is_(None))
                .values(ended_at=_now(), outcome=outcome)
            )

    def close_interrupted_associations(self) -> int:
        """At start: associations a crash left open are over. Returns how many."""
        with self._write() as session:
            result = session.execute(
                update(Association)
                .where(Association.ended_at.is_(None))
                .values(ended_at=_now(), outcome="interrupted")
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    # -- instances ---------------------------------------------------------------

    def register_instance(
        self, facts: InstanceFacts, path: Path, size_bytes: int, association_id: int | None
    ) -> bool:
        """Record a stored instance. Returns False for a duplicate SOP Instance UID.

        Two statements in one short transaction: insert the instance, touch the
        series. Series ids and callers' AE titles are cached; ingest is the hot path.
        """
        for attempt in range(3):
            try:
                return self._register_instance(facts, path, size_bytes, association_id)
            except IntegrityError as exc:
                if _duplicate_sop_instance(exc):
                    return False  # duplicate SOP Instance UID: idempotent
                # Two associations created the same series at once, or a cached
                # series id went stale: forget the cache and try again.
                self._series_ids.pop(facts.series_instance_uid, None)
                if attempt == 2:
                    raise
        return False  # pragma: no cover

    def _series_id(
        self, connection: Connection, facts: InstanceFacts, calling_ae: str | None
    ) -> int:
        cached = self._series_ids.get(facts.series_instance_uid)
        if cached is not None:
            return cached
        series_id = connection.scalar(
            select(_series_table.c.id).where(
                _series_table.c.series_instance_uid == facts.series_instance_uid
            )
        )
        if series_id is None:
            inserted = connection.execute(
                insert(_series_table).values(
                    study_instance_uid=facts.study_instance_uid,
                    series_instance_uid=facts.series_instance_uid,
                    modality=facts.modality,
                    series_number=facts.series_number,
                    calling_ae=calling_ae,
                    first_received_at=_now(),
                )
            )
            series_id = int(inserted.inserted_primary_key[0])  # type: ignore[index]
        self._series_ids[facts.series_instance_uid] = series_id
        return int(series_id)

    def _calling_ae(self, connection: Connection, association_id: int | None) -> str | None:
        if association_id is None:
            return None
        if association_id not in self._calling_aes:
            self._calling_aes[association_id] = connection.scalar(
                select(_association_table.c.calling_ae).where(
                    _association_table.c.id == association_id
                )
            )
        return self._calling_aes[association_id]

    def _register_instance(
        self, facts: InstanceFacts, path: Path, size_bytes: int, association_id: int | None
    ) -> bool:
        now = _now()
        # Core, not the ORM: this runs once per received instance (write_connection).
        with write_connection(self.sessions) as connection:
            calling_ae = self._calling_ae(connection, association_id)
            series_id = self._series_id(connection, facts, calling_ae)
            # On SQLite these run on the driver's connection (``db.driver_statements``).
            execute(
                connection,
                _INSERT_INSTANCE,
                {
                    "series_id": series_id,
                    "association_id": association_id,
                    "sop_instance_uid": facts.sop_instance_uid,
                    "sop_class_uid": facts.sop_class_uid,
                    "transfer_syntax_uid": facts.transfer_syntax_uid,
                    "instance_number": facts.instance_number,
                    "number_of_frames": facts.number_of_frames,
                    "position": facts.position,
                    "orientation": facts.orientation,
                    "path": stored_path(path, self.storage_dir),
                    "size_bytes": size_bytes,
                    "received_at": now,
                },
            )
            execute(
                connection,
                _TOUCH_SERIES,
                {"sid": series_id, "now": now, "declared": facts.declared_count, "ae": calling_ae},
            )
            # Rule 4: a late instance reopens a complete series; its next completion
            # queues a new version of the analysis.
            reopened = execute(connection, _REOPEN_SERIES, {"sid": series_id})
            if reopened:
                logger.info("late instance reopens series %s", facts.series_instance_uid)
            return True

    def known_instance_paths(self) -> set[str]:
        """The absolute paths of the registered instances (as ``reconcile`` compares them)."""
        with self._read() as session:
            return {
                str(resolve_stored(stored, self.storage_dir))
                for stored in session.scalars(select(Instance.path))
            }

    def receiving_instances_after(
        self, after_id: int, limit: int = 256
    ) -> list[tuple[int, int, Path]]:
        """(instance id, series id, absolute path) of instances with an id above
        ``after_id`` whose series is still receiving, in id order: what the slice
        pre-scorer has not seen yet (``pipeline.prescore``)."""
        with self._read() as session:
            rows = session.execute(
                select(Instance.id, Instance.series_id, Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .where(Instance.id > after_id, Series.state == SeriesState.RECEIVING.value)
                .order_by(Instance.id)
                .limit(limit)
            ).all()
        return [
            (instance_id, series_id, resolve_stored(stored, self.storage_dir))
            for instance_id, series_id, stored in rows
        ]

    def newest_instance_id(self) -> int | None:
        """The id of the newest instance stored (ids only grow), None before the first:
        how fast instances arrive (``pipeline.intake_pace``)."""
        with self._read() as session:
            return session.scalar(select(func.max(Instance.id)))

    # -- completion ----------------------------------------------------------------

    def receiving_series(self, held: Mapping[int, int] | None = None) -> list[ReceivingSeries]:
        """The series still receiving, with what the completion rules need.

        ``held`` maps a series id to the highest instance id whose geometry the caller
        holds already: only the instances above it are read (decoding every
        instance's position twice a second was most of the completion timer's cost
        on a long series). The count of all of them comes from the same read, so
        that the caller can tell when what it holds is not the series any more (an
        instance below that id committed late, or one was removed) and read it
        afresh (:meth:`instance_geometry`).
        """
        held = held or {}
        with self._read() as session:
            rows = session.scalars(
                select(Series).where(Series.state == SeriesState.RECEIVING.value)
            ).all()
            result = []
            for series in rows:
                count = session.scalar(
                    select(func.count())
                    .select_from(Instance)
                    .where(Instance.series_id == series.id)
                )
                senders = [
                    SenderState(ended_at, outcome)
                    for ended_at, outcome in session.execute(
                        select(Association.ended_at, Association.outcome).where(
                            Association.id.in_(
                                select(Instance.association_id)
                                .where(Instance.series_id == series.id)
                                .distinct()
                            )
                        )
                    )
                ]
                result.append(
                    ReceivingSeries(
                        series.id,
                        series.series_instance_uid,
                        series.declared_count,
                        series.last_received_at,
                        int(count or 0),
                        _geometry(session, series.id, held.get(series.id)),
                        senders,
                    )
                )
            return result

    def instance_geometry(self, series_id: int) -> list[InstanceRow]:
        """Every instance of the series, as :meth:`receiving_series` gives them."""
        with self._read() as session:
            return _geometry(session, series_id, None)

    def complete_series(self, series_id: int, rule: str, reason: str) -> int | None:
        """Mark the series complete and queue the next analysis version, atomically.

        Returns the new job id, or None if the series changed meanwhile.
        """
        with self._write() as session:
            # Two receiving nodes may both find the series complete: the row lock
            # (FOR UPDATE on PostgreSQL; BEGIN IMMEDIATE serialises SQLite) makes
            # the second wait, then see it complete and queue nothing.
            series = session.get(Series, series_id, with_for_update=True)
            if series is None or series.state != SeriesState.RECEIVING:
                return None
            count = session.scalar(
                select(func.count()).select_from(Instance).where(Instance.series_id == series_id)
            )
            version = (
                session.scalar(select(func.max(Job.version)).where(Job.series_id == series_id)) or 0
            ) + 1
            series.state = SeriesState.COMPLETE.value
            series.completion_rule = rule
            series.completion_reason = reason
            series.completed_at = _now()
            job = Job(series_id=series_id, version=version, instance_count=int(count or 0))
            session.add(job)
            session.flush()
            logger.info(
                "series %s complete (%s: %s); job %d version %d queued",
                series.series_instance_uid,
                rule,
                reason,
                job.id,
                version,
            )
            return job.id

    # -- audit -----------------------------------------------------------------------

    def audit(
        self,
        actor: str,
        action: str,
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        limit = AUDIT_TARGET_LENGTH
        if target is not None and len(target) > limit:
            # PostgreSQL enforces the column's length (SQLite does not): the whole
            # target (a long list of ids) is kept in the details instead.
            details = {**(details or {}), "target": target}
            target = target[: limit - 1] + "…"
        with self._write() as session:
            session.add(AuditEvent(actor=actor, action=action, target=target, details=details))
