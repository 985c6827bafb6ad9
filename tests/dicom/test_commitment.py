"""Storage Commitment Push Model (PS3.4 Annex J) against real peers: Orthanc, which
reports on a new association it opens to the node's SCP, and a pynetdicom PACS
that reports on the requesting association."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from sqlalchemy import update

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.models import Delivery
from lungnode.dicom.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH_MODEL,
    new_transaction_uid,
)
from lungnode.dicom.scu import Destination, Outcome, SendResult, send_files
from tests.conftest import SENDER_AE, require_tool
from tests.dicom.helpers import wait_until
from tests.dicom.test_outbox import FakePACS, queue_files, rows
from tests.pacs import ORTHANC_AE, Orthanc, free_port
from tests.support.synthetic import make_ct_series, write_series

CT = "1.2.840.10008.5.1.4.1.1.2"


def peers_with(orthanc: Orthanc) -> str:
    """The test SCU (the node's default peer) and Orthanc, which receives results."""
    return f"scu={SENDER_AE}@127.0.0.1:11119,pacs={ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}"


@pytest.fixture
def result_files(tmp_path: Path) -> list[Path]:
    return write_series(make_ct_series(3, rows=32, columns=32), tmp_path / "results")


@pytest.fixture
def lungnode_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, lungnode_port: int) -> Iterator[Orthanc]:
    """Orthanc knows the node as a modality: where it opens its reports' associations."""
    server = Orthanc(
        require_tool("Orthanc"),
        tmp_path / "orthanc",
        {"lungnode": ["LUNGNODE", "127.0.0.1", lungnode_port]},
    )
    server.start()
    yield server
    server.stop()


def node_with_orthanc(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    orthanc: Orthanc,
    lungnode_port: int,
    **overrides: Any,
) -> Node:
    values: dict[str, Any] = {
        "dicom_port": lungnode_port,
        "peers": peers_with(orthanc),
        "commit_peers": "pacs",
        "delivery_check_interval": 0.1,
        "delivery_retry_base_seconds": 0.2,
        "delivery_retry_cap_seconds": 0.5,
        "commit_report_wait": 0.0,
    }
    values.update(overrides)
    return start_node(make_settings(**values), serve_http=False)


def deliveries_of(node: Node) -> DeliveryRepository:
    return node.outbox.deliveries


def settled(node: Node, states: set[str]) -> Callable[[], bool]:
    return lambda: {r.state for r in rows(deliveries_of(node))} <= states


@pytest.mark.parametrize("ingest_processes", [1, 2])
def test_orthanc_commits_what_it_received(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    orthanc: Orthanc,
    lungnode_port: int,
    result_files: list[Path],
    ingest_processes: int,
) -> None:
    """Sent, then committed by Orthanc's N-EVENT-REPORT (event type 1), which it sends
    on a new association to the node's SCP, taking the SCP role. With an ingest worker
    process, the node hands that first association to the worker, which writes the
    report to the database it shares."""
    node = node_with_orthanc(
        make_settings, start_node, orthanc, lungnode_port, ingest_processes=ingest_processes
    )
    queue_files(deliveries_of(node), result_files, ["pacs"])
    node.outbox.wake()
    assert wait_until(settled(node, {"committed"}), timeout=30), [
        (r.state, r.last_error) for r in rows(deliveries_of(node))
    ]
    found = rows(deliveries_of(node))
    assert {(r.attempts, r.commit_due_at) for r in found} == {(1, None)}
    (transaction_uid,) = {r.commit_transaction_uid for r in found}
    assert transaction_uid and transaction_uid.startswith("2.25.")
    assert orthanc.instance_uids() == {p.stem for p in result_files}


def _delete_from(orthanc: Orthanc) -> None:
    for orthanc_id in orthanc.get("/instances"):
        request = urllib.request.Request(f"{orthanc.url}/instances/{orthanc_id}", method="DELETE")
        urllib.request.urlopen(request, timeout=10).close()


def test_a_failed_commitment_is_sent_and_asked_again(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    orthanc: Orthanc,
    lungnode_port: int,
    result_files: list[Path],
) -> None:
    """Orthanc lost the objects between the C-STORE and the N-ACTION: its report lists
    them in the Failed SOP Sequence (0x0112); the retry sends them again and the
    second transaction commits them."""
    node = node_with_orthanc(make_settings, start_node, orthanc, lungnode_port)
    attempts: list[int] = []

    def send_then_lose(paths: list[Path], destination: Destination, **kw: Any) -> Any:
        results = send_files(paths, destination, **kw)
        attempts.append(len(paths))
        if len(attempts) == 1:
            _delete_from(orthanc)
        return results

    node.outbox.sender = send_then_lose
    queue_files(deliveries_of(node), result_files, ["pacs"])
    node.outbox.wake()
    assert wait_until(settled(node, {"committed"}), timeout=40), [
        (r.state, r.last_error) for r in rows(deliveries_of(node))
    ]
    found = rows(deliveries_of(node))
    # Each object sent twice; the retries may go in more than one batch (jitter).
    assert attempts[0] == len(result_files) and sum(attempts) == 2 * len(result_files)
    assert {r.attempts for r in found} == {2}
    assert orthanc.instance_uids() == {p.stem for p in result_files}


