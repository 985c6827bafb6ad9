"""Storage Commitment reports applied to the delivery rows (PS3.4 J.3.3): idempotent,
and only ever to the ``sent`` deliveries of the transaction the report names."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import Dataset

from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.migrate import upgrade
from lungnode.db.models import Delivery, Job, Series
from lungnode.db.session import make_engine, make_session_factory
from lungnode.dicom.commitment import (
    Reference,
    action_information,
    describe_failure,
    new_transaction_uid,
    parse_report,
)
from lungnode.pipeline.commitment import Commitments, CommitmentTerms
from lungnode.pipeline.outbox import RetryPolicy
from tests.conftest import Databases

CT = "1.2.840.10008.5.1.4.1.1.2"
UIDS = ["1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"]


@pytest.fixture
def repo(tmp_path: Path, databases: Databases) -> Iterator[DeliveryRepository]:
    url = databases.fresh()
    upgrade(url)
    engine = make_engine(url)
    repo = DeliveryRepository(make_session_factory(engine), tmp_path)
    with repo.sessions.begin() as session:
        series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, state="done")
        session.add(job)
        session.flush()
        for uid in UIDS:
            session.add(
                Delivery(
                    job_id=job.id,
                    destination="pacs",
                    sop_class_uid=CT,
                    sop_instance_uid=uid,
                    path=f"{uid}.dcm",
                )
            )
    yield repo
    engine.dispose()


def states(repo: DeliveryRepository) -> dict[str, tuple[str, int | None, str | None]]:
    with repo.sessions() as session:
        return {
            d.sop_instance_uid: (d.state, d.last_status, d.last_error)
            for d in session.query(Delivery)
        }


def sent(repo: DeliveryRepository) -> str:
    transaction_uid = new_transaction_uid()
    repo.mark_sent({due.id: 0 for due in repo.due()}, transaction_uid, 600.0)
    return transaction_uid


FAILED = {UIDS[2]: (0x0112, describe_failure(0x0112))}


def test_a_report_applied_twice_changes_nothing_more(repo: DeliveryRepository) -> None:
    transaction_uid = sent(repo)
    assert repo.apply_commitment_report(transaction_uid, UIDS[:2], FAILED)
    first = states(repo)
    assert first == {
        UIDS[0]: ("committed", 0, None),
        UIDS[1]: ("committed", 0, None),
        UIDS[2]: ("sent", 0x0112, "storage commitment failed: 0x0112 (no such object instance)"),
    }
    assert repo.apply_commitment_report(transaction_uid, UIDS[:2], FAILED)
    assert states(repo) == first
    # A contradicting duplicate neither un-commits nor commits a failed one.
    assert repo.apply_commitment_report(transaction_uid, [UIDS[2]], {UIDS[0]: (0x0110, "x")})
    assert states(repo)[UIDS[0]] == first[UIDS[0]]


def test_an_unknown_transaction_changes_nothing(repo: DeliveryRepository) -> None:
    sent(repo)
    before = states(repo)
    assert not repo.apply_commitment_report(new_transaction_uid(), UIDS, {})
    assert states(repo) == before


def test_failures_and_overdue_reports_follow_the_retry_policy(repo: DeliveryRepository) -> None:
    policy = RetryPolicy(base_seconds=60.0, cap_seconds=600.0, max_attempts=2)
    commitments = Commitments(repo, policy, CommitmentTerms(report_timeout=600.0), "LUNGNODE")
    transaction_uid = sent(repo)
    repo.apply_commitment_report(transaction_uid, [UIDS[0]], FAILED)
    assert commitments.expire() == 1  # the failed one at once; UIDS[1] is not overdue yet
    assert states(repo)[UIDS[2]][0] == "pending"
    assert repo.due() == []  # waiting out its back-off
    # A report repeated after the retry was scheduled: the transaction is known, the
    # delivery has moved on, nothing changes.
    assert repo.apply_commitment_report(transaction_uid, [UIDS[2]], {})
    assert states(repo)[UIDS[2]][0] == "pending"
    # UIDS[1] never got a report: overdue an hour later, it is retried with the reason.
    later = datetime.now(UTC) + timedelta(hours=1)
    assert commitments.expire(later) == 1
    assert states(repo)[UIDS[1]] == (
        "pending",
        0,
        "no storage commitment report within 600 s",
    )
    # Sent again (second attempt) and failed again: the last attempt, so dead.
    second = new_transaction_uid()
    repo.mark_sent({due.id: 0 for due in repo.due(later)}, second, 600.0)
    repo.apply_commitment_report(second, [], {UIDS[1]: FAILED[UIDS[2]], UIDS[2]: FAILED[UIDS[2]]})
    assert commitments.expire() == 2
    final = states(repo)
    assert final[UIDS[0]][0] == "committed"
    for uid in UIDS[1:]:
        assert final[uid][0] == "dead"
        assert final[uid][2] == (
            "gave up after 2 attempts; last: storage commitment failed: "
            "0x0112 (no such object instance)"
        )


def test_the_request_and_the_report_read_as_the_standard_writes_them() -> None:
    information = action_information("2.25.1", [Reference(CT, UIDS[0])])
    assert information.TransactionUID == "2.25.1"
    assert [i.ReferencedSOPInstanceUID for i in information.ReferencedSOPSequence] == [UIDS[0]]
    with pytest.raises(ValueError, match="at least one"):
        action_information("2.25.1", [])
    report = Dataset()
    report.TransactionUID = "2.25.1"
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = UIDS[1]
    item.FailureReason = 0x0112
    report.FailedSOPSequence = [item]
    parsed = parse_report(2, report)
    assert (parsed.committed, dict(parsed.failed)) == ((), {UIDS[1]: 0x0112})
    with pytest.raises(ValueError, match="event type"):
        parse_report(3, report)
    del report.FailedSOPSequence
    with pytest.raises(ValueError, match="Failed SOP Sequence"):
        parse_report(2, report)
    with pytest.raises(ValueError, match="Transaction UID"):
        parse_report(1, Dataset())
