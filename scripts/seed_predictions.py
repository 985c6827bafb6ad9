"""Fill a database with synthetic predictions, for the history benchmark.

    python scripts/seed_predictions.py --storage-dir /tmp/bench [--count 100000] [--users 5]

Writes into ``<storage-dir>/lungnode.db`` (migrated first): ``--users``
radiologists (``user1``...) plus ``admin``, and ``--count`` predictions over
the last 365 days, 80 % uploads spread over the users and 20 % DICOM results
with study UIDs. No files are written: rows only. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, insert, select

from lungnode.config import load_settings
from lungnode.db.migrate import upgrade
from lungnode.db.models import Prediction, Role, User
from lungnode.db.session import make_engine, make_session_factory
from lungnode.domain import CLASS_LABELS
from lungnode.passwords import hash_password

BATCH = 5000
PASSWORD = "bench-password"


def seed(storage_dir: Path, count: int, users: int, seed_value: int = 1) -> None:
    settings = load_settings(storage_dir=storage_dir, env="testing")
    storage_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    sessions = make_session_factory(engine)
    password_hash = hash_password(PASSWORD)
    with sessions.begin() as session:
        for name, role in [("admin", Role.ADMIN)] + [
            (f"user{i}", Role.RADIOLOGIST) for i in range(1, users + 1)
        ]:
            if session.scalar(select(User.id).where(User.username == name)) is None:
                session.add(User(username=name, role=role.value, password_hash=password_hash))
    with sessions() as session:
        user_ids = list(session.scalars(select(User.id).where(User.role == Role.RADIOLOGIST.value)))
    rng = random.Random(seed_value)
    now = datetime.now(UTC)
    started = time.perf_counter()
    done = 0
    while done < count:
        rows = []
        for _ in range(min(BATCH, count - done)):
            dicom = rng.random() < 0.2
            label = rng.choice(CLASS_LABELS)
            confidence = rng.uniform(0.4, 0.99)
            rest = (1 - confidence) / (len(CLASS_LABELS) - 1)
            rows.append(
                {
                    "user_id": None if dicom else rng.choice(user_ids),
                    "source": "dicom" if dicom else "upload",
                    "study_instance_uid": f"2.25.{rng.getrandbits(64)}" if dicom else None,
                    "prediction_class": label,
                    "confidence_score": confidence,
                    "all_scores": {c: (confidence if c == label else rest) for c in CLASS_LABELS},
                    "model_name": "lung-ct-demo",
                    "model_version": "1.0.0",
                    "model_synthetic": True,
                    "model_intended_use": "Demonstration and testing only.",
                    "model_trained_on": "synthetic phantoms",
                    "timestamp": now - timedelta(seconds=rng.uniform(0, 365 * 86400)),
                    "processing_time": rng.uniform(0.05, 0.4),
                }
            )
        with sessions.begin() as session:
            session.execute(insert(Prediction), rows)
        done += len(rows)
    with sessions() as session:
        total = session.scalar(select(func.count()).select_from(Prediction))
    engine.dispose()
    print(
        f"seeded {count} predictions in {time.perf_counter() - started:.1f} s; "
        f"{total} in {settings.effective_database_url}; users: admin, user1..user{users} "
        f"(password {PASSWORD!r})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage-dir", type=Path, required=True)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=5)
    args = parser.parse_args()
    seed(args.storage_dir, args.count, args.users)


if __name__ == "__main__":
    main()
