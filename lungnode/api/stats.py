"""``GET /stats``: totals, class distribution, per-day counts, mean time, queue depths.

Counts cover the predictions the caller may see (everything for an admin).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from apiflask import APIBlueprint
from sqlalchemy import func, select

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.history import visible_to
from lungnode.api.schemas import StatsOut, StatsQuery
from lungnode.db.models import Delivery, DeliveryState, Job, JobState, Prediction

stats_blueprint = APIBlueprint("stats", __name__, tag="history")


@stats_blueprint.get("/stats")
@roles()
@stats_blueprint.input(StatsQuery, location="query")
@stats_blueprint.output(StatsOut)
def stats(query_data: dict[str, Any]) -> dict[str, Any]:
    """Prediction statistics, and how many jobs and deliveries wait."""
    condition = visible_to(the_user())
    where = [condition] if condition is not None else []
    since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=query_data["days"] - 1
    )
    day = func.date(Prediction.timestamp)
    with context.reading() as session:
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
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = dict(
            session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
        )
    return {
        "total": int(total or 0),
        "by_source": {str(k): int(v) for k, v in by_source.items()},
        "class_distribution": {str(k): int(v) for k, v in classes.items()},
        "per_day": [{"date": _as_date(d), "count": int(n)} for d, n in per_day],
        "mean_processing_time": float(mean_time) if mean_time is not None else None,
        "queue": {
            "jobs": {state.value: int(jobs.get(state.value, 0)) for state in JobState},
            "deliveries": {
                state.value: int(deliveries.get(state.value, 0)) for state in DeliveryState
            },
        },
    }


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])
