"""``GET /stats``: totals, class distribution, per-day counts, mean time, queue depths.

Counts cover the predictions the caller may see (everything for an admin).

The prediction figures walk every visible row (about 35 ms for an admin and
100 ms for a radiologist over 100,000 rows on SQLite), so they are kept in the
API's cache (:mod:`lungnode.api.cache`) for ``stats_cache_seconds``. The key
holds the number of predictions and the newest one's id and time, lookups of
microseconds: a prediction written or deleted by any process (an upload, a
batch, a series job in a worker) changes the key, so a cached answer is never
older than the last write. Queue depths are read live at each request.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from apiflask import APIBlueprint
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from lungnode.api import context
from lungnode.api.auth import CurrentUser, roles, the_user
from lungnode.api.history import visible_to
from lungnode.api.schemas import HourlyOut, StatsOut, StatsQuery
from lungnode.db.models import Delivery, DeliveryState, Instance, Job, JobState, Prediction

stats_blueprint = APIBlueprint("stats", __name__, tag="history")


@stats_blueprint.get("/stats")
@roles()
@stats_blueprint.input(StatsQuery, location="query")
@stats_blueprint.output(StatsOut)
def stats(query_data: dict[str, Any]) -> dict[str, Any]:
    """Prediction statistics, and how many jobs and deliveries wait."""
    user = the_user()
    today = datetime.now(UTC).date()
    days = query_data["days"]
    cache = context.answer_cache()
    with context.reading() as session:
        # One read transaction: the figures cached belong to the key read first.
        key = f"stats:{_scope(user)}:{days}:{today.isoformat()}:{_fingerprint(session)}"
        figures = cache.get(key)
        if figures is None:
            figures = _prediction_figures(session, user, today, days)
            cache.put(key, figures)
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = dict(
            session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
        )
    return {
        **figures,
        "per_day": [
            {"date": date.fromisoformat(row["date"]), "count": row["count"]}
            for row in figures["per_day"]
        ],
        "queue": {
            "jobs": {state.value: int(jobs.get(state.value, 0)) for state in JobState},
            "deliveries": {
                state.value: int(deliveries.get(state.value, 0)) for state in DeliveryState
            },
        },
    }


#: How many hours ``/stats/hourly`` covers, the current one included.
HOURS = 24


@stats_blueprint.get("/stats/hourly")
@roles()
@stats_blueprint.output(HourlyOut)
def hourly() -> dict[str, Any]:
    """Instances received and series analysed per hour over the last 24 hours (UTC).

    Node-wide counts, like the queue depths of ``/stats``: no prediction is named.
    """
    now = datetime.now(UTC)
    current = now.replace(minute=0, second=0, microsecond=0)
    starts = [current - timedelta(hours=HOURS - 1 - i) for i in range(HOURS)]
    with context.reading() as session:
        instances = _per_hour(session, Instance.received_at, starts, [])
        analysed = _per_hour(session, Job.finished_at, starts, [Job.state == JobState.DONE.value])
    return {
        "hours": [
            {"hour": start, "instances_received": n, "series_analysed": m}
            for start, n, m in zip(starts, instances, analysed, strict=True)
        ]
    }


def _per_hour(session: Session, column: Any, starts: list[datetime], where: list[Any]) -> list[int]:
    """Rows whose ``column`` falls in each hour from ``starts``: one statement, one pass
    over the column's index range, on SQLite and PostgreSQL alike."""
    ends = [*starts[1:], starts[-1] + timedelta(hours=1)]
    counts = [
        func.count(case(((column >= start) & (column < end), 1)))
        for start, end in zip(starts, ends, strict=True)
    ]
    row = session.execute(
        select(*counts).where(*where, column >= starts[0], column < ends[-1])
    ).one()
    return [int(n or 0) for n in row]


def _scope(user: CurrentUser) -> str:
    """Whose view of the predictions: an admin sees all of them, anyone else a part."""
    return "all" if user.is_admin else f"user{user.id}"


def _fingerprint(session: Session) -> str:
    """Changes whenever a prediction is written or deleted.

    The count changes with a write or a delete. The newest id and time tell a
    delete followed by a write apart from neither: SQLite gives the next row
    the id of a deleted newest row, but not its time (every writer stamps
    its rows with the time of writing). Three statements: SQLite answers each
    from an index alone (microseconds), but not the three in one statement.
    """
    newest = session.scalar(select(func.max(Prediction.id)))
    latest = session.scalar(select(func.max(Prediction.timestamp)))
    count = session.scalar(select(func.count()).select_from(Prediction))
    return f"{newest or 0}.{count or 0}.{latest.isoformat() if latest else '-'}"


def _prediction_figures(
    session: Session, user: CurrentUser, today: date, days: int
) -> dict[str, Any]:
    """The figures over the visible predictions, JSON-ready (dates as ISO text)."""
    condition = visible_to(user)
    where = [condition] if condition is not None else []
    since = datetime.combine(today, datetime.min.time(), tzinfo=UTC) - timedelta(days=days - 1)
    day = func.date(Prediction.timestamp)
    total, mean_time = session.execute(
        select(func.count(), func.avg(Prediction.processing_time)).where(*where)
    ).one()
    by_source = dict(
        session.execute(
            select(Prediction.source, func.count()).where(*where).group_by(Prediction.source)
        ).all()
    )
    classes = dict(
        session.execute(
            select(Prediction.prediction_class, func.count())
            .where(*where, Prediction.prediction_class.is_not(None))
            .group_by(Prediction.prediction_class)
        ).all()
    )
    per_day = session.execute(
        select(day, func.count())
        .where(*where, Prediction.timestamp >= since)
        .group_by(day)
        .order_by(day)
    ).all()
    return {
        "total": int(total or 0),
        "by_source": {str(k): int(v) for k, v in by_source.items()},
        "class_distribution": {str(k): int(v) for k, v in classes.items()},
        "per_day": [{"date": _as_date(d).isoformat(), "count": int(n)} for d, n in per_day],
        "mean_processing_time": float(mean_time) if mean_time is not None else None,
    }


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])
