"""Node status for admins: series, jobs and deliveries (with retry), and peers."""

from __future__ import annotations

import logging
import math
from typing import Any

from apiflask import APIBlueprint
from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.errors import APIError
from lungnode.api.schemas import (
    DeliveryOut,
    DeliveryPage,
    DeliveryQuery,
    JobOut,
    JobPage,
    JobQuery,
    PeerList,
    SeriesPage,
    SeriesQuery,
    SettingsOut,
)
from lungnode.db.jobs import REQUEUE_FAILED_JOB
from lungnode.db.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Role,
    Series,
)
from lungnode.db.models import utcnow as _now

logger = logging.getLogger(__name__)

node_blueprint = APIBlueprint("node", __name__, tag="node")


def _page(session: Session, statement: Select[Any], query: dict[str, Any]) -> dict[str, Any]:
    page, per_page = query["page"], query["per_page"]
    total = int(session.scalar(select(func.count()).select_from(statement.subquery())) or 0)
    rows = session.execute(statement.limit(per_page).offset((page - 1) * per_page)).all()
    return {
        "rows": rows,
        "total": total,
        "page": page,
        "per_page": per_page,
        "pages": math.ceil(total / per_page),
    }


@node_blueprint.get("/series")
@roles(Role.ADMIN)
@node_blueprint.input(SeriesQuery, location="query")
@node_blueprint.output(SeriesPage)
def list_series(query_data: dict[str, Any]) -> dict[str, Any]:
    """Received series, newest first, with their completeness state and instance count."""
    count = (
        select(func.count())
        .where(Instance.series_id == Series.id)
        .correlate(Series)
        .scalar_subquery()
    )
    statement = select(Series, count).order_by(Series.last_received_at.desc(), Series.id.desc())
    if "state" in query_data:
        statement = statement.where(Series.state == query_data["state"])
    with context.reading() as session:
        result = _page(session, statement, query_data)
        items = []
        for series, instances in result.pop("rows"):
            item = {c: getattr(series, c) for c in _SERIES_FIELDS}
            item["instance_count"] = int(instances or 0)
            items.append(item)
    return {"items": items, **result}


_SERIES_FIELDS = (
    "id",
    "study_instance_uid",
    "series_instance_uid",
    "modality",
    "calling_ae",
    "state",
    "declared_count",
    "completion_rule",
    "completion_reason",
    "first_received_at",
    "last_received_at",
    "completed_at",
)


@node_blueprint.get("/jobs")
@roles(Role.ADMIN)
@node_blueprint.input(JobQuery, location="query")
@node_blueprint.output(JobPage)
def list_jobs(query_data: dict[str, Any]) -> dict[str, Any]:
    """Analysis jobs, newest first, with their attempts, when a queued one is next due
    (``next_attempt_at``, after a failed attempt) and the error of the last failed one."""
    statement = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if "state" in query_data:
        statement = statement.where(Job.state == query_data["state"])
    with context.reading() as session:
        result = _page(session, statement, query_data)
        return {"items": [row[0] for row in result.pop("rows")], **result}


@node_blueprint.post("/jobs/<int:job_id>/retry")
@roles(Role.ADMIN)
@node_blueprint.output(JobOut)
@node_blueprint.doc(responses={404: "No such job", 409: "Job is not failed"})
def retry_job(job_id: int) -> Job:
    """Run a failed job again: back to queued, due now, attempts counted afresh."""
    with context.writing() as session:
        changed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.FAILED.value)
            .values(**REQUEUE_FAILED_JOB)
        )
        job = session.get(Job, job_id)
        if job is None:
            raise APIError(404, "not_found", f"no job {job_id}")
        if not changed.rowcount:  # type: ignore[attr-defined]
            raise APIError(409, "conflict", f"job {job_id} is {job.state}, not failed")
        session.add(AuditEvent(actor=the_user().username, action="job.retry", target=str(job_id)))
        session.flush()
        session.refresh(job)
    logger.info("job %d queued again by user %d", job_id, the_user().id)
    return job


@node_blueprint.get("/deliveries")
@roles(Role.ADMIN)
@node_blueprint.input(DeliveryQuery, location="query")
@node_blueprint.output(DeliveryPage)
def list_deliveries(query_data: dict[str, Any]) -> dict[str, Any]:
    """Result deliveries (the outbox), newest first; ``state=dead`` lists the dead letters,
    ``job_id`` those of one job's results."""
    statement = select(Delivery).order_by(Delivery.created_at.desc(), Delivery.id.desc())
    if "state" in query_data:
        statement = statement.where(Delivery.state == query_data["state"])
    if "job_id" in query_data:
        statement = statement.where(Delivery.job_id == query_data["job_id"])
    with context.reading() as session:
        result = _page(session, statement, query_data)
        return {"items": [row[0] for row in result.pop("rows")], **result}


@node_blueprint.post("/deliveries/<int:delivery_id>/retry")
@roles(Role.ADMIN)
@node_blueprint.output(DeliveryOut)
@node_blueprint.doc(responses={404: "No such delivery", 409: "Delivery is not dead"})
def retry_delivery(delivery_id: int) -> Delivery:
    """Send a dead letter again: back to pending, due now, attempts counted afresh."""
    with context.writing() as session:
        changed = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.DEAD.value)
            .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=_now())
        )
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise APIError(404, "not_found", f"no delivery {delivery_id}")
        if not changed.rowcount:  # type: ignore[attr-defined]
            raise APIError(409, "conflict", f"delivery {delivery_id} is {delivery.state}, not dead")
        session.add(
            AuditEvent(actor=the_user().username, action="delivery.retry", target=str(delivery_id))
        )
        session.flush()
        session.refresh(delivery)
    logger.info("delivery %d queued again by user %d", delivery_id, the_user().id)
    return delivery


@node_blueprint.get("/peers")
@roles(Role.ADMIN)
@node_blueprint.output(PeerList)
def list_peers() -> dict[str, Any]:
    """The configured DICOM peers, which of them receive results, and which are
    asked for Storage Commitment."""
    settings = context.settings()
    destinations = set(settings.result_destinations)
    committing = set(settings.commit_peers)
    return {
        "items": [
            {
                "name": p.name,
                "ae_title": p.ae_title,
                "host": p.host,
                "port": p.port,
                "result_destination": p.name in destinations,
                "storage_commitment": p.name in committing,
            }
            for p in settings.peers
        ],
        "result_destinations": list(settings.result_destinations),
        "dicomweb_peers": [str(peer) for peer in settings.dicomweb_peers],
    }


@node_blueprint.get("/settings")
@roles(Role.ADMIN)
@node_blueprint.output(SettingsOut)
def effective_settings() -> dict[str, Any]:
    """Every setting the node runs with (defaults, config file and environment merged),
    as text: passwords, tokens, keys and the passwords in URLs masked."""
    return {"settings": context.settings().masked()}
