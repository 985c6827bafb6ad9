"""The deployment's health checks and demo PACS, run for real (see docs/deploy.md).

The image's HEALTHCHECK is run against a running node's API, the scp service's
C-ECHO check against its SCP, each as ``docker-compose.yml`` and the Dockerfile
write them. Orthanc loads the configuration compose mounts, routes a CT series to
an SCP with lungnode's AE title, takes a result back and does not route it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from lungnode.app.node import Node
from lungnode.config import Settings
from tests.conftest import require_tool
from tests.deploy_files import DOTENV, ROOT, image_healthcheck, load_compose, load_dockerfile
from tests.pacs import ORTHANC_AE, Orthanc, free_port

# -- the health checks, run -----------------------------------------------------------


@pytest.fixture
def running_node(make_settings: Callable[..., Settings], start_node: Callable[..., Node]) -> Node:
    return start_node(make_settings(), serve_http=True)


def _run_check(command: list[str], environment: Mapping[str, str]) -> int:
    assert command[:2] == ["python", "-c"]
    env = {**os.environ, **environment}
    result = subprocess.run(
        [sys.executable, "-c", command[2]], env=env, capture_output=True, timeout=60
    )
    return result.returncode


def test_image_health_check_passes_on_a_running_node_and_fails_without_its_scp(
    running_node: Node,
) -> None:
    command = image_healthcheck(load_dockerfile())
    environment = {"LUNGNODE_HTTP_PORT": str(running_node.http_port)}
    assert _run_check(command, environment) == 0
    running_node.scp.stop()
    assert _run_check(command, environment) == 1


def test_scp_health_check_echoes_as_the_first_peer(running_node: Node) -> None:
    command = load_compose(DOTENV)["services"]["scp"]["healthcheck"]["test"][1:]
    settings = running_node.settings
    environment = {
        "LUNGNODE_PEERS": ",".join(str(peer) for peer in settings.peers),
        "LUNGNODE_AE_TITLE": settings.ae_title,
        "LUNGNODE_DICOM_PORT": str(running_node.scp.port),
    }
    assert _run_check(command, environment) == 0
    running_node.scp.stop()
    assert _run_check(command, environment) == 1


# -- Orthanc, the demo PACS, with the configuration compose mounts ----------------------


@dataclass
class Received:
    calling_ae: str
    sop_instance_uid: str
    modality: str


@pytest.fixture
def lungnode_stand_in() -> Iterator[tuple[int, list[Received]]]:
    """A storage SCP with lungnode's AE title: what Orthanc's routing reaches."""
    received: list[Received] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        dataset = event.dataset
        with lock:
            received.append(
                Received(
                    event.assoc.requestor.ae_title,
                    str(dataset.SOPInstanceUID),
                    str(dataset.get("Modality", "")),
                )
            )
        return 0x0000

    ae = AE(ae_title="LUNGNODE")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield port, received
    finally:
        server.shutdown()


@pytest.fixture
def demo_orthanc(
    tmp_path: Path, lungnode_stand_in: tuple[int, list[Received]]
) -> Iterator[Orthanc]:
    """Orthanc with deploy/orthanc/orthanc.json, where only what cannot hold outside
    a container is changed: paths, ports, the modality's host, the stable age."""
    executable = require_tool("Orthanc")
    port, _ = lungnode_stand_in
    orthanc = Orthanc(executable, tmp_path / "orthanc", {})
    config = json.loads((ROOT / "deploy" / "orthanc" / "orthanc.json").read_text())
    config.update(
        StorageDirectory=str(tmp_path / "orthanc" / "db"),
        IndexDirectory=str(tmp_path / "orthanc" / "db"),
        DicomPort=orthanc.dicom_port,
        HttpPort=orthanc.http_port,
        RemoteAccessAllowed=False,
        StableAge=1,
        LuaScripts=[str(ROOT / "deploy" / "orthanc" / "autoroute.lua")],
    )
    config["DicomModalities"]["lungnode"].update(Host="127.0.0.1", Port=port)
    orthanc.config_path.write_text(json.dumps(config, indent=2))
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.orthanc
def test_demo_orthanc_routes_ct_to_lungnode_and_takes_results_back(
    demo_orthanc: Orthanc, lungnode_stand_in: tuple[int, list[Received]], tmp_path: Path
) -> None:
    _, received = lungnode_stand_in
    assert "lungnode" in demo_orthanc.get("/modalities")

    ct_path = Path(str(get_testdata_file("CT_small.dcm")))
    ct = dcmread(ct_path)
    demo_orthanc.upload(ct_path)
    assert _wait(lambda: bool(received), 30), "Orthanc did not route the CT series"
    assert received[0] == Received(ORTHANC_AE, str(ct.SOPInstanceUID), "CT")

    # A result, as lungnode sends it: the same study, a new series, not CT.
    result = copy.deepcopy(ct)
    result.Modality = "OT"
    result.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    result.SeriesInstanceUID = generate_uid()
    result.SOPInstanceUID = generate_uid()
    result.file_meta.MediaStorageSOPClassUID = result.SOPClassUID
    result.file_meta.MediaStorageSOPInstanceUID = result.SOPInstanceUID
    ae = AE(ae_title="LUNGNODE")
    ae.add_requested_context(result.SOPClassUID, result.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", demo_orthanc.dicom_port, ae_title=ORTHANC_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(result)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert str(result.SOPInstanceUID) in demo_orthanc.instance_uids()
    # Stable after 1 s; results are never routed back to lungnode.
    time.sleep(3)
    assert [r.sop_instance_uid for r in received] == [str(ct.SOPInstanceUID)]
