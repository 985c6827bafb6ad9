"""The items of a ``/batch-predict`` on a real database (SQLite, then PostgreSQL),
without a broker: the guarded claim, how a batch settles, what ``lungnode beat``
gives up and sends again, and the uploads that cleanup keeps for waiting items."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from lungnode.api.uploads import delete_stale_uploads
from lungnode.config import load_settings
from lungnode.db.batches import BatchItems, NewItem, error_of
from lungnode.db.migrate import upgrade
from lungnode.db.models import BatchItem, BatchPrediction, User
from lungnode.db.session import make_engine, make_session_factory
from lungnode.pipeline.batches import ItemTerms, give_up_lost_item
from lungnode.pipeline.sweeper import BatchItemSweeper
from tests.conftest import Databases

TERMS = ItemTerms(max_attempts=2, lease_seconds=30)


@dataclass
class Store:
    sessions: sessionmaker[Session]
    items: BatchItems
    user_id: int


@pytest.fixture
def store(databases: Databases) -> Iterator[Store]:
    url = databases.fresh()
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        user = User(username="radiologist", password_hash="x", role="radiologist")
        session.add(user)
        session.flush()
        user_id = user.id
    yield Store(sessions, BatchItems(sessions), user_id)
    engine.dispose()


def _upload(position: int) -> NewItem:
    return NewItem(position, f"{position:032x}", "PNG", f"uploads/{position:032x}.png")


def _status(store: Store, batch_id: int) -> str:
    with store.sessions() as session:
        batch = session.get(BatchPrediction, batch_id)
        assert batch is not None
        return batch.status


def _item(store: Store, item_id: int) -> BatchItem:
    with store.sessions() as session:
        item = session.get(BatchItem, item_id)
        assert item is not None
        return item


def test_an_item_is_claimed_once_and_the_batch_runs_from_then(store: Store) -> None:
    batch_id, (first, second) = store.items.create(store.user_id, "two", [_upload(0), _upload(1)])
    assert _status(store, batch_id) == "pending"
    claimed = store.items.claim(first, TERMS.lease_seconds)
    assert claimed is not None and claimed.attempt == 1 and claimed.user_id == store.user_id
    assert store.items.claim(first, TERMS.lease_seconds) is None
    assert _status(store, batch_id) == "running"
    assert store.items.running_attempt(first) == 1 and store.items.running_attempt(second) is None


def test_claims_at_once_from_several_threads_give_the_item_to_one(store: Store) -> None:
    _, (item_id,) = store.items.create(store.user_id, "one", [_upload(0)])
    winners: list[object] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        barrier.wait()
        winners.append(store.items.claim(item_id, TERMS.lease_seconds))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len([w for w in winners if w is not None]) == 1


def test_a_batch_settles_once_every_item_has_ended(store: Store) -> None:
    refused = NewItem(2, None, error=error_of("unsupported_media_type", "not an image"))
    batch_id, (first, second) = store.items.create(
        store.user_id, "three", [_upload(0), _upload(1), refused]
    )
    one = store.items.claim(first, TERMS.lease_seconds)
    two = store.items.claim(second, TERMS.lease_seconds)
    assert one is not None and two is not None
    assert store.items.record_failed(one, error_of("not_ct", "MR"))
    assert _status(store, batch_id) == "running"
    assert store.items.record_failed(two, error_of("not_ct", "MR"))
    assert _status(store, batch_id) == "failed"
    assert not store.items.record_failed(two, error_of("not_ct", "MR")), "ended already"


def test_a_batch_of_refused_items_only_is_failed_at_creation(store: Store) -> None:
    refused = [NewItem(k, None, error=error_of("not_found", "no upload")) for k in range(2)]
    batch_id, pending = store.items.create(store.user_id, "none", refused)
    assert pending == [] and _status(store, batch_id) == "failed"


def test_beat_gives_up_a_lost_attempt_sends_it_at_once_then_fails_it(store: Store) -> None:
    published: list[list[int]] = []
    sweeper = BatchItemSweeper(store.items, published.append, TERMS, resend_seconds=60)
    batch_id, (item_id,) = store.items.create(store.user_id, "one", [_upload(0)])
    now = datetime.now(UTC)
    assert sweeper.sweep(now) == [], "pending since just now: its message is on its way"

    assert store.items.claim(item_id, TERMS.lease_seconds) is not None
    assert sweeper.sweep(now) == [], "running, its lease holds"
    later = now + timedelta(seconds=TERMS.lease_seconds + 1)
    assert sweeper.sweep(later) == [item_id], "lease ran out: pending again, sent at once"
    item = _item(store, item_id)
    assert item.state == "pending" and item.error is not None
    assert item.error["code"] == "worker_lost"
    assert sweeper.sweep(later) == [], "sent a moment ago"

    assert store.items.claim(item_id, TERMS.lease_seconds) is not None  # attempt 2, the last
    much_later = datetime.now(UTC) + timedelta(seconds=TERMS.lease_seconds + 1)
    assert sweeper.sweep(much_later) == []
    item = _item(store, item_id)
    assert item.state == "failed" and item.attempts == 2
    assert _status(store, batch_id) == "failed"


def test_beat_sends_a_pending_item_again_once_nobody_took_it(store: Store) -> None:
    published: list[list[int]] = []
    sweeper = BatchItemSweeper(store.items, published.append, TERMS, resend_seconds=5)
    _, (item_id,) = store.items.create(store.user_id, "one", [_upload(0)])
    now = datetime.now(UTC)
    assert sweeper.sweep(now) == []
    assert sweeper.sweep(now + timedelta(seconds=6)) == [item_id]
    assert sweeper.sweep(now + timedelta(seconds=8)) == [], "sent 2 s ago"
    assert sweeper.sweep(now + timedelta(seconds=12)) == [item_id]
    assert published == [[item_id], [item_id]]


def test_giving_up_a_lost_attempt_leaves_a_later_claim_alone(store: Store) -> None:
    _, (item_id,) = store.items.create(store.user_id, "one", [_upload(0)])
    assert store.items.claim(item_id, TERMS.lease_seconds) is not None
    assert give_up_lost_item(store.items, item_id, 1, TERMS, "killed")
    again = store.items.claim(item_id, TERMS.lease_seconds)
    assert again is not None and again.attempt == 2
    assert not give_up_lost_item(store.items, item_id, 1, TERMS, "a late report of attempt 1")
    assert _item(store, item_id).state == "running"


def test_cleanup_keeps_the_uploads_of_items_that_wait(store: Store, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    uploads = storage / "uploads"
    uploads.mkdir(parents=True)
    waiting, done, stray = (uploads / f"{k:032x}.png" for k in (0, 1, 2))
    for path in (waiting, done, stray):
        path.write_bytes(b"png")
        old = time.time() - 48 * 3600
        os.utime(path, (old, old))
    _, (waiting_id, done_id) = store.items.create(store.user_id, "two", [_upload(0), _upload(1)])
    claimed = store.items.claim(done_id, TERMS.lease_seconds)
    assert claimed is not None and store.items.record_failed(claimed, error_of("x", "y"))
    settings = load_settings(env="testing", storage_dir=storage, upload_retention_hours=24)
    deleted = delete_stale_uploads(settings, store.sessions)
    assert sorted(p.name for p in deleted) == sorted([done.name, stray.name])
    assert waiting.exists() and _item(store, waiting_id).state == "pending"
