"""The outbox sender: delivers result objects to their destinations, reliably.

Deliveries are rows (``db.deliveries``); this thread claims what is due,
sends it with ``dicom.scu`` and records each outcome (PS3.4 B.2.3 statuses,
classified in :func:`lungnode.dicom.scu.classify_status`):

- delivered (success or warning): ``done``;
- transient (no association, timeout, abort, 0xA7xx, an association
  rejected-transient): retried with exponential back-off and jitter, up to
  ``max_attempts``, then ``dead``;
- final (0xA9xx, 0xCxxx, others, an association rejected-permanent): ``dead`` at
  once, with the reason.

A destination that commits (``pipeline.commitment``, PS3.4 Annex J) is asked to
commit what it received: a delivered object is ``sent`` until its report.

A DICOMweb destination (``peers.DicomwebPeer``) gets its objects by STOW-RS
(``dicom.stow_client``), one request per batch of a study; each instance's
outcome is classified into the same three (HTTP status and FailureReason) and
recorded by the same rows, policy and dead letters. Storage Commitment is DIMSE
only: a DICOMweb destination's deliveries end ``done``.

Each destination is served by its own worker, so one unreachable PACS never
delays the others. A crash between sending and recording only means the
object is sent again: output UIDs are deterministic, so the PACS keeps one copy.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lungnode.db.deliveries import DeliveryRepository, DueDelivery
from lungnode.dicom.commitment import request_commitment
from lungnode.dicom.scu import Destination, Outcome, SendResult, send_files
from lungnode.dicom.stow_client import send_instances
from lungnode.peers import DicomwebPeer, Peer
from lungnode.pipeline.commitment import Commitments, CommitmentTerms, Requester

logger = logging.getLogger(__name__)

Sender = Callable[..., list[SendResult]]


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 2.0
    cap_seconds: float = 300.0
    max_attempts: int = 12

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay after the ``attempt``-th failure: base·2^(attempt-1), capped, with jitter.

        "Equal jitter": half the step is fixed, half random, so the schedule stays
        visibly exponential while retries from many jobs spread out.
        """
        step = min(self.cap_seconds, self.base_seconds * 2.0 ** max(0, attempt - 1))
        return step / 2 + rng.uniform(0, step / 2)


