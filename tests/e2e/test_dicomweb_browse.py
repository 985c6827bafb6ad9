"""A DICOMweb viewer browses what a real node produced (PS3.18 QIDO-RS and WADO-RS).

One node for the module, with the demo model: a CT series goes in over DIMSE,
the job writes its results, and every test reads them over the node's HTTP
port. QIDO-RS finds the study, series and instances with the files' own
attributes; WADO-RS returns each file byte for byte, and metadata that
round-trips through pydicom to the file's header; dicomweb-client, a real
DICOMweb client, reads all of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.valuerep import BYTES_VR

from lungnode.app.node import Node
from tests.conftest import Databases, node_settings
from tests.dicom.helpers import finished_job, store_all
from tests.support.synthetic import make_ct_series

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "dicomweb-admin-password"
VIEWER_ORIGIN = "http://viewer.example"
JSON = "application/dicom+json"


@dataclass(frozen=True)
class Browsed:
    """The node's DICOMweb root, an admin token, the source series and the result files."""

    url: str
    token: str
    source: Dataset
    #: (series UID, SOP UID) -> file, of every result object.
    files: dict[tuple[str, str], Path]

    @property
    def study(self) -> str:
        return str(self.source.StudyInstanceUID)

    def get(self, path: str, token: str | None = "", **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        return requests.get(f"{self.url}{path}", headers=headers, timeout=30, **kwargs)

    def series(self) -> set[str]:
        return {series for series, _ in self.files}


@pytest.fixture(scope="module")
def browsed(
    tmp_path_factory: pytest.TempPathFactory, module_databases: Databases
) -> Iterator[Browsed]:
    storage = tmp_path_factory.mktemp("dicomweb") / "storage"
    settings = node_settings(
        storage,
        module_databases,
        model="lung-ct-demo",
        admin_password=ADMIN_PASSWORD,
        cors_origins=[VIEWER_ORIGIN],
    )
    node = Node(settings, analyse=True, serve_http=True)
    node.start()
    try:
        series = make_ct_series(8, rows=64, columns=64, seed=14)
        assert store_all(node.scp.port, series) == [0] * 8
        job = finished_job(node)
        assert job.state == "done", job.reason
        base = f"http://127.0.0.1:{node.http_port}"
        login = requests.post(
            f"{base}/api/v1/auth/login",
            json={"username": "admin", "password": ADMIN_PASSWORD},
            timeout=30,
        )
        assert login.status_code == 200, login.text
        outputs = job.details["outputs"] if job.details else []
        study = str(series[0].StudyInstanceUID)
        files = {
            (o["series_instance_uid"], o["sop_instance_uid"]): storage
            / "results"
            / study
            / o["series_instance_uid"]
            / f"{o['sop_instance_uid']}.dcm"
            for o in outputs
        }
        assert len(files) >= 4 and all(path.is_file() for path in files.values())
        yield Browsed(f"{base}/dicomweb", login.json()["access_token"], series[0], files)
    finally:
        node.stop()


def _value(dataset: dict[str, Any], tag: str) -> Any:
    values = dataset.get(tag, {}).get("Value")
    return values[0] if values else None


def _parts(response: requests.Response) -> list[bytes]:
    """The parts of a multipart/related body, read here without the client's parser."""
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related")
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    assert boundary is not None, content_type
    delimiter = b"--" + boundary.group(1).encode()
    body = response.content
    assert body.rstrip().endswith(delimiter + b"--")
    parts = []
    for chunk in body.split(delimiter)[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n")
        _headers, _, payload = chunk[2:-2].partition(b"\r\n\r\n")
        parts.append(payload)
    return parts


# -- QIDO-RS --------------------------------------------------------------------------


def test_the_study_is_found_with_the_attributes_of_its_results(browsed: Browsed) -> None:
    response = browsed.get("/studies")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == JSON
    (study,) = response.json()
    source = browsed.source
    assert _value(study, "0020000D") == browsed.study
    assert _value(study, "00100020") == source.PatientID
    assert _value(study, "00100010") == {"Alphabetic": str(source.PatientName)}
    assert _value(study, "00080020") == source.StudyDate
    assert _value(study, "00080050") == source.AccessionNumber
    headers = [dcmread(path, stop_before_pixels=True) for path in browsed.files.values()]
    assert set(study["00080061"]["Value"]) == {str(h.Modality) for h in headers}
    assert _value(study, "00201206") == len(browsed.series())
    assert _value(study, "00201208") == len(browsed.files)
    assert _value(study, "00081190") == f"{browsed.url}/studies/{browsed.study}"


def test_series_and_instances_carry_their_files_attributes(browsed: Browsed) -> None:
    response = browsed.get(f"/studies/{browsed.study}/series")
    assert response.status_code == 200
    found = {_value(s, "0020000E"): s for s in response.json()}
    assert set(found) == browsed.series()
    for uid, series in found.items():
        paths = [path for (s, _), path in browsed.files.items() if s == uid]
        first = dcmread(paths[0], stop_before_pixels=True)
        assert _value(series, "00080060") == first.Modality
        assert _value(series, "00200011") == first.SeriesNumber
        assert _value(series, "0008103E") == first.get("SeriesDescription")
        assert _value(series, "00201209") == len(paths)
        instances = browsed.get(f"/studies/{browsed.study}/series/{uid}/instances").json()
        assert len(instances) == len(paths)
        for instance in instances:
            path = browsed.files[(uid, _value(instance, "00080018"))]
            header = dcmread(path, stop_before_pixels=True)
            assert _value(instance, "00080016") == header.SOPClassUID
            assert _value(instance, "00200013") == header.get("InstanceNumber")
    everything = browsed.get(f"/studies/{browsed.study}/instances").json()
    assert {(_value(i, "0020000E"), _value(i, "00080018")) for i in everything} == set(
        browsed.files
    )


def test_matching_paging_and_includefield(browsed: Browsed) -> None:
    source = browsed.source
    hits = {
        "PatientID": source.PatientID,
        "00100020": source.PatientID,
        "AccessionNumber": str(source.AccessionNumber)[:3] + "*",
        "StudyDate": f"{source.StudyDate}-",
        "PatientName": str(source.PatientName).upper(),
        "StudyInstanceUID": f"1.2.3,{browsed.study}",
    }
    for key, value in hits.items():
        response = browsed.get("/studies", params={key: value})
        assert response.status_code == 200, (key, response.text)
    misses = {"PatientID": "nobody", "StudyDate": "-19000101", "StudyInstanceUID": "1.2.3"}
    for key, value in misses.items():
        response = browsed.get("/studies", params={key: value})
        assert response.status_code == 204 and response.content == b"", key

    sr = browsed.get("/series", params={"Modality": "SR"}).json()
    assert [_value(s, "00080060") for s in sr] == ["SR"]
    assert _value(sr[0], "00100020") == source.PatientID  # study attributes come along
    assert browsed.get("/studies", params={"Modality": "SR"}).status_code == 200

    all_instances = browsed.get(f"/studies/{browsed.study}/instances").json()
    pages = [
        browsed.get(f"/studies/{browsed.study}/instances", params={"limit": 2, "offset": n})
        for n in range(0, len(all_instances) + 2, 2)
    ]
    assert [p.status_code for p in pages][-1] == 204
    paged = [i for p in pages if p.status_code == 200 for i in p.json()]
    assert paged == all_instances

    (study,) = browsed.get("/studies", params={"includefield": "00081030,StudyID"}).json()
    assert "00081030" in study and "00200010" in study
    (everything,) = browsed.get("/studies", params={"includefield": "all"}).json()
    assert {"00081030", "00200010", "00080090"} <= set(everything)
    assert "00080018" not in everything  # a study has no SOP Instance UID
    instances = browsed.get(f"/studies/{browsed.study}/instances", params={"includefield": "all"})
    for instance in instances.json():
        header = dcmread(
            browsed.files[(_value(instance, "0020000E"), _value(instance, "00080018"))]
        )
        assert {f"{int(e.tag):08X}" for e in header if e.VR not in BYTES_VR} <= set(instance)


def test_bad_searches_answer_400_with_the_reason(browsed: Browsed) -> None:
    bad = {
        "NoSuchKeyword": "1",
        "StudyDate": "2020",
        "limit": "0",
        "offset": "-1",
        "StudyInstanceUID": "not-a-uid",
        "includefield": "NotAnAttribute",
        "SOPInstanceUID": "1.2.3",  # an instance key in a search of studies
    }
    for key, value in bad.items():
        response = browsed.get("/studies", params={key: value})
        assert response.status_code == 400, key
        assert response.json()["error"]["code"] == "bad_request"
        assert response.json()["error"]["message"], key


# -- WADO-RS --------------------------------------------------------------------------


def test_each_instance_comes_back_byte_identical(browsed: Browsed) -> None:
    for (series, sop), path in browsed.files.items():
        response = browsed.get(f"/studies/{browsed.study}/series/{series}/instances/{sop}")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith(
            'multipart/related; type="application/dicom"'
        )
        assert _parts(response) == [path.read_bytes()]
    study = _parts(browsed.get(f"/studies/{browsed.study}"))
    assert sorted(study) == sorted(p.read_bytes() for p in browsed.files.values())
    some_series = next(iter(browsed.series()))
    series_parts = _parts(browsed.get(f"/studies/{browsed.study}/series/{some_series}"))
    assert sorted(series_parts) == sorted(
        p.read_bytes() for (s, _), p in browsed.files.items() if s == some_series
    )


def test_metadata_round_trips_to_the_files_header_with_bulk_data_by_uri(
    browsed: Browsed,
) -> None:
    bulk_uris: dict[str, str] = {}

    def remember(tag: str, vr: str, uri: str) -> bytes:
        bulk_uris[tag] = uri
        return b""

    response = browsed.get(f"/studies/{browsed.study}/metadata")
    assert response.status_code == 200 and response.headers["Content-Type"] == JSON
    documents = response.json()
    assert len(documents) == len(browsed.files)
    for document in documents:
        series, sop = _value(document, "0020000E"), _value(document, "00080018")
        on_disk = dcmread(browsed.files[(series, sop)])
        bulk_uris.clear()
        read = Dataset.from_json(document, bulk_data_uri_handler=remember)
        for element in on_disk:
            key = f"{int(element.tag):08X}"
            if key in bulk_uris:
                assert element.VR in BYTES_VR
                fetched = requests.get(
                    bulk_uris[key], headers={"Authorization": f"Bearer {browsed.token}"}, timeout=30
                )
                assert fetched.status_code == 200
                assert _parts(fetched) == [on_disk[element.tag].value]
            else:
                assert read[element.tag] == element, element.keyword
        for key in {"7FE00010", "7FE00008", "00420011"} & set(document):
            assert set(document[key]) == {"vr", "BulkDataURI"}, key
    instance = documents[0]
    one = browsed.get(
        f"/studies/{browsed.study}/series/{_value(instance, '0020000E')}"
        f"/instances/{_value(instance, '00080018')}/metadata"
    ).json()
    assert one == [instance]


def test_frames_of_a_heatmap_are_its_pixel_data(browsed: Browsed) -> None:
    for (series, sop), path in browsed.files.items():
        dataset = dcmread(path)
        if "PixelData" not in dataset:
            continue
        size = dataset.Rows * dataset.Columns * dataset.SamplesPerPixel * dataset.BitsAllocated
        response = browsed.get(
            f"/studies/{browsed.study}/series/{series}/instances/{sop}/frames/1",
            headers={"Accept": 'multipart/related; type="application/octet-stream"'},
        )
        assert response.status_code == 200
        assert _parts(response) == [dataset.PixelData[: size // 8]]
        return
    pytest.fail("no result object with Pixel Data")


def test_a_dicomweb_client_reads_the_node(browsed: Browsed) -> None:
    client = DICOMwebClient(url=browsed.url, headers={"Authorization": f"Bearer {browsed.token}"})
    studies = client.search_for_studies(search_filters={"PatientID": browsed.source.PatientID})
    assert [_value(s, "0020000D") for s in studies] == [browsed.study]
    series = client.search_for_series(study_instance_uid=browsed.study)
    assert {_value(s, "0020000E") for s in series} == browsed.series()
    (series_uid, sop), path = next(iter(browsed.files.items()))
    instance = client.retrieve_instance(browsed.study, series_uid, sop)
    assert instance.SOPInstanceUID == sop
    assert instance == dcmread(path)
    metadata = client.retrieve_series_metadata(browsed.study, series_uid)
    assert {_value(m, "00080018") for m in metadata} == {
        s for (se, s) in browsed.files if se == series_uid
    }
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []


# -- refusals ------------------------------------------------------------------------


def test_unknown_uids_no_token_and_bad_accept(browsed: Browsed) -> None:
    (series, sop) = next(iter(browsed.files))
    instance = f"/studies/{browsed.study}/series/{series}/instances/{sop}"
    for path in (
        "/studies/1.2.3",
        f"/studies/{browsed.study}/series/1.2.3",
        f"/studies/{browsed.study}/series/{series}/instances/1.2.3",
        "/studies/1.2.3/metadata",
        f"/studies/{browsed.study}/series/1.2.3/metadata",
        f"{instance}/frames/99",
        f"{instance}/bulkdata/00100010",
    ):
        response = browsed.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert browsed.get("/studies/1.2.3/series").status_code == 204

    for path in ("/studies", f"/studies/{browsed.study}/series", instance, f"{instance}/metadata"):
        response = browsed.get(path, token=None)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
        assert browsed.get(path, token="not.a.token").status_code == 401

    refusals = {
        "/studies": "application/dicom+xml",
        instance: "application/pdf",
        f"{instance}/metadata": 'multipart/related; type="application/dicom+xml"',
    }
    for path, accept in refusals.items():
        response = browsed.get(path, headers={"Accept": accept})
        assert response.status_code == 406, path
        assert response.json()["error"]["code"] == "not_acceptable"
    other_syntax = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    assert browsed.get(instance, headers={"Accept": other_syntax}).status_code == 406
    any_syntax = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    assert browsed.get(instance, headers={"Accept": any_syntax}).status_code == 200


def test_a_browser_viewer_may_call_it_from_the_configured_origin(browsed: Browsed) -> None:
    preflight = requests.options(
        f"{browsed.url}/studies",
        headers={
            "Origin": VIEWER_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, accept",
        },
        timeout=30,
    )
    assert preflight.headers.get("Access-Control-Allow-Origin") == VIEWER_ORIGIN
    allowed = preflight.headers.get("Access-Control-Allow-Headers", "").lower()
    assert "authorization" in allowed and "accept" in allowed
    response = browsed.get("/studies", headers={"Origin": VIEWER_ORIGIN})
    assert response.headers.get("Access-Control-Allow-Origin") == VIEWER_ORIGIN
    other = browsed.get("/studies", headers={"Origin": "http://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
