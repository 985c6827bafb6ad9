"""The load drill's HTTP load (tests/drills/test_load.py): API readers under locust.

Each simulated user reads what an admin's dashboard reads, over and over: the
history (first page, and the DICOM results only) and the statistics. The
bearer token comes from ``LUNGNODE_DRILL_TOKEN``; the drill passes ``--host``.
Any answer but 200 is a failure, named by its status, so that the drill can
tell server errors (5xx) from the rest in locust's ``*_failures.csv``.
"""

from __future__ import annotations

import os

from locust import HttpUser, between, task


class DashboardReader(HttpUser):
    wait_time = between(0.05, 0.25)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {os.environ['LUNGNODE_DRILL_TOKEN']}"

    def _get(self, path: str, name: str) -> None:
        with self.client.get(path, name=name, catch_response=True) as response:
            if response.status_code >= 500:
                response.failure(f"server error {response.status_code}")
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}")
            else:
                response.success()

    @task(3)
    def history(self) -> None:
        self._get("/api/v1/history?per_page=20", "/api/v1/history")

    @task(1)
    def dicom_history(self) -> None:
        self._get("/api/v1/history?source=dicom&per_page=50", "/api/v1/history?source=dicom")

    @task(2)
    def stats(self) -> None:
        self._get("/api/v1/stats", "/api/v1/stats")
