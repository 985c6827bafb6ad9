"""Orthanc, a real PACS, as a test peer: started on free ports with its own storage."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.ports import free_port as free_port
from tests.ports import free_ports

ORTHANC_AE = "ORTHANC"
#: Orthanc's DICOMweb plugin as Debian installs it (``orthanc-dicomweb``);
#: LUNGNODE_TEST_ORTHANC_DICOMWEB names another.
DICOMWEB_PLUGIN = os.environ.get(
    "LUNGNODE_TEST_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
)


class Orthanc:
    """One Orthanc process; stop() and start() keep its storage and ports."""

    def __init__(
        self,
        executable: str,
        work: Path,
        modalities: dict[str, list[Any]],
        *,
        dicom_port: int | None = None,
        dicomweb_servers: dict[str, Any] | None = None,
    ) -> None:
        """``dicomweb_servers``: with it (even empty), Orthanc loads its DICOMweb plugin,
        serves DICOMweb at ``dicomweb_url`` and knows these servers by name
        (``{"name": ["http://…/dicomweb/", "user", "password"]}`` or the plugin's
        object form) for its ``/dicom-web/servers/<name>/stow``."""
        self.executable = executable
        self.work = work
        self.dicom_port = dicom_port or free_port()
        # Not the DICOM port, even when that one was picked by an earlier call.
        self.http_port = next(port for port in free_ports(2) if port != self.dicom_port)
        self.process: subprocess.Popen[bytes] | None = None
        work.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "lungnode-test-pacs",
            "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"),
            "DicomAet": ORTHANC_AE,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": modalities,
            "StorageCommitmentReportsSize": 100,
            "Plugins": [],
        }
        if dicomweb_servers is not None:
            if not Path(DICOMWEB_PLUGIN).is_file():
                from tests.conftest import unavailable

                unavailable(f"Orthanc's DICOMweb plugin is missing ({DICOMWEB_PLUGIN})")
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "Servers": dicomweb_servers,
            }
        self.config_path = work / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The plugin's DICOMweb root (only with ``dicomweb_servers``)."""
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> None:
        # DCMTK, inside Orthanc, leaves Nagle's algorithm on unless told otherwise;
        # every C-STORE would then wait for a delayed ACK.
        env = {**os.environ, "TCP_NODELAY": "1"}
        with (self.work / "orthanc.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.executable, str(self.config_path)], stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.work / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return str(response.read().decode())

    def post(self, path: str, body: bytes | str | dict[str, Any]) -> Any:
        data = (
            json.dumps(body).encode()
            if isinstance(body, dict)
            else (body.encode() if isinstance(body, str) else body)
        )
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    def upload(self, path: Path) -> str:
        """Store one file through the REST API; returns its Orthanc instance id."""
        return str(self.post("/instances", path.read_bytes())["ID"])

    def instance_uids(self) -> set[str]:
        uids = set()
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            uids.add(str(tags["SOPInstanceUID"]))
        return uids

    def study_objects(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID of every instance in the study with this
        Study Instance UID (none while Orthanc has no such study)."""
        found = self.post("/tools/lookup", study_uid)
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        objects: dict[str, str] = {}
        for study in studies:
            for instance in self.get(f"/studies/{study}/instances"):
                sop_class = self.get_text(f"/instances/{instance['ID']}/metadata/SopClassUid")
                objects[str(instance["MainDicomTags"]["SOPInstanceUID"])] = sop_class.strip()
        return objects
