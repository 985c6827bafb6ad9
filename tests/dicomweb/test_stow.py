"""STOW-RS into a running node over real HTTP: instances take the C-STORE path (files,
rows, completion), each refusal has its PS3.18 status, and nothing half-written stays."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select

from lungnode.db.models import Association, Instance, Job, Series
from tests.dicom.helpers import store_all, wait_until
from tests.dicomweb.conftest import PASSWORD, StowNode, encoded, instance_rows
from tests.dicomweb.stow_client import BOUNDARY, chunks, content_type, multipart_body
from tests.support.synthetic import make_ct_series

REFERENCED = "00081199"
FAILED = "00081198"
FAILURE_REASON = "00081197"
SOP_INSTANCE = "00081155"


def values(item: dict, tag: str) -> list:  # type: ignore[type-arg]
    return list(item.get(tag, {}).get("Value", []))


def associations(stow_node: StowNode) -> list[tuple[str, str | None]]:
    with stow_node.node.sessions() as session:
        rows = session.scalars(select(Association).order_by(Association.id)).all()
        return [(row.calling_ae, row.outcome) for row in rows]


def test_a_series_in_one_request_is_stored_as_c_store_stores_it(stow_node: StowNode) -> None:
    series = make_ct_series(6, rows=64, columns=64)
    payloads = encoded(series)
    response = stow_node.stow(payloads)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/dicom+json"
    body = response.json()
    referenced = body[REFERENCED]["Value"]
    assert [values(item, SOP_INSTANCE)[0] for item in referenced] == [
        str(ds.SOPInstanceUID) for ds in series
    ]
    assert FAILED not in body
    # The very file the sender sent, where C-STORE puts it, and one row each.
    for ds, payload in zip(series, payloads, strict=True):
        path = (
            stow_node.settings.incoming_dir
            / str(ds.StudyInstanceUID)
            / str(ds.SeriesInstanceUID)
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert path.read_bytes() == payload
        dcmread(path, force=False)  # a strict read
    rows = instance_rows(stow_node.node)
    assert len(rows) == 6 and len({association for _uid, association in rows}) == 1
    assert associations(stow_node) == [("STOW-RS", "released")]
    # The series completes (declared count) and one job is queued.
    assert wait_until(lambda: job_count(stow_node) == 1, timeout=15)
    assert stow_node.leftovers() == []


def job_count(stow_node: StowNode) -> int:
    with stow_node.node.sessions() as session:
        return len(session.scalars(select(Job)).all())


def test_half_by_c_store_half_by_stow_is_one_series_one_job(stow_node: StowNode) -> None:
    series = make_ct_series(10, rows=64, columns=64)
    assert store_all(stow_node.node.scp.port, series[:5]) == [0] * 5
    response = stow_node.stow(encoded(series[5:]))
    assert response.status_code == 200, response.text
    assert wait_until(lambda: job_count(stow_node) == 1, timeout=15)
    # Well past the grace and a few ticks: completed once, not again.
    time.sleep(1.5)
    with stow_node.node.sessions() as session:
        assert len(session.scalars(select(Series)).all()) == 1
        assert session.scalars(select(Series)).one().state == "complete"
        assert len(session.scalars(select(Instance)).all()) == 10
    assert job_count(stow_node) == 1
    assert [ae for ae, _outcome in associations(stow_node)] == ["TESTSCU", "STOW-RS"]


def test_study_url_fails_an_instance_of_another_study(stow_node: StowNode) -> None:
    ours = make_ct_series(2, rows=32, columns=32)
    other = make_ct_series(1, rows=32, columns=32)
    study = str(ours[0].StudyInstanceUID)
    response = stow_node.stow(encoded([ours[0], other[0], ours[1]]), study=study)
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body[REFERENCED]["Value"]) == 2
    (failed,) = body[FAILED]["Value"]
    assert values(failed, SOP_INSTANCE) == [str(other[0].SOPInstanceUID)]
    assert values(failed, FAILURE_REASON) == [0xC409]
    assert "another study" in response.headers["Warning"]
    assert {uid for uid, _ in instance_rows(stow_node.node)} == {
        str(ds.SOPInstanceUID) for ds in ours
    }


def test_instances_that_are_not_ct_or_not_dicom_fail_with_their_reason(
    stow_node: StowNode,
) -> None:
    mr = Path(str(get_testdata_file("MR_small.dcm"))).read_bytes()
    response = stow_node.stow([mr, b"this is not DICOM at all" * 100])
    assert response.status_code == 409, response.text
    mr_item, junk_item = response.json()[FAILED]["Value"]
    assert values(mr_item, FAILURE_REASON) == [0xA900]
    assert values(mr_item, SOP_INSTANCE) == [
        str(dcmread(get_testdata_file("MR_small.dcm")).SOPInstanceUID)
    ]
    assert values(junk_item, FAILURE_REASON) == [0xC000]
    assert SOP_INSTANCE not in junk_item
    assert "Modality MR is not CT" in response.headers["Warning"]
    assert instance_rows(stow_node.node) == []
    assert list(stow_node.settings.incoming_dir.rglob("*.dcm")) == []
    assert stow_node.leftovers() == []


def test_unquoted_type_and_a_chunked_body(stow_node: StowNode) -> None:
    series = make_ct_series(3, rows=32, columns=32)
    response = stow_node.stow(
        body=chunks(multipart_body(encoded(series)), size=1000),
        headers={"Content-Type": content_type(quoted=False)},
    )
    assert response.status_code == 200, response.text
    assert len(instance_rows(stow_node.node)) == 3


@pytest.mark.parametrize(
    "header",
    [
        "application/dicom",
        "multipart/form-data; boundary=" + BOUNDARY,
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
    ],
)
def test_wrong_content_type_is_415(stow_node: StowNode, header: str) -> None:
    series = make_ct_series(1, rows=32, columns=32)
    response = stow_node.stow(encoded(series), headers={"Content-Type": header})
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert instance_rows(stow_node.node) == []


def test_wrong_boundary_is_400_and_stores_nothing(stow_node: StowNode) -> None:
    series = make_ct_series(2, rows=32, columns=32)
    response = stow_node.stow(
        encoded(series), headers={"Content-Type": content_type(boundary="not-the-one")}
    )
    assert response.status_code == 400, response.text
    assert "boundary" in response.json()["error"]["message"]
    assert instance_rows(stow_node.node) == [] and associations(stow_node) == []
    assert stow_node.leftovers() == []


def test_truncated_part_keeps_the_complete_ones_and_nothing_half_written(
    stow_node: StowNode,
) -> None:
    series = make_ct_series(3, rows=64, columns=64)
    body = multipart_body(encoded(series))
    cut = body[: len(body) - 4000]  # inside the last part's payload
    response = stow_node.stow(body=cut)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "truncated" in error["message"]
    assert error["details"] == {"stored": 2, "failed": 0}
    # The two complete parts are stored and registered; the third is nowhere.
    assert [uid for uid, _ in instance_rows(stow_node.node)] == [
        str(ds.SOPInstanceUID) for ds in series[:2]
    ]
    assert len(list(stow_node.settings.incoming_dir.rglob("*.dcm"))) == 2
    assert associations(stow_node) == [("STOW-RS", "aborted")]
    assert stow_node.leftovers() == []


def test_empty_request_is_400(stow_node: StowNode) -> None:
    response = stow_node.stow([])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == "the request holds no instance"


def test_oversize_request_is_413(make_stow_node: object) -> None:
    stow_node = make_stow_node(dicomweb_max_request_mb=1)  # type: ignore[operator]
    series = make_ct_series(8, rows=256, columns=256)  # about 1 MB of pixels
    body = multipart_body(encoded(series))
    assert len(body) > 2**20
    with_length = stow_node.stow(body=body)
    assert with_length.status_code == 413, with_length.text
    chunked = stow_node.stow(body=chunks(body, size=64 * 1024))
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "payload_too_large"
    # What came before the limit in the chunked body is stored whole, or not at all.
    stored = {uid for uid, _ in instance_rows(stow_node.node)}
    assert stored <= {str(ds.SOPInstanceUID) for ds in series}
    assert len(list(stow_node.settings.incoming_dir.rglob("*.dcm"))) == len(stored)
    assert stow_node.leftovers() == []


def test_who_may_send(stow_node: StowNode) -> None:
    payloads = encoded(make_ct_series(1, rows=32, columns=32))
    anonymous = stow_node.stow(payloads, auth=None)
    assert anonymous.status_code == 401, anonymous.text
    assert "Basic" in anonymous.headers["WWW-Authenticate"]
    wrong_password = stow_node.stow(payloads, auth=("sender", "not-the-password"))
    assert wrong_password.status_code == 401
    assert wrong_password.json()["error"]["code"] == "invalid_credentials"
    unknown_user = stow_node.stow(payloads, auth=("nobody", PASSWORD))
    assert unknown_user.status_code == 401
    for role in ("viewer", "radiologist"):
        by_token = stow_node.stow(payloads, auth=stow_node.token(role))
        assert by_token.status_code == 403, by_token.text
        by_password = stow_node.stow(payloads, auth=(role, PASSWORD))
        assert by_password.status_code == 403
        assert by_password.json()["error"]["details"] == {"allowed": ["admin", "sender"]}
    assert instance_rows(stow_node.node) == []
    assert stow_node.stow(payloads, auth=stow_node.token("admin")).status_code == 200
    assert stow_node.stow(payloads, auth=stow_node.token("sender")).status_code == 200
    # A sender may send, and nothing else.
    history = requests.get(
        f"{stow_node.url}/api/v1/history",
        headers={"Authorization": f"Bearer {stow_node.token('sender')}"},
        timeout=30,
    )
    assert history.status_code == 403, history.text


def test_failed_basic_authentications_are_rate_limited(make_stow_node: object) -> None:
    stow_node = make_stow_node(rate_limit_login="3/minute")  # type: ignore[operator]
    statuses = [stow_node.stow([], auth=("sender", "wrong")).status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]


def test_storage_full_is_0xa700_with_retry_after(make_stow_node: object) -> None:
    stow_node = make_stow_node(min_free_disk_mb=10**9)  # type: ignore[operator]
    response = stow_node.stow(encoded(make_ct_series(2, rows=32, columns=32)))
    assert response.status_code == 409, response.text
    failed = response.json()[FAILED]["Value"]
    assert [values(item, FAILURE_REASON) for item in failed] == [[0xA700], [0xA700]]
    assert int(response.headers["Retry-After"]) > 0
    assert instance_rows(stow_node.node) == [] and stow_node.leftovers() == []


def test_parts_a_stop_left_spooled_are_removed_at_start(
    make_stow_node: object, tmp_path: Path
) -> None:
    spool = tmp_path / "storage" / "tmp" / "stow"
    spool.mkdir(parents=True)
    stale, fresh = spool / ".stow-stale.part", spool / ".stow-fresh.part"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"another process is receiving it")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    make_stow_node()  # type: ignore[operator]
    assert not stale.exists() and fresh.exists()
