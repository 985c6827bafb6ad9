"""The SCP over real associations on localhost: echo, store, refusals, TLS."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from lungnode.app.node import Node
from lungnode.config import Settings
from lungnode.db.models import Instance, Job, Series
from tests.dicom.helpers import associate, store_all, store_files
from tests.support.synthetic import make_ct_series, write_series


def count(node: Node, model: type) -> int:
    with node.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_echo(node: Node) -> None:
    assoc = associate(node.scp.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_series_is_stored_recorded_and_queued(node: Node) -> None:
    datasets = make_ct_series(12, rows=64, columns=64)
    assert store_all(node.scp.port, datasets) == [0x0000] * 12
    assert count(node, Instance) == 12
    stored = sorted(node.settings.incoming_dir.rglob("*.dcm"))
    assert len(stored) == 12
    series_uid = str(datasets[0].SeriesInstanceUID)
    assert all(p.parent.name == series_uid for p in stored)
    assert dcmread(stored[0]).SOPInstanceUID in {ds.SOPInstanceUID for ds in datasets}
    assert wait_for(lambda: count(node, Job) == 1)
    with node.sessions() as session:
        job = session.scalars(select(Job)).one()
        series = session.scalars(select(Series)).one()
    assert job.state == "queued" and job.version == 1 and job.instance_count == 12
    assert series.completion_rule == "declared_count"
    assert series.calling_ae == "TESTSCU"


def test_duplicate_instance_is_idempotent(node: Node) -> None:
    datasets = make_ct_series(3, rows=32, columns=32)
    assert store_all(node.scp.port, datasets) == [0] * 3
    assert store_all(node.scp.port, datasets) == [0] * 3
    assert count(node, Instance) == 3
    assert len(list(node.settings.incoming_dir.rglob("*.dcm"))) == 3


def test_unknown_calling_ae_is_rejected(node: Node) -> None:
    assoc = associate(node.scp.port, calling_ae="STRANGER")
    assert assoc.is_rejected
    assoc = associate(node.scp.port, called_ae="NOTLUNGNODE")
    assert assoc.is_rejected
    assert count(node, Instance) == 0


def test_unknown_callers_allowed_by_setting(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = start_node(make_settings(allow_unknown_callers=True), serve_http=False)
    assoc = associate(node.scp.port, calling_ae="STRANGER")
    assert assoc.is_established
    assoc.release()


def test_no_peers_means_nobody_may_call(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    node = start_node(make_settings(peers=""), serve_http=False)
    assert associate(node.scp.port).is_rejected


def test_non_ct_sop_class_is_not_accepted_at_negotiation(node: Node) -> None:
    assoc = associate(node.scp.port, [(str(MRImageStorage), ExplicitVRLittleEndian)])
    assert assoc.is_established  # Verification is accepted ...
    accepted = [cx.abstract_syntax for cx in assoc.accepted_contexts]
    assert str(MRImageStorage) not in accepted  # ... MR Image Storage is not
    rejected = [cx.abstract_syntax for cx in assoc.rejected_contexts]
    assert str(MRImageStorage) in rejected
    assoc.release()


def _truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) - 1000])
    return target


def test_truncated_instance_fails_and_is_kept_nowhere(node: Node, tmp_path: Path) -> None:
    source = write_series(make_ct_series(1, rows=64, columns=64), tmp_path / "src")[0]
    truncated = _truncated_copy(source, tmp_path / "truncated.dcm")
    statuses = store_files(node.scp.port, [truncated])
    assert 0xC000 <= statuses[0] <= 0xCFFF
    assert count(node, Instance) == 0
    assert not list(node.settings.incoming_dir.rglob("*.dcm"))
    assert not list(node.settings.incoming_dir.rglob("*.part"))
    # The node still answers.
    assoc = associate(node.scp.port)
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_missing_required_attribute_fails_with_comment(node: Node) -> None:
    ds = make_ct_series(1, rows=32, columns=32)[0]
    del ds.StudyInstanceUID
    assoc = associate(node.scp.port, [(str(ds.SOPClassUID), ExplicitVRLittleEndian)])
    response = assoc.send_c_store(ds)
    assoc.release()
    assert response.Status == 0xC001
    assert "StudyInstanceUID" in str(response.ErrorComment)
    assert count(node, Instance) == 0


def test_uid_that_could_escape_storage_is_refused(node: Node) -> None:
    ds = make_ct_series(1, rows=32, columns=32)[0]
    with warnings.catch_warnings():  # pydicom warns, rightly, about the invalid UID we send
        warnings.simplefilter("ignore")
        ds.SeriesInstanceUID = "../../etc"
        assoc = associate(node.scp.port, [(str(ds.SOPClassUID), ExplicitVRLittleEndian)])
        response = assoc.send_c_store(ds)
        assoc.release()
    assert response.Status == 0xC002
    assert count(node, Instance) == 0
    assert not list(node.settings.storage_dir.parent.rglob("*.dcm"))


def test_full_disk_answers_out_of_resources(
    make_settings: Callable[..., Settings], start_node: Callable[..., Node]
) -> None:
    # Reserve more than any disk has: every store must be refused with 0xA700.
    node = start_node(make_settings(min_free_disk_mb=2**40), serve_http=False)
    statuses = store_all(node.scp.port, make_ct_series(2, rows=32, columns=32))
    assert statuses == [0xA700, 0xA700]
    assert count(node, Instance) == 0


def test_late_instance_queues_a_new_version(node: Node) -> None:
    datasets = make_ct_series(6, rows=32, columns=32)
    assert store_all(node.scp.port, datasets[:5] + datasets[5:]) == [0] * 6
    assert wait_for(lambda: count(node, Job) == 1)
    late = make_ct_series(
        1,
        rows=32,
        columns=32,
        study_uid=str(datasets[0].StudyInstanceUID),
        series_uid=str(datasets[0].SeriesInstanceUID),
        first_instance_number=7,
    )
    late[0].ImagePositionPatient = [
        float(datasets[-1].ImagePositionPatient[0]),
        float(datasets[-1].ImagePositionPatient[1]),
        float(datasets[-1].ImagePositionPatient[2]) + 1.25,
    ]
    late[0].ImagesInAcquisition = 7
    assert store_all(node.scp.port, late) == [0]
    assert wait_for(lambda: count(node, Job) == 2)
    with node.sessions() as session:
        versions = [(j.version, j.instance_count) for j in session.scalars(select(Job))]
    assert sorted(versions) == [(1, 6), (2, 7)]


def test_release_without_declared_count_completes_after_grace(node: Node) -> None:
    datasets = make_ct_series(5, rows=32, columns=32, declared_count=False)
    assert store_all(node.scp.port, datasets) == [0] * 5
    assert wait_for(lambda: count(node, Job) == 1, timeout=10)
    with node.sessions() as session:
        series = session.scalars(select(Series)).one()
    assert series.completion_rule == "association_released"


def test_two_associations_for_one_series(node: Node) -> None:
    datasets = make_ct_series(8, rows=32, columns=32, declared_count=False)
    assoc_a = associate(node.scp.port, [(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)])
    for ds in datasets[:4]:
        assert assoc_a.send_c_store(ds).Status == 0
    assoc_b = associate(node.scp.port, [(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)])
    for ds in datasets[4:6]:
        assert assoc_b.send_c_store(ds).Status == 0
    assoc_a.release()
    time.sleep(1.0)  # more than the grace period: B still open, so not complete
    assert count(node, Job) == 0
    for ds in datasets[6:]:
        assert assoc_b.send_c_store(ds).Status == 0
    assoc_b.release()
    assert wait_for(lambda: count(node, Job) == 1)
    with node.sessions() as session:
        assert session.scalars(select(Job)).one().instance_count == 8


def test_implicit_vr_instance_is_stored_as_received(node: Node) -> None:
    datasets = make_ct_series(2, rows=32, columns=32, transfer_syntax=ImplicitVRLittleEndian)
    assert store_all(node.scp.port, datasets) == [0, 0]
    stored = next(node.settings.incoming_dir.rglob("*.dcm"))
    assert dcmread(stored).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_ct_sop_class_that_is_not_ct_inside_is_refused(node: Node) -> None:
    """The same rule as the API and the CLI (``dicom.modality``): Modality and pixels count
    too, not only the SOP Class, so a mislabelled MR or a colour image is never analysed."""
    mislabelled, colour = make_ct_series(2, rows=32, columns=32)
    mislabelled.Modality = "MR"
    colour.SamplesPerPixel = 3
    colour.PhotometricInterpretation = "RGB"
    colour.PlanarConfiguration = 0
    colour.PixelData = bytes(32 * 32 * 3 * 2)
    assoc = associate(node.scp.port, [(str(colour.SOPClassUID), ExplicitVRLittleEndian)])
    responses = [assoc.send_c_store(ds) for ds in (mislabelled, colour)]
    assoc.release()
    assert [int(r.Status) for r in responses] == [0xA900, 0xA900]
    assert str(responses[0].ErrorComment).startswith("Modality MR is not CT")
    assert "3 samples per pixel" in str(responses[1].ErrorComment)
    assert count(node, Instance) == 0


def test_a_value_pydicom_cannot_convert_is_refused_not_an_internal_error(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the fuzzing drill: Pixel Data with an unknown VR made the intake raise
    NotImplementedError (pydicom converts values when first read), logged as an
    unexpected failure of the node instead of the sender's error."""
    import pynetdicom._config

    (path,) = write_series(make_ct_series(1, rows=32, columns=32), tmp_path)
    encoded = path.read_bytes()
    path.write_bytes(encoded.replace(b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00NW", 1))
    # Send the data set's bytes as they are (pynetdicom would parse and re-encode them).
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    with caplog.at_level(logging.ERROR, logger="lungnode"):
        assert store_files(node.scp.port, [path]) == [0xC000]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert count(node, Instance) == 0
