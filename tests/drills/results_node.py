"""What the crash and outage drills share: a served node that sends its results to
Orthanc, and the facts about one series read from the node's database and from
Orthanc."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import SENDER_AE, Databases
from tests.dicom.helpers import free_port
from tests.pacs import ORTHANC_AE, Orthanc
from tests.serve import ServedNode

#: Result objects by SOP class (docs/conformance.md 2.5).
KINDS = {
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.104.1": "PDF",
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.30": "PM",
    "1.2.840.10008.5.1.4.1.1.88.59": "KOS",
}


def kind(sop_class_uid: str) -> str:
    return KINDS.get(sop_class_uid, sop_class_uid)


def kinds_text(counts: Counter[str]) -> str:
    """``SC 2 / PDF 1 / SR 1 / PM 1 / KOS 1``."""
    names = [*dict.fromkeys(KINDS.values()), *sorted(set(counts) - set(KINDS.values()))]
    return " / ".join(f"{name} {counts[name]}" for name in names)


def results_node(
    serve_node: Callable[..., ServedNode],
    storage: Path,
    databases: Databases,
    orthanc_port: int,
    **settings: str,
) -> ServedNode:
    """A node that receives from the tests' SCU and sends every result to Orthanc
    (peer ``orthanc``) at ``orthanc_port``, retrying fast."""
    values = {
        "result_destinations": "orthanc",
        "delivery_retry_base_seconds": "0.5",
        "delivery_retry_cap_seconds": "2",
        "delivery_check_interval": "0.2",
        "delivery_timeout": "10",
        "job_check_interval": "0.2",
        **settings,
    }
    return serve_node(
        storage=storage,
        databases=databases,
        peers=(
            f"scu={SENDER_AE}@127.0.0.1:{free_port()},orthanc={ORTHANC_AE}@127.0.0.1:{orthanc_port}"
        ),
        **values,
    )


@dataclass
class SeriesFacts:
    """One source series as the node's database and Orthanc have it."""

    instances: set[str] = field(default_factory=set)
    #: (state, version) of each job, oldest first.
    jobs: list[tuple[str, int]] = field(default_factory=list)
    predictions: int = 0
    #: (state, SOP Instance UID, kind) of each delivery.
    deliveries: list[tuple[str, str, str]] = field(default_factory=list)
    #: SOP Instance UID -> kind of each result object Orthanc holds in the study.
    in_orthanc: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """One job, done, and every delivery done."""
        return (
            [state for state, _ in self.jobs] == ["done"]
            and bool(self.deliveries)
            and all(state == "done" for state, _, _ in self.deliveries)
        )

    def delivered_kinds(self) -> Counter[str]:
        return Counter(self.in_orthanc.values())


def series_facts(
    node: ServedNode, study_uid: str, series_uid: str, orthanc: Orthanc | None
) -> SeriesFacts:
    facts = SeriesFacts()
    facts.instances = {
        str(uid)
        for (uid,) in node.query(
            "SELECT instance.sop_instance_uid FROM instance "
            "JOIN series ON series.id = instance.series_id "
            "WHERE series.series_instance_uid = :uid",
            uid=series_uid,
        )
    }
    facts.jobs = [
        (str(state), int(version))
        for state, version in node.query(
            "SELECT job.state, job.version FROM job JOIN series ON series.id = job.series_id "
            "WHERE series.series_instance_uid = :uid ORDER BY job.id",
            uid=series_uid,
        )
    ]
    facts.predictions = int(
        node.query(
            "SELECT COUNT(*) FROM prediction WHERE series_instance_uid = :uid", uid=series_uid
        )[0][0]
    )
    facts.deliveries = [
        (str(state), str(uid), kind(str(sop_class)))
        for state, uid, sop_class in node.query(
            "SELECT delivery.state, delivery.sop_instance_uid, delivery.sop_class_uid "
            "FROM delivery JOIN job ON job.id = delivery.job_id "
            "JOIN series ON series.id = job.series_id "
            "WHERE series.series_instance_uid = :uid ORDER BY delivery.id",
            uid=series_uid,
        )
    ]
    if orthanc is not None:
        facts.in_orthanc = {
            uid: kind(sop_class) for uid, sop_class in orthanc.study_objects(study_uid).items()
        }
    return facts