def test_an_instance_orthanc_never_had_is_dead_lettered_with_the_reason(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    orthanc: Orthanc,
    lungnode_port: int,
    result_files: list[Path],
) -> None:
    """A sender that says it delivered what never arrived: every report fails it
    (0x0112, no such object instance), and after the last attempt it is dead."""
    node = node_with_orthanc(
        make_settings, start_node, orthanc, lungnode_port, delivery_max_attempts=2
    )

    def lost(paths: list[Path], destination: Destination, **kw: Any) -> list[SendResult]:
        return [SendResult(path, 0x0000, Outcome.DELIVERED) for path in paths]

    node.outbox.sender = lost
    queue_files(deliveries_of(node), result_files[:2], ["pacs"])
    node.outbox.wake()
    assert wait_until(settled(node, {"dead"}), timeout=40), [
        (r.state, r.last_error) for r in rows(deliveries_of(node))
    ]
    for row in rows(deliveries_of(node)):
        assert row.attempts == 2 and row.last_status == 0x0112
        assert row.last_error == (
            "gave up after 2 attempts; last: storage commitment failed: "
            "0x0112 (no such object instance)"
        )
    assert orthanc.instance_uids() == set()


def test_commitment_off_leaves_deliveries_done(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    orthanc: Orthanc,
    lungnode_port: int,
    result_files: list[Path],
) -> None:
    node = node_with_orthanc(make_settings, start_node, orthanc, lungnode_port, commit_peers="")
    queue_files(deliveries_of(node), result_files, ["pacs"])
    node.outbox.wake()
    assert wait_until(settled(node, {"done"}), timeout=30)
    found = rows(deliveries_of(node))
    assert {(r.attempts, r.commit_transaction_uid, r.commit_due_at) for r in found} == {
        (1, None, None)
    }
    # Nor does the node's SCP take Storage Commitment reports then.
    assert not any(
        cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL for cx in node.scp.ae.supported_contexts
    )


def test_a_restart_asks_again_for_a_transaction_that_never_got_a_report(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    orthanc: Orthanc,
    lungnode_port: int,
    result_files: list[Path],
) -> None:
    """A crash right after the transaction was recorded (before or after the N-ACTION):
    the rows are ``sent``; once their report is overdue they are sent and asked again."""
    settings = make_settings(
        dicom_port=lungnode_port,
        peers=peers_with(orthanc),
        commit_peers="pacs",
        delivery_check_interval=0.1,
        commit_report_wait=0.0,
    )
    node = start_node(settings, serve_http=False)
    repo = deliveries_of(node)
    node.outbox.stop()  # what the crash left: rows only
    queue_files(repo, result_files, ["pacs"])
    lost_transaction = new_transaction_uid()
    repo.mark_sent({due.id: 0 for due in repo.due()}, lost_transaction, 60.0)
    assert {r.state for r in rows(repo)} == {"sent"}
    with repo.sessions.begin() as session:  # the hour passed while the node was down
        session.execute(update(Delivery).values(commit_due_at=datetime.now(UTC) - timedelta(1)))
    node.stop()
    restarted = start_node(settings, serve_http=False)
    assert wait_until(settled(restarted, {"committed"}), timeout=30), [
        (r.state, r.last_error) for r in rows(repo)
    ]
    found = rows(repo)
    assert {r.attempts for r in found} == {2}
    assert lost_transaction not in {r.commit_transaction_uid for r in found}


# -- the node's SCP, reported to by a pynetdicom PACS ----------------------------------


def report(
    port: int, transaction_uid: str, committed: list[str], failed: list[str]
) -> tuple[Dataset, bool]:
    """Open an association as a reporting PACS (SCP role by role selection), send one
    N-EVENT-REPORT, and return the response status and whether the role was taken."""
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE", ext_neg=[role])
    assert assoc.is_established
    information = Dataset()
    information.TransactionUID = transaction_uid
    information.ReferencedSOPSequence = [_item(uid) for uid in committed]
    if failed:
        information.FailedSOPSequence = [_item(uid, 0x0112) for uid in failed]
    try:
        (context,) = assoc.accepted_contexts
        status, _ = assoc.send_n_event_report(
            information,
            2 if failed else 1,
            STORAGE_COMMITMENT_PUSH_MODEL,
            STORAGE_COMMITMENT_INSTANCE,
        )
    finally:
        assoc.release()
    return status, bool(context.as_scp is True and context.as_scu is False)