class Outbox:
    def __init__(
        self,
        deliveries: DeliveryRepository,
        peers: Mapping[str, Peer],
        calling_ae: str,
        policy: RetryPolicy | None = None,
        *,
        interval: float = 1.0,
        timeout: float = 30.0,
        sender: Sender = send_files,
        seed: int | None = None,
        commitment: CommitmentTerms | None = None,
        requester: Requester = request_commitment,
        dicomweb_peers: Mapping[str, DicomwebPeer] | None = None,
        stow_sender: Sender = send_instances,
    ) -> None:
        self.deliveries = deliveries
        self.peers = dict(peers)
        self.dicomweb_peers = dict(dicomweb_peers or {})
        self.stow_sender = stow_sender
        self.calling_ae = calling_ae
        self.policy = policy or RetryPolicy()
        self.interval = interval
        self.timeout = timeout
        self.sender = sender
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.commitments = Commitments(
            deliveries,
            self.policy,
            commitment or CommitmentTerms(),
            calling_ae,
            timeout=timeout,
            requester=requester,
            seed=seed,
        )
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=max(2, len(self.peers) + len(self.dicomweb_peers)),
            thread_name_prefix="outbox",
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch()
            except Exception:
                logger.exception("outbox pass failed; retrying")
            self._wake.wait(self.interval)
            self._wake.clear()

    # -- work ------------------------------------------------------------------------

    def dispatch(self) -> list[Future[None]]:
        """Claim the due deliveries of the destinations not busy, and hand each
        destination's to its worker. Claimed deliveries are this outbox's alone
        until their lease (``timeout`` per object) runs out, so another outbox
        process on the same database does not send them at the same time. Sent
        deliveries whose commitment failed or is overdue go back to the retry policy
        first."""
        self.commitments.expire()
        with self._busy_lock:
            busy = set(self._busy)
        by_destination: dict[str, list[DueDelivery]] = defaultdict(list)
        for due in self.deliveries.claim_due(self.timeout, skip_destinations=busy):
            by_destination[due.destination].append(due)
        futures = []
        for destination, batch in by_destination.items():
            with self._busy_lock:
                taken = destination in self._busy
                self._busy.add(destination)
            if taken:  # a concurrent dispatch got there first
                self.deliveries.release([due.id for due in batch])
                continue
            futures.append(self._pool.submit(self._deliver_guarded, destination, batch))
        return futures

    def deliver_all_due(self) -> None:
        """Dispatch once and wait for every worker (tests and the CLI use this)."""
        for future in self.dispatch():
            future.result()

    def _deliver_guarded(self, destination: str, batch: Sequence[DueDelivery]) -> None:
        try:
            self.deliver(destination, batch)
        except Exception:
            logger.exception("delivery to %s failed unexpectedly", destination)
        finally:
            with self._busy_lock:
                self._busy.discard(destination)

    def deliver(self, destination: str, batch: Sequence[DueDelivery]) -> None:
        peer = self.peers.get(destination)
        web_peer = self.dicomweb_peers.get(destination)
        if peer is None and web_peer is None:
            for due in batch:
                self.deliveries.mark_dead(due.id, None, f"unknown destination {destination!r}")
            return
        sendable = []
        for due in batch:
            if Path(due.path).is_file():
                sendable.append(due)
            else:
                self.deliveries.mark_dead(due.id, None, "result file is missing")
        if not sendable:
            return
        by_path = {Path(due.path): due for due in sendable}
        if web_peer is not None:
            results = self.stow_sender(list(by_path), web_peer, timeout=self.timeout)
        else:
            assert peer is not None
            results = self.sender(
                list(by_path),
                Destination(peer.ae_title, peer.host, peer.port),
                calling_ae=self.calling_ae,
                timeout=self.timeout,
            )
        delivered = 0
        to_commit: dict[DueDelivery, int | None] = {}
        for result in results:
            due = by_path[result.path]
            if (
                result.outcome is Outcome.DELIVERED
                and peer is not None
                and self.commitments.wanted(destination)
            ):
                to_commit[due] = result.status
                delivered += 1
            elif self._record(due, result):
                delivered += 1
        if peer is not None:
            self.commitments.request(peer, to_commit)
        logger.info("delivered %d of %d object(s) to %s", delivered, len(sendable), destination)

    def _record(self, due: DueDelivery, result: SendResult) -> bool:
        status_text = result.status_text or (
            f"0x{result.status:04X}" if result.status is not None else "no status"
        )
        if result.outcome is Outcome.DELIVERED:
            self.deliveries.mark_done(due.id, result.status)
            return True
        reason = f"{status_text}: {result.error or 'failed'}"
        attempt = due.attempts + 1
        if result.outcome is Outcome.FINAL:
            logger.warning("delivery %d to %s dead: %s", due.id, due.destination, reason)
            self.deliveries.mark_dead(due.id, result.status, reason)
        elif attempt >= self.policy.max_attempts:
            logger.warning(
                "delivery %d to %s gave up after %d attempts: %s",
                due.id,
                due.destination,
                attempt,
                reason,
            )
            self.deliveries.mark_dead(
                due.id, result.status, f"gave up after {attempt} attempts; last: {reason}"
            )
        else:
            with self._rng_lock:
                delay = self.policy.delay(attempt, self._rng)
            logger.info(
                "delivery %d to %s: %s; retry %d in %.1f s",
                due.id,
                due.destination,
                reason,
                attempt + 1,
                delay,
            )
            self.deliveries.mark_retry(due.id, result.status, reason, delay)
        return False
