"""DICOMweb deliveries in the admin views: the API's deliveries list and retry, and
``lungnode deliveries list``, show them as they show DIMSE ones: the destination's
name, the last status (the HTTP status, or the instance's FailureReason) and the
last error."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset

from lungnode.app.commands import cmd_deliveries_list
from lungnode.db.deliveries import DeliveryRepository
from lungnode.db.models import Delivery, Job, Series
from lungnode.pipeline.outbox import Outbox, RetryPolicy
from tests.api.conftest import API
from tests.dicom.stow_stub import StowRequest, StowStub, store_response
from tests.support.synthetic import make_ct_series, write_series


def test_dicomweb_deliveries_are_listed_and_retried_like_others(
    make_api: Callable[..., API], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_series(make_ct_series(2, rows=16, columns=16), tmp_path / "results")
    busy = files[1].stem
    answers = [
        lambda request: (401, None),
        lambda request: (202, store_response(request, failed={busy: 0xA700})),
    ]

    def respond(request: StowRequest) -> tuple[int, Dataset | None]:
        return answers.pop(0)(request) if answers else (200, store_response(request, {}))

    with StowStub(respond) as stub:
        api = make_api(
            dicomweb_peers=f"archive={stub.url};max_instances=1", result_destinations="archive"
        )
        sessions = api.app.extensions["lungnode"]["sessions"]
        with sessions.begin() as session:
            series = Series(study_instance_uid="1.2", series_instance_uid="1.2.3")
            session.add(series)
            session.flush()
            job = Job(series_id=series.id, state="done")
            session.add(job)
            session.flush()
            for path in files:
                session.add(
                    Delivery(
                        job_id=job.id,
                        destination="archive",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        sop_instance_uid=path.stem,
                        path=str(path),
                    )
                )
        outbox = Outbox(
            DeliveryRepository(sessions, api.settings.storage_dir),
            {},
            api.settings.ae_title,
            RetryPolicy(base_seconds=60),
            dicomweb_peers={p.name: p for p in api.settings.dicomweb_peers},
        )
        outbox.deliver_all_due()

        admin = api.headers("admin")
        listed = api.client.get("/api/v1/deliveries", headers=admin).json["items"]
        shown = {d["sop_instance_uid"]: d for d in listed}
        refused = shown[files[0].stem]
        assert (refused["destination"], refused["state"], refused["last_status"]) == (
            "archive",
            "dead",
            401,
        )
        assert refused["last_error"] == "HTTP 401: Unauthorized"
        waiting = shown[busy]
        assert (waiting["state"], waiting["last_status"]) == ("pending", 0xA700)
        assert waiting["last_error"] == "FailureReason 0xA700: out of resources (HTTP 202)"

        assert cmd_deliveries_list(api.settings, argparse.Namespace()) == 0
        (line,) = capsys.readouterr().out.splitlines()
        assert line.split("\t")[1:3] == ["archive", files[0].stem]
        assert line.endswith("HTTP 401: Unauthorized")

        # The credentials are fixed; an admin sends the dead letter again.
        retried = api.client.post(f"/api/v1/deliveries/{refused['id']}/retry", headers=admin)
        assert retried.status_code == 200 and retried.json["state"] == "pending"
        outbox.deliver_all_due()
    after = api.client.get("/api/v1/deliveries", headers=admin).json["items"]
    states = {d["sop_instance_uid"]: (d["state"], d["last_status"]) for d in after}
    assert states[files[0].stem] == ("done", 200)
    assert states[busy] == ("pending", 0xA700)  # still waiting out its back-off