def _item(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


def test_a_report_for_an_unknown_transaction_gets_a_failure(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    result_files: list[Path],
) -> None:
    node = start_node(
        make_settings(commit_peers="scu", delivery_check_interval=30), serve_http=False
    )
    repo = deliveries_of(node)
    queue_files(repo, result_files, ["scu"])
    known = new_transaction_uid()
    repo.mark_sent({due.id: 0 for due in repo.due()}, known, 600.0)
    uids = [p.stem for p in result_files]
    status, reporter_is_scp = report(node.scp.port, new_transaction_uid(), uids, [])
    assert reporter_is_scp  # the node granted the reporter the SCP role it proposed
    assert status.Status == 0x0115 and "unknown Transaction UID" in status.ErrorComment
    assert {r.state for r in rows(repo)} == {"sent"}
    # The known one, with a failure among them.
    status, _ = report(node.scp.port, known, uids[:2], uids[2:])
    assert status.Status == 0x0000
    by_uid = {r.sop_instance_uid: r for r in rows(repo)}
    assert [by_uid[u].state for u in uids] == ["committed", "committed", "sent"]
    assert by_uid[uids[2]].last_status == 0x0112
    # Applied again (a PACS that repeats its report): success, nothing changes.
    before = [(r.state, r.last_status, r.last_error) for r in rows(repo)]
    status, _ = report(node.scp.port, known, uids[:2], uids[2:])
    assert status.Status == 0x0000
    assert [(r.state, r.last_status, r.last_error) for r in rows(repo)] == before


class ReportingPACS:
    """A pynetdicom Storage SCP and Storage Commitment SCP that commits what it holds
    and reports on the requesting association, right after the N-ACTION response."""

    def __init__(self) -> None:
        self.ae = AE(ae_title="SAMEASSOC")
        self.ae.add_supported_context(CT)
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
        self.port = free_port()
        self.stored: set[str] = set()
        self.report_status: int | None = None

    def _on_store(self, event: evt.Event) -> int:
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        assoc = event.assoc

        def send_report() -> None:
            time.sleep(0.2)  # after our N-ACTION response has gone out
            information = Dataset()
            information.TransactionUID = request.TransactionUID
            information.ReferencedSOPSequence = [
                item
                for item in request.ReferencedSOPSequence
                if item.ReferencedSOPInstanceUID in self.stored
            ]
            status, _ = assoc.send_n_event_report(
                information, 1, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_INSTANCE
            )
            self.report_status = int(status.Status) if "Status" in status else None

        threading.Thread(target=send_report, daemon=True).start()
        return 0x0000, None

    def __enter__(self) -> ReportingPACS:
        self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)],
        )
        return self

    def __exit__(self, *args: object) -> None:
        self.ae.shutdown()


def test_a_report_on_the_requesting_association_commits(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    result_files: list[Path],
) -> None:
    with ReportingPACS() as pacs:
        node = start_node(
            make_settings(
                peers=f"scu={SENDER_AE}@127.0.0.1:11119,same=SAMEASSOC@127.0.0.1:{pacs.port}",
                commit_peers="same",
                commit_report_wait=5.0,
                delivery_check_interval=0.1,
            ),
            serve_http=False,
        )
        queue_files(deliveries_of(node), result_files, ["same"])
        node.outbox.wake()
        assert wait_until(settled(node, {"committed"}), timeout=20), [
            (r.state, r.last_error) for r in rows(deliveries_of(node))
        ]
        # The node records the commitment before its answer to the report reaches
        # the PACS's thread: wait for that answer while the association is up.
        assert wait_until(lambda: pacs.report_status is not None, timeout=10)
    assert pacs.report_status == 0x0000
    assert pacs.stored == {p.stem for p in result_files}


def test_a_destination_without_storage_commitment_is_dead_lettered_at_once(
    make_settings: Callable[..., Settings],
    start_node: Callable[..., Node],
    result_files: list[Path],
) -> None:
    """A PACS that stores but does not accept the Storage Commitment context: asking
    again would not help, so the deliveries are dead letters with the reason."""
    with FakePACS(0x0000) as pacs:
        node = start_node(
            make_settings(
                peers=f"scu={SENDER_AE}@127.0.0.1:11119,fake=FAKEPACS@127.0.0.1:{pacs.port}",
                commit_peers="fake",
                delivery_check_interval=0.1,
            ),
            serve_http=False,
        )
        queue_files(deliveries_of(node), result_files, ["fake"])
        node.outbox.wake()
        assert wait_until(settled(node, {"dead"}), timeout=20)
    assert len(pacs.received) == len(result_files)
    for row in rows(deliveries_of(node)):
        assert row.attempts == 1
        assert row.last_error == (
            "storage commitment request: no status: "
            "the destination does not accept Storage Commitment Push Model"
        )
