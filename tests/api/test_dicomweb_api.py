"""DICOMweb on a migrated app: what the index lists, and who may read it.

The rows are the truth of what exists, less objects whose file is gone; only
finished jobs count. A real Encapsulated PDF, written by the node's writer,
stands in for a job's outputs (tests/e2e/test_dicomweb_browse.py runs a whole
node).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset

from lungnode.db.models import Job, JobState, Series
from lungnode.db.result_index import result_path
from lungnode.dicom.writers.pdf import write_pdf_document
from lungnode.pipeline.outputs import dataset_bytes
from lungnode.report.pdf import ReportInput, StudyFacts, build_report
from tests.api.conftest import API
from tests.support.synthetic import make_ct_series
from tests.unit.dicom_checks import make_result

SEARCHES = ["/studies", "/series", "/instances"]


def _output(dataset: Dataset) -> dict[str, str]:
    return {
        "kind": "pdf",
        "sop_class_uid": str(dataset.SOPClassUID),
        "series_instance_uid": str(dataset.SeriesInstanceUID),
        "sop_instance_uid": str(dataset.SOPInstanceUID),
    }


@pytest.fixture
def results(api: API) -> dict[str, Any]:
    """One finished job with a PDF on disk and one whose file is gone; a failed job."""
    series = make_ct_series(4, rows=32, columns=32, seed=3)
    result, _ = make_result(series)
    pdf = build_report(ReportInput(result, StudyFacts.from_dataset(series[0])))
    kept = write_pdf_document(series[0], result, pdf, analysis_version=1)
    gone = write_pdf_document(series[0], result, pdf, analysis_version=2)
    failed = write_pdf_document(series[0], result, pdf, analysis_version=3)
    study = str(series[0].StudyInstanceUID)
    storage = api.settings.storage_dir
    for dataset in (kept, failed):
        path = result_path(storage, study, str(dataset.SeriesInstanceUID), dataset.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dataset_bytes(dataset))
    with api.app.extensions["lungnode"]["sessions"].begin() as session:
        row = Series(study_instance_uid=study, series_instance_uid=series[0].SeriesInstanceUID)
        session.add(row)
        session.flush()
        session.add_all(
            [
                Job(
                    series_id=row.id,
                    version=1,
                    state=JobState.DONE.value,
                    details={"outputs": [_output(kept), _output(gone)]},
                ),
                Job(
                    series_id=row.id,
                    version=2,
                    state=JobState.FAILED.value,
                    details={"outputs": [_output(failed)]},
                ),
            ]
        )
    return {"study": study, "kept": kept, "gone": gone, "failed": failed}


def test_nothing_indexed_answers_204_with_no_body(api: API) -> None:
    headers = api.headers("viewer")
    for path in SEARCHES:
        response = api.client.get(f"/dicomweb{path}", headers=headers)
        assert response.status_code == 204, path
        assert response.data == b""


@pytest.mark.parametrize("role", ["admin", "radiologist", "viewer"])
def test_every_role_sees_finished_results_whose_files_exist(
    api: API, results: dict[str, Any], role: str
) -> None:
    headers = api.headers(role)
    kept: Dataset = results["kept"]
    response = api.client.get("/dicomweb/instances", headers=headers)
    assert response.status_code == 200
    assert [i["00080018"]["Value"][0] for i in response.json] == [kept.SOPInstanceUID]
    (study,) = api.client.get("/dicomweb/studies", headers=headers).json
    assert study["00201208"]["Value"] == [1]
    assert study["00080061"]["Value"] == [kept.Modality]

    gone: Dataset = results["gone"]
    base = f"/dicomweb/studies/{results['study']}/series/{gone.SeriesInstanceUID}"
    assert (
        api.client.get(f"{base}/instances/{gone.SOPInstanceUID}", headers=headers).status_code
        == 404
    )
    failed: Dataset = results["failed"]
    base = f"/dicomweb/studies/{results['study']}/series/{failed.SeriesInstanceUID}"
    assert (
        api.client.get(f"{base}/instances/{failed.SOPInstanceUID}", headers=headers).status_code
        == 404
    )


def test_the_pdf_is_bulk_data_in_metadata_and_retrievable(
    api: API, results: dict[str, Any]
) -> None:
    headers = api.headers("viewer")
    kept: Dataset = results["kept"]
    base = (
        f"/dicomweb/studies/{results['study']}/series/{kept.SeriesInstanceUID}"
        f"/instances/{kept.SOPInstanceUID}"
    )
    (metadata,) = api.client.get(f"{base}/metadata", headers=headers).json
    uri = metadata["00420011"]["BulkDataURI"]
    assert uri == f"http://localhost{base}/bulkdata/00420011"
    assert "InlineBinary" not in metadata["00420011"]
    response = api.client.get(uri.removeprefix("http://localhost"), headers=headers)
    assert response.status_code == 200
    assert bytes(kept.EncapsulatedDocument) in response.data
    frames = api.client.get(f"{base}/frames/1", headers=headers)
    assert frames.status_code == 404  # a document has no frames


def test_without_a_token_every_route_answers_401(api: API, results: dict[str, Any]) -> None:
    kept: Dataset = results["kept"]
    study = results["study"]
    paths = [
        *SEARCHES,
        f"/studies/{study}/series",
        f"/studies/{study}/instances",
        f"/studies/{study}",
        f"/studies/{study}/metadata",
        f"/studies/{study}/series/{kept.SeriesInstanceUID}/instances/{kept.SOPInstanceUID}",
    ]
    for path in paths:
        response = api.client.get(f"/dicomweb{path}")
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_dicomweb_stays_out_of_the_openapi_document(api: API) -> None:
    spec = api.client.get("/api/v1/openapi.json").json
    assert not [path for path in spec["paths"] if "dicomweb" in path]


def test_dicomweb_reads_have_their_own_rate_limit(make_api: Callable[..., API]) -> None:
    """A viewer's many reads are not held to the REST API's default limit."""
    api = make_api(rate_limit_default="2/minute", rate_limit_dicomweb="4/minute")
    headers = api.headers("viewer")
    statuses = [api.client.get("/dicomweb/studies", headers=headers).status_code for _ in range(5)]
    assert statuses == [204, 204, 204, 204, 429]
