"""Which result objects the node has written: the index that DICOMweb search reads.

A finished job records each object it wrote in its details (``outputs``: kind,
SOP Class UID, Series Instance UID, SOP Instance UID), and the series row holds
the source study. The file of each object is where the series job wrote it,
``<storage_dir>/results/<Study UID>/<Series UID>/<SOP UID>.dcm``. So the rows
are the truth of what exists, and no new table is needed: nothing here reads a
file, and nothing about the patient is stored in the database.

Every version of an analysis is listed: a superseded version's objects were
sent and stay valid DICOM objects of the study.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from lungnode.db.models import Job, JobState, Series

#: PS3.5 9.1: digits and dots, at most 64 characters; anything else never names a file.
_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


@dataclass(frozen=True)
class StoredResult:
    """One result object as the rows know it; ``path`` is absolute."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    job_id: int
    path: Path


def result_path(storage_dir: Path, study: str, series: str, sop: str) -> Path:
    """Where the series job writes a result object (``pipeline.series_job``)."""
    return storage_dir / "results" / study / series / f"{sop}.dcm"


def stored_results(
    session: Session, storage_dir: Path, studies: Collection[str] | None = None
) -> list[StoredResult]:
    """The result objects of every finished job, newest job first, each job's objects
    in the order it wrote them; only of ``studies`` when given.

    An object named twice (a re-run that recorded the same outputs) is listed once.
    """
    statement = (
        select(Series.study_instance_uid, Job.id, Job.details)
        .join(Job, Job.series_id == Series.id)
        .where(Job.state == JobState.DONE.value)
        .order_by(Job.id.desc())
    )
    if studies is not None:
        statement = statement.where(Series.study_instance_uid.in_(list(studies)))
    results: list[StoredResult] = []
    seen: set[str] = set()
    for study, job_id, details in session.execute(statement):
        for output in (details or {}).get("outputs") or []:
            if not isinstance(output, dict):
                continue
            series = str(output.get("series_instance_uid", ""))
            sop = str(output.get("sop_instance_uid", ""))
            sop_class = str(output.get("sop_class_uid", ""))
            if not all(_UID.match(uid) for uid in (study, series, sop, sop_class)):
                continue
            if sop in seen:
                continue
            seen.add(sop)
            results.append(
                StoredResult(
                    study_instance_uid=study,
                    series_instance_uid=series,
                    sop_instance_uid=sop,
                    sop_class_uid=sop_class,
                    kind=str(output.get("kind", "")),
                    job_id=job_id,
                    path=result_path(storage_dir, study, series, sop),
                )
            )
    return results
