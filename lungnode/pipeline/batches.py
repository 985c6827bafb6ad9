"""Running one item of a ``/batch-predict``: claim it, predict, record how it ended.

The same function runs an item wherever it runs: in the API's request (the
embedded node answers the batch synchronously) or in a Celery worker (with
``queue = "celery"`` the API answers 202 and the workers run the items). The
prediction is :func:`lungnode.pipeline.upload_prediction.predict_upload`, the
one ``POST /predict`` runs; the item's rows are ``db.batches``.

How an attempt ends:

- a prediction: recorded with the item ``done``, in one transaction;
- an image refused (not CT, unreadable, too small): ``failed`` at once, with
  the same error ``/predict`` would answer; trying again would not help;
- anything else (the model could not be loaded, a fault of the node): pending
  again for the next message, or ``failed`` after ``max_attempts``;
- a worker that dies mid-item: its parent releases the attempt at once
  (:func:`give_up_lost_item`), or ``lungnode beat`` does once the lease has run
  out (``pipeline.sweeper.BatchItemSweeper``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from lungnode.config import Settings
from lungnode.db.batches import BatchItems, ClaimedItem, error_of
from lungnode.errors import BundleError, ImageRefused, ItemNotRunning
from lungnode.pipeline.upload_prediction import RecordedPrediction, StoredUpload, predict_upload

if TYPE_CHECKING:
    from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemTerms:
    """Attempts of one item, and how long one may take before it is taken for lost."""

    max_attempts: int
    lease_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ItemTerms:
        return cls(settings.job_max_attempts, settings.job_lease_seconds)


def run_batch_item(
    items: BatchItems,
    item_id: int,
    bundle: Callable[[], ModelBundle],
    settings: Settings,
    sessions: sessionmaker[Session],
    terms: ItemTerms,
) -> RecordedPrediction | None:
    """Run one item if it is pending; returns its prediction, or None when it had
    nothing to do or ended without one (its row says how)."""
    # The model first: waiting for a warming model holds no lease on the item.
    try:
        model: ModelBundle | None = bundle()
        model_error = ""
    except BundleError as exc:
        model, model_error = None, str(exc)
    claimed = items.claim(item_id, terms.lease_seconds)
    if claimed is None:
        logger.debug("batch item %d is not pending: nothing to do", item_id)
        return None
    if model is None:
        _attempt_failed(items, claimed, terms, "model_unavailable", model_error)
        return None
    upload = StoredUpload(
        claimed.file_id or "",
        settings.resolve_stored(claimed.image_path),
        claimed.kind,
        claimed.study_instance_uid,
        claimed.series_instance_uid,
    )
    try:
        recorded = predict_upload(
            upload,
            model,
            settings,
            sessions,
            claimed.user_id,
            claimed.batch_id,
            on_record=lambda session, prediction: items.record_done(
                session, claimed, prediction.id
            ),
        )
    except ImageRefused as exc:
        items.record_failed(claimed, error_of(exc.code, exc.message, exc.details))
        logger.info("batch item %d refused: %s", item_id, exc.code)
        return None
    except ItemNotRunning:
        logger.warning(
            "batch item %d: attempt %d ended before its result (lease ran out); "
            "the result was not recorded",
            item_id,
            claimed.attempt,
        )
        return None
    except Exception as exc:
        logger.exception("batch item %d attempt %d failed", item_id, claimed.attempt)
        _attempt_failed(items, claimed, terms, "prediction_failed", f"{type(exc).__name__}: {exc}")
        return None
    logger.info("batch %d item %d predicted", claimed.batch_id, item_id)
    return recorded


def _attempt_failed(
    items: BatchItems, claimed: ClaimedItem, terms: ItemTerms, code: str, message: str
) -> None:
    final = claimed.attempt >= terms.max_attempts
    error = error_of(code, message, {"attempts": claimed.attempt})
    if items.release(claimed.id, claimed.attempt, error, final=final):
        logger.warning(
            "batch item %d attempt %d: %s (%s)%s",
            claimed.id,
            claimed.attempt,
            code,
            message,
            "; failed for good" if final else "; it will be tried again",
        )


def give_up_lost_item(
    items: BatchItems, item_id: int, attempt: int, terms: ItemTerms, why: str
) -> bool:
    """End an attempt whose worker died: pending again, or failed after the last
    attempt (an image that kills its worker every time must end). False when the
    attempt had ended meanwhile."""
    final = attempt >= terms.max_attempts
    error = error_of("worker_lost", f"the worker running it was lost: {why}", {"attempts": attempt})
    released = items.release(item_id, attempt, error, final=final)
    if released:
        logger.warning(
            "batch item %d attempt %d: worker lost (%s); %s",
            item_id,
            attempt,
            why,
            "failed for good" if final else "pending again",
        )
    return released
