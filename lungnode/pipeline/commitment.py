"""Storage Commitment of delivered results (PS3.4 Annex J), for the destinations
that ask for it: from ``sent`` to ``committed``, or back to the retry policy.

After the outbox has sent a destination's objects, :meth:`Commitments.request`
records a fresh Transaction UID on their rows (``sent``, the report due within
``report_timeout``) and only then sends the N-ACTION
(:func:`lungnode.dicom.commitment.request_commitment`). The destination's
N-EVENT-REPORT is applied to the rows by whichever process receives it (the
node's SCP, or the requesting association): it only writes to the database.

Whatever did not end ``committed`` is retried like a failed send, with the
outbox's back-off and attempts (:meth:`Commitments.expire`, every outbox pass
and every ``beat`` tick): a refused N-ACTION at once, a failed reference
(Failed SOP Sequence) as soon as the report is recorded, a report that never
came once it is overdue, after a restart too. A retry sends the object again
(the PACS keeps one copy: output UIDs are deterministic) and asks with a new
Transaction UID; after the last attempt the delivery is ``dead`` with the reason.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from lungnode.db.deliveries import DeliveryRepository, DueDelivery
from lungnode.dicom.commitment import (
    ActionResult,
    Reference,
    new_transaction_uid,
    request_commitment,
)
from lungnode.dicom.scu import Destination, Outcome
from lungnode.peers import Peer

if TYPE_CHECKING:
    from lungnode.config import Settings
    from lungnode.pipeline.outbox import RetryPolicy

logger = logging.getLogger(__name__)

Requester = Callable[..., ActionResult]


@dataclass(frozen=True)
class CommitmentTerms:
    """Which destinations commit, and how long a report may take."""

    destinations: frozenset[str] = frozenset()
    #: Seconds after the request after which a missing report counts as a failure.
    report_timeout: float = 600.0
    #: Seconds the requesting association stays open for a report on it.
    wait_for_report: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> CommitmentTerms:
        return cls(
            frozenset(settings.commit_peers),
            settings.commit_report_timeout,
            settings.commit_report_wait,
        )


class Commitments:
    def __init__(
        self,
        deliveries: DeliveryRepository,
        policy: RetryPolicy,
        terms: CommitmentTerms,
        calling_ae: str,
        *,
        timeout: float = 30.0,
        requester: Requester = request_commitment,
        seed: int | None = None,
    ) -> None:
        self.deliveries = deliveries
        self.policy = policy
        self.terms = terms
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.requester = requester
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def wanted(self, destination: str) -> bool:
        return destination in self.terms.destinations

    def request(self, peer: Peer, delivered: Mapping[DueDelivery, int | None]) -> None:
        """Ask ``peer`` to commit these deliveries (each with its C-STORE status)."""
        if not delivered:
            return
        transaction_uid = new_transaction_uid()
        # In the database before the N-ACTION goes out (module docstring).
        self.deliveries.mark_sent(
            {due.id: status for due, status in delivered.items()},
            transaction_uid,
            self.terms.report_timeout,
        )
        references = [Reference(due.sop_class_uid, due.sop_instance_uid) for due in delivered]
        try:
            result = self.requester(
                Destination(peer.ae_title, peer.host, peer.port),
                transaction_uid,
                references,
                self.deliveries,
                calling_ae=self.calling_ae,
                timeout=self.timeout,
                wait_for_report=self.terms.wait_for_report,
            )
        except Exception as exc:
            logger.exception("storage commitment request to %s failed", peer.name)
            result = ActionResult(None, Outcome.RETRY, f"request failed: {exc!r}")
        if result.outcome is Outcome.DELIVERED:
            logger.info(
                "storage commitment of %d object(s) asked of %s (transaction %s)%s",
                len(delivered),
                peer.name,
                transaction_uid,
                "; reported at once" if result.reported else "",
            )
            return
        status_text = f"0x{result.status:04X}" if result.status is not None else "no status"
        reason = f"storage commitment request: {status_text}: {result.error or 'failed'}"
        for due in delivered:
            self._failed(
                due.id,
                transaction_uid,
                due.attempts + 1,
                result.status,
                reason,
                final=result.outcome is Outcome.FINAL,
            )

    def expire(self, now: datetime | None = None) -> int:
        """Apply the retry policy to ``sent`` deliveries that a report failed or whose
        report is overdue; the number handled."""
        handled = 0
        for awaited in self.deliveries.awaited_commitments(now):
            reason = (
                awaited.last_error
                or f"no storage commitment report within {self.terms.report_timeout:g} s"
            )
            if self._failed(
                awaited.id,
                awaited.transaction_uid,
                awaited.attempts,
                awaited.last_status,
                reason,
            ):
                handled += 1
        return handled

    def _failed(
        self,
        delivery_id: int,
        transaction_uid: str,
        attempts: int,
        status: int | None,
        reason: str,
        *,
        final: bool = False,
    ) -> bool:
        if final:
            logger.warning("delivery %d dead: %s", delivery_id, reason)
            return self.deliveries.commitment_failed(
                delivery_id, transaction_uid, status, reason, None
            )
        if attempts >= self.policy.max_attempts:
            logger.warning(
                "delivery %d gave up after %d attempts: %s", delivery_id, attempts, reason
            )
            return self.deliveries.commitment_failed(
                delivery_id,
                transaction_uid,
                status,
                f"gave up after {attempts} attempts; last: {reason}",
                None,
            )
        with self._rng_lock:
            delay = self.policy.delay(attempts, self._rng)
        logger.info(
            "delivery %d not committed: %s; retry %d in %.1f s",
            delivery_id,
            reason,
            attempts + 1,
            delay,
        )
        return self.deliveries.commitment_failed(
            delivery_id, transaction_uid, status, reason, delay
        )
