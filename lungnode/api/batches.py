"""``POST /batch-predict`` and ``GET /batches/<id>``: several images in one request.

A batch and each of its items are rows (``db.batches``) before any image is
predicted, so a batch survives whatever process runs it. How it runs depends
on the node:

- embedded (``lungnode serve``, or the API alone on the local queue): the
  request runs the items itself and answers ``201`` with every result, as it
  always did;
- scaled (``queue = "celery"``): the request stores the uploads and the rows,
  hands the item ids to the workers (``batch_queue``, given by ``lungnode.app``)
  and answers ``202`` at once with the batch id and the URL to poll. A worker
  runs each item with the same code (``pipeline.batches.run_batch_item``); a
  worker that dies leaves its item to be tried again, and ``lungnode beat``
  re-sends items that no message carries.

Either way, ``GET /batches/<id>`` answers the batch as it stands. Admins see
every batch; others only their own (another's answers 404, as if it did not exist).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from apiflask import APIBlueprint
from flask import request, url_for
from werkzeug.datastructures import FileStorage

from lungnode.api import context
from lungnode.api.auth import roles, the_user
from lungnode.api.errors import APIError
from lungnode.api.history import heatmap_files
from lungnode.api.predict import PREDICT_ERRORS, json_body, model_bundle, prediction_answer
from lungnode.api.schemas import BatchIn, BatchJSONIn, BatchOut
from lungnode.api.uploads import find_upload, store_upload
from lungnode.db.batches import BatchItems, NewItem, error_of
from lungnode.db.models import BatchItem, BatchItemState, BatchPrediction, Prediction, Role, utcnow
from lungnode.pipeline.batches import ItemTerms, run_batch_item

if TYPE_CHECKING:
    from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger(__name__)

batches_blueprint = APIBlueprint("batches", __name__, tag="predictions")

#: The states in which an item has ended (``ok`` is then true or false).
_ENDED = {BatchItemState.DONE.value, BatchItemState.FAILED.value}


def _new_item(position: int, source: FileStorage | str) -> NewItem:
    """Store or find one upload; a refused one becomes an item that failed at once."""
    file_id = source if isinstance(source, str) else None
    try:
        upload = find_upload(source) if isinstance(source, str) else store_upload(source)
    except APIError as exc:
        return NewItem(position, file_id, error=error_of(exc.code, exc.message, exc.details))
    return NewItem(
        position,
        upload.file_id,
        kind=upload.kind,
        image_path=context.stored_path(upload.path),
        study_instance_uid=upload.study_instance_uid,
        series_instance_uid=upload.series_instance_uid,
    )


def poll_url(batch_id: int) -> str:
    return url_for("batches.get_batch", batch_id=batch_id)


def batch_answer(batch_id: int) -> dict[str, Any]:
    """The batch as it stands: its status and each item's state, result or error."""
    with context.reading() as session:
        batch = session.get(BatchPrediction, batch_id)
        if batch is None:
            raise APIError(404, "not_found", f"no batch {batch_id}")
        items = []
        for item in (
            session.query(BatchItem).filter_by(batch_id=batch_id).order_by(BatchItem.position)
        ):
            result = None
            if item.state == BatchItemState.DONE.value and item.prediction_id is not None:
                prediction = session.get(Prediction, item.prediction_id)
                if prediction is not None:
                    result = prediction_answer(prediction, len(heatmap_files(prediction)))
            items.append(
                {
                    "index": item.position,
                    "file_id": item.file_id,
                    "state": item.state,
                    "ok": item.state == BatchItemState.DONE.value if item.state in _ENDED else None,
                    "result": result,
                    "error": item.error if item.state == BatchItemState.FAILED.value else None,
                }
            )
        return {
            "batch_id": batch.id,
            "batch_name": batch.batch_name,
            "status": batch.status,
            "created_at": batch.created_at,
            "poll_url": poll_url(batch.id),
            "items": items,
        }


@batches_blueprint.post("/batch-predict")
@roles(Role.ADMIN, Role.RADIOLOGIST)
@batches_blueprint.input(BatchIn, location="form_and_files")
@batches_blueprint.output(BatchOut, status_code=201)
@batches_blueprint.doc(responses=PREDICT_ERRORS)
def batch_predict(form_and_files_data: dict[str, Any]) -> Any:
    """Classify up to max_batch_size images: file fields (multipart) or file_ids.

    One bad item does not fail the batch: each item has its result or its error.
    Embedded: 201 with every result. Scaled (Celery workers): 202 at once, with
    the batch id and ``poll_url`` (also the Location header) to follow it.
    """
    data = json_body(BatchJSONIn()) if request.is_json else form_and_files_data
    files: list[FileStorage] = list(data.get("file") or [])
    file_ids: list[str] = list(data.get("file_ids") or [])
    settings = context.settings()
    limit = settings.max_batch_size
    count = len(files) + len(file_ids)
    if count == 0 or count > limit:
        raise APIError(
            422,
            "validation_error",
            f"give between 1 and {limit} files or file_ids",
            {"given": count, "max_batch_size": limit},
        )
    user = the_user()
    name = data.get("batch_name") or f"batch {utcnow():%Y-%m-%d %H:%M:%S}"
    sources: list[FileStorage | str] = [*files, *file_ids]
    new_items = [_new_item(k, source) for k, source in enumerate(sources)]
    queue = context.batch_queue()
    runnable = any(item.error is None for item in new_items)
    # Run here: the model must be there before anything is stored (503 otherwise).
    bundle = model_bundle() if queue is None and runnable else None
    items = BatchItems(context.sessions())
    batch_id, pending = items.create(user.id, name, new_items)
    if queue is not None:
        queue(pending)
        logger.info("batch %d: %d item(s) queued for the workers", batch_id, len(pending))
        answer = batch_answer(batch_id)
        return answer, 202, {"Location": answer["poll_url"]}
    if bundle is not None:
        _run_here(items, pending, bundle)
    answer = batch_answer(batch_id)
    succeeded = sum(1 for item in answer["items"] if item["ok"])
    logger.info("batch %d: %d of %d predicted", batch_id, succeeded, len(answer["items"]))
    return answer, 201, {"Location": answer["poll_url"]}


def _run_here(items: BatchItems, pending: list[int], bundle: ModelBundle) -> None:
    """The embedded node: the request runs its items, one attempt each."""
    settings = context.settings()
    terms = ItemTerms(max_attempts=1, lease_seconds=settings.job_lease_seconds)
    for item_id in pending:
        recorded = run_batch_item(
            items, item_id, lambda: bundle, settings, context.sessions(), terms
        )
        if recorded is not None:
            context.metrics().observe_analysis(recorded.timings_s, recorded.processing_time)


@batches_blueprint.get("/batches/<int:batch_id>")
@roles()
@batches_blueprint.output(BatchOut)
@batches_blueprint.doc(responses={404: "No such batch (or not yours)"})
def get_batch(batch_id: int) -> dict[str, Any]:
    """A batch as it stands: ``pending``, ``running``, then ``done``, ``partial`` or
    ``failed``; each item's state, and its result or error once it has ended."""
    user = the_user()
    with context.reading() as session:
        batch = session.get(BatchPrediction, batch_id)
        visible = batch is not None and (user.is_admin or batch.user_id == user.id)
    if not visible:
        raise APIError(404, "not_found", f"no batch {batch_id}")
    return batch_answer(batch_id)
