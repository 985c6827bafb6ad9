"""Long predictions on the queue (plan 12.4): with ``queue = "celery"`` the ``api``
role answers ``POST /batch-predict`` with 202, the batch id and a URL to poll,
and ``lungnode worker`` processes predict the items.

- two workers run a batch's items, each exactly once; the poll URL shows each
  item's result or error, to its owner and admins only;
- the rows are the truth: with the broker's messages lost (Redis restarted
  empty) and an item left running by a worker that died, ``lungnode beat`` gives
  the lost attempt up and sends the waiting items again, and a worker started
  afterwards predicts them.
"""

from __future__ import annotations

import io
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import execute
from tests.scaled.conftest import ADMIN_PASSWORD, APIClient, Cluster, Role, WaitFor

pytestmark = [pytest.mark.scaled, pytest.mark.slow]

WARM = "ready (warmed in"
PASSWORD = "radiologist-password"


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _start_api(cluster: Cluster) -> tuple[Role, APIClient]:
    api = cluster.start("api")
    assert api.http_port is not None
    return api, APIClient(api.http_port).login("admin", ADMIN_PASSWORD)


def _radiologist(admin: APIClient, name: str) -> APIClient:
    status, body = admin.request(
        "POST", "/users", {"username": name, "password": PASSWORD, "role": "radiologist"}
    )
    assert status == 201, body
    return APIClient(int(admin.base.split(":")[2].split("/")[0])).login(name, PASSWORD)


def _poll(client: APIClient, url: str, wait_for: WaitFor, timeout: float) -> dict[str, Any]:
    path = url.removeprefix("/api/v1")
    answers: list[dict[str, Any]] = []

    def ended() -> bool:
        status, body = client.request("GET", path)
        assert status == 200, body
        answers.append(body)
        return body["status"] in ("done", "partial", "failed")

    wait_for(ended, timeout, f"the batch at {url} to end")
    return answers[-1]


def _predicted(workers: list[Role]) -> Counter[str]:
    """How many times each item was predicted, by the workers' logs."""
    runs: Counter[str] = Counter()
    for worker in workers:
        for line in worker.log_text().splitlines():
            if " predicted" in line and "batch " in line and " item " in line:
                runs[line.split(" item ", 1)[1].split()[0]] += 1
    return runs


def test_a_batch_on_the_queue_answers_202_and_the_workers_predict_it(
    cluster: Cluster, wait_for: WaitFor
) -> None:
    api, admin = _start_api(cluster)
    cluster.start("beat")
    workers = [cluster.start("worker") for _ in range(2)]
    for worker in workers:
        cluster.wait_for_log(worker, WARM, timeout=240)
    owner = _radiologist(admin, "owner")
    other = _radiologist(admin, "other")

    images = [("a.png", _png(1)), ("b.png", b"not an image"), ("c.png", _png(2))]
    images += [(f"{k}.png", _png(k)) for k in range(3, 6)]
    status, accepted = owner.request("POST", "/batch-predict", files=images)
    assert status == 202, accepted
    url = accepted["poll_url"]
    assert url == f"/api/v1/batches/{accepted['batch_id']}"
    assert accepted["items"][1]["state"] == "failed"
    assert accepted["items"][1]["error"]["code"] == "unsupported_media_type"

    ended = _poll(owner, url, wait_for, 180)
    assert ended["status"] == "partial", ended
    states = [item["state"] for item in ended["items"]]
    assert states == ["done", "failed", "done", "done", "done", "done"], cluster.logs()
    results = [item["result"] for item in ended["items"] if item["state"] == "done"]
    assert all(result["heatmap_urls"] for result in results)
    status, _ = owner.request("GET", f"/history/{results[0]['prediction_id']}")
    assert status == 200

    # Each item predicted once, by whichever worker took it.
    rows = cluster.query(
        "SELECT attempts, state FROM batch_item WHERE batch_id = :batch AND state = 'done'",
        batch=accepted["batch_id"],
    )
    assert rows == [(1, "done")] * 5
    counted = cluster.query(
        "SELECT COUNT(*) FROM prediction WHERE batch_id = :batch", batch=accepted["batch_id"]
    )
    assert counted == [(5,)]
    assert sorted(_predicted(workers).values()) == [1] * 5, cluster.logs()

    # The owner and admins see the batch; another radiologist does not.
    assert other.request("GET", url.removeprefix("/api/v1"))[0] == 404
    status, seen = admin.request("GET", url.removeprefix("/api/v1"))
    assert status == 200 and seen == ended
    assert api.process.poll() is None


def test_batch_items_outlive_a_lost_broker_and_a_lost_worker(
    cluster: Cluster, wait_for: WaitFor
) -> None:
    api, admin = _start_api(cluster)
    cluster.start("beat")
    status, accepted = admin.request(
        "POST", "/batch-predict", files=[("a.png", _png(7)), ("b.png", _png(8))]
    )
    assert status == 202, accepted
    first, second = (
        item_id
        for (item_id,) in cluster.query(
            "SELECT id FROM batch_item WHERE batch_id = :batch ORDER BY position",
            batch=accepted["batch_id"],
        )
    )
    # The broker restarts empty: both messages are lost. And the first item was
    # claimed by a worker that died with it: running, its lease run out.
    cluster.broker.stop()
    cluster.broker.start()
    execute(
        cluster.database_url,
        "UPDATE batch_item SET state = 'running', attempts = 1, lease_until = :past "
        "WHERE id = :item",
        past=datetime.now(UTC) - timedelta(seconds=1),
        item=first,
    )
    worker = cluster.start("worker")
    cluster.wait_for_log(worker, WARM, timeout=240)

    ended = _poll(admin, accepted["poll_url"], wait_for, 120)
    assert ended["status"] == "done", cluster.logs()
    attempts = dict(
        cluster.query(
            "SELECT id, attempts FROM batch_item WHERE batch_id = :batch",
            batch=accepted["batch_id"],
        )
    )
    assert attempts == {first: 2, second: 1}
    counted = cluster.query(
        "SELECT COUNT(*) FROM prediction WHERE batch_id = :batch", batch=accepted["batch_id"]
    )
    assert counted == [(2,)]
    beat = next(role for role in cluster.roles if role.name == "beat")
    assert "pending batch item(s) that no worker had taken" in beat.log_text()
    assert api.process.poll() is None
