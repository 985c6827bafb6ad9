"""Benchmark the REST API: history paging over many rows, and one prediction.

    python scripts/seed_predictions.py --storage-dir /tmp/bench
    python scripts/bench_api.py --storage-dir /tmp/bench [--repeat 200] [--model PATH]

What is measured, in this process through the WSGI app (Flask's test client:
routing, auth, validation, database and serialisation, no network):

* ``GET /api/v1/history?per_page=50`` as the admin (all rows) and as a
  radiologist (own uploads plus DICOM results), pages 1 and 20: median and
  95th percentile of ``--repeat`` requests. The SQLite ``EXPLAIN QUERY PLAN``
  of the page and count queries is printed, to show the indexes in use.
* ``GET /api/v1/stats?days=30`` as the admin and as a radiologist: read
  again and again (median and 95th percentile of ``--stats-repeat``), and the
  first request after a prediction is written (a row inserted before each).
  ``--cache-url redis://...`` keeps the cache in Redis instead of in process.
* ``POST /api/v1/predict`` with a 512x512 PNG, the model warm (one
  prediction first loads it): median of ``--predict-repeat`` requests. The
  model is ``--model``, else the configured bundle, else an untrained model
  of the demo architecture (128x128 input) built on the spot: inference costs
  the same whatever the weights.

Targets (issue 5): history median <= 20 ms, predict median <= 300 ms.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import delete, func, insert, select, text

from lungnode.api import create_app
from lungnode.api.auth import CurrentUser
from lungnode.api.history import _filtered
from lungnode.config import load_settings
from lungnode.db.models import Prediction, User
from lungnode.db.session import make_engine

PASSWORD = "bench-password"


def _timed(call: Any, repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def _explain(engine: Any, user: CurrentUser) -> None:
    page = (
        _filtered(select(Prediction), user, {}, walk_by_time=True)
        .order_by(Prediction.timestamp.desc(), Prediction.id.desc())
        .limit(50)
    )
    count = _filtered(select(func.count()).select_from(Prediction), user, {})
    with engine.connect() as connection:
        for name, statement in (("page", page), ("count", count)):
            sql = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
            plan = connection.execute(text(f"EXPLAIN QUERY PLAN {sql}")).all()
            print(f"  {name}: " + " | ".join(str(row[-1]) for row in plan))


def _model(settings_model: str, models_dir: Path, given: str | None) -> str:
    if given:
        return given
    candidate = Path(settings_model)
    if (candidate / "manifest.json").is_file() or (models_dir / settings_model).is_dir():
        return settings_model
    from lungnode.domain import CLASS_LABELS
    from lungnode.ml.train import build_small_cnn, write_bundle

    out = Path(tempfile.mkdtemp()) / "demo-architecture"
    print("  (no model bundle found: an untrained model of the demo architecture is used)")
    return str(
        write_bundle(
            build_small_cnn((128, 128), 2, len(CLASS_LABELS)),
            out,
            name="demo-architecture",
            version="0",
            labels=CLASS_LABELS,
            input_size=(128, 128),
            windows=("lung", "mediastinal"),
            gradcam_layer="gradcam_conv",
        )
    )


def _bench_stats(client: Any, engine: Any, headers: Any, repeat: int) -> None:
    """``GET /stats`` as it is read (nothing written between two requests), and
    right after a prediction is written (the first request after a write)."""
    url = "/api/v1/stats?days=30"
    for who in ("admin", "user1"):
        auth = headers(who)
        response = client.get(url, headers=auth)
        assert response.status_code == 200, response.json
        median, p95 = _timed(lambda a=auth: client.get(url, headers=a), repeat)
        print(
            f"  GET {url} as {who}, read again: median {median:.1f} ms, p95 {p95:.1f} ms "
            f"(total {response.json['total']})"
        )
        samples = []
        for _ in range(max(1, repeat // 5)):
            with engine.begin() as connection:
                connection.execute(
                    insert(Prediction).values(
                        source="dicom",
                        prediction_class="Normal",
                        all_scores={},
                        model_name="bench",
                        model_version="0",
                        timestamp=datetime.now(UTC),
                        processing_time=0.1,
                    )
                )
            t0 = time.perf_counter()
            assert client.get(url, headers=auth).status_code == 200
            samples.append((time.perf_counter() - t0) * 1000)
        print(
            f"  GET {url} as {who}, first after a write: median "
            f"{statistics.median(samples):.1f} ms ({len(samples)} writes)"
        )
    with engine.begin() as connection:  # leave the seeded rows as they were
        connection.execute(delete(Prediction).where(Prediction.model_name == "bench"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage-dir", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--predict-repeat", type=int, default=20)
    parser.add_argument("--model")
    parser.add_argument("--stats-repeat", type=int, default=50)
    parser.add_argument("--cache-url", default="", help="the /stats cache (default: in process)")
    parser.add_argument("--skip-predict", action="store_true")
    args = parser.parse_args()

    base = load_settings(storage_dir=args.storage_dir, env="testing")
    model = base.model if args.skip_predict else _model(base.model, base.models_dir, args.model)
    settings = load_settings(
        storage_dir=args.storage_dir,
        env="testing",
        model=model,
        rate_limit_default="1000000/minute",
        rate_limit_login="1000/minute",
        cache_url=args.cache_url,
    )
    engine = make_engine(settings.effective_database_url)
    app = create_app(settings, engine=engine)
    client = app.test_client()

    def headers(username: str) -> dict[str, str]:
        body = {"username": username, "password": PASSWORD}
        token = client.post("/api/v1/auth/login", json=body).json["access_token"]
        return {"Authorization": f"Bearer {token}"}

    with engine.connect() as connection:
        total = connection.execute(select(func.count()).select_from(Prediction)).scalar()
        radiologist = connection.execute(select(User.id).where(User.username == "user1")).scalar()
    print(f"history over {total} predictions ({settings.effective_database_url})")
    for who, user in (
        ("admin", CurrentUser(0, "admin", "admin")),
        ("user1", CurrentUser(int(radiologist or 0), "user1", "radiologist")),
    ):
        auth = headers(who)
        for page in (1, 20):
            url = f"/api/v1/history?per_page=50&page={page}"
            response = client.get(url, headers=auth)
            assert response.status_code == 200, response.json
            for _ in range(20):  # warm the page cache and the code paths
                client.get(url, headers=auth)
            median, p95 = _timed(lambda u=url, a=auth: client.get(u, headers=a), args.repeat)
            print(
                f"  GET {url} as {who}: median {median:.1f} ms, p95 {p95:.1f} ms "
                f"(total {response.json['total']})"
            )
        print(f" EXPLAIN QUERY PLAN as {who}:")
        _explain(engine, user)

    _bench_stats(client, engine, headers, args.stats_repeat)

    if args.skip_predict:
        return
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    auth = headers("user1")

    def predict() -> None:
        response = client.post(
            "/api/v1/predict",
            data={"file": (io.BytesIO(png), "slice.png")},
            headers=auth,
            content_type="multipart/form-data",
        )
        assert response.status_code == 201, response.json

    t0 = time.perf_counter()
    predict()
    first = time.perf_counter() - t0
    print(f"predict 512x512 PNG with {model}: first (loads the model) {first:.1f} s")
    median, p95 = _timed(predict, args.predict_repeat)
    print(f"  POST /api/v1/predict warm: median {median:.0f} ms, p95 {p95:.0f} ms")
    engine.dispose()


if __name__ == "__main__":
    main()
