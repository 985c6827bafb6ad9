"""Sending result objects to a DICOMweb origin server by STOW-RS (PS3.18 10.5).

The request is built by ``dicomweb-client`` (multipart/related;
type="application/dicom", PS3.18 8.6.1.2.1), one per batch: the objects of one
study, to its study-scoped resource ``/studies/{StudyInstanceUID}`` (PS3.18
10.5.1), at most the destination's ``max_instances`` objects and about its
``max_bytes``. The client's own retries are off: the outbox owns the back-off.

Each instance's outcome is classified like a C-STORE's (:class:`scu.Outcome`),
from the response (PS3.18 10.5.3, Store Instances Response Module, Table 10.5.3-1):

- 200 (every instance stored): delivered;
- 202 (some stored): per instance, one in the ReferencedSOPSequence is delivered
  (a WarningReason too, as a C-STORE warning is), one in the FailedSOPSequence
  is retried when its FailureReason is 0xA7xx (out of resources) and final
  otherwise; one in neither is retried;
- 409 (none stored): per instance, by its FailureReason as for 202; one not in
  the FailedSOPSequence is retried (it failed with the others); a 409 without a
  readable body is final for all;
- 400, 401, 403, 404, 413, 415 and every other 4xx but 408 and 429: final, a
  dead letter with the reason (a wrong URL, credentials, or a payload the server
  refuses is not fixed by waiting);
- 408, 429, 5xx, no connection, a timeout, a TLS failure: retried with back-off.

``status`` of a result is the HTTP status, or the FailureReason of a failed
instance; ``status_text`` says which.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
import urllib3
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from lungnode.dicom.scu import Outcome, SendResult
from lungnode.peers import DicomwebPeer

logger = logging.getLogger(__name__)

_JSON_TYPES = ("application/dicom+json", "application/json")
#: 4xx answers worth waiting for: Request Timeout, Too Early, Too Many Requests.
_RETRY_4XX = frozenset({408, 425, 429})
#: PS3.18 Table 10.5.3-2 and PS3.4 Table B.2-1: what a FailureReason means.
_FAILURE_MEANINGS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xC122: "transfer syntax not supported",
}
_warned_unverified: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class Instance:
    """One result object to store, with what batching needs to know of it."""

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    size: int


def failure_meaning(reason: int) -> str:
    """A FailureReason in words (PS3.18 10.5.3, PS3.4 B.2.3)."""
    if reason in _FAILURE_MEANINGS:
        return _FAILURE_MEANINGS[reason]
    if (reason & 0xFF00) == 0xA700:
        return "out of resources"
    if (reason & 0xFF00) == 0xA900:
        return "data set does not match SOP class"
    if (reason & 0xF000) == 0xC000:
        return "cannot understand"
    return "failed"


def classify_failure_reason(reason: int | None) -> Outcome:
    """0xA7xx (out of resources) is worth retrying; any other failure is final."""
    if reason is not None and (reason & 0xFF00) == 0xA700:
        return Outcome.RETRY
    return Outcome.FINAL


def classify_http_status(status: int) -> Outcome:
    """What a response status without per-instance detail means (module docstring)."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in _RETRY_4XX or status >= 500:
        return Outcome.RETRY
    return Outcome.FINAL


def batches(
    instances: Sequence[Instance], max_instances: int, max_bytes: int
) -> Iterator[list[Instance]]:
    """The instances by study (in their order), each study cut into requests of at
    most ``max_instances`` instances and about ``max_bytes`` (a larger one goes alone)."""
    by_study: dict[str, list[Instance]] = {}
    for instance in instances:
        by_study.setdefault(instance.study_instance_uid, []).append(instance)
    for study in by_study.values():
        batch: list[Instance] = []
        size = 0
        for instance in study:
            if batch and (len(batch) >= max_instances or size + instance.size > max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(instance)
            size += instance.size
        if batch:
            yield batch


def send_instances(
    paths: Sequence[Path],
    peer: DicomwebPeer,
    *,
    timeout: float = 30.0,
    on_sent: Callable[[SendResult], None] | None = None,
) -> list[SendResult]:
    """Store the files at ``peer`` by STOW-RS, one request per batch; one result per file."""
    results: list[SendResult] = []
    instances: list[Instance] = []
    for path in paths:
        try:
            header = dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"]
            )
            instances.append(
                Instance(
                    path,
                    str(header.SOPInstanceUID),
                    str(header.StudyInstanceUID),
                    path.stat().st_size,
                )
            )
        except (OSError, InvalidDicomError, AttributeError) as exc:
            results.append(
                SendResult(path, None, Outcome.FINAL, f"cannot read the result file: {exc}")
            )
    for batch in batches(instances, peer.max_instances, peer.max_bytes):
        results.extend(_send_batch(batch, peer, timeout))
    if on_sent:
        for result in results:
            on_sent(result)
    return results


def _session(peer: DicomwebPeer) -> requests.Session:
    session = requests.Session()
    # Environment settings (REQUESTS_CA_BUNDLE, proxies, .netrc) would override the
    # destination's own TLS and credentials: the settings say everything.
    session.trust_env = False
    session.verify = str(peer.ca_bundle) if peer.ca_bundle is not None else peer.verify
    if peer.secret is not None and peer.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {peer.secret.get_secret_value()}"
    elif peer.secret is not None and peer.auth == "basic":
        session.auth = (peer.username or "", peer.secret.get_secret_value())
    if not peer.verify:
        with _warned_lock:
            if peer.name not in _warned_unverified:
                _warned_unverified.add(peer.name)
                logger.warning("DICOMweb peer %s: TLS certificates are not verified", peer.name)
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return session


def _send_batch(batch: Sequence[Instance], peer: DicomwebPeer, timeout: float) -> list[SendResult]:
    datasets: list[Dataset] = []
    unreadable: list[SendResult] = []
    readable: list[Instance] = []
    for instance in batch:
        try:
            datasets.append(dcmread(instance.path))
            readable.append(instance)
        except (OSError, InvalidDicomError) as exc:
            unreadable.append(
                SendResult(
                    instance.path, None, Outcome.FINAL, f"cannot read the result file: {exc}"
                )
            )
    if not readable:
        return unreadable
    return unreadable + _post(readable, datasets, peer, timeout)


def _post(
    batch: Sequence[Instance], datasets: Sequence[Dataset], peer: DicomwebPeer, timeout: float
) -> list[SendResult]:
    """One STOW-RS request for the batch, classified."""
    responses: list[requests.Response] = []

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        responses.append(response)
        return response

    study = batch[0].study_instance_uid
    session = _session(peer)
    try:
        client = DICOMwebClient(
            peer.url,
            session=session,
            headers={"Accept": "application/dicom+json"},
            callback=keep,
            # One body with a Content-Length, never chunked transfer encoding: some
            # servers and proxies refuse the latter, and the body is in memory anyway.
            chunk_size=2**62,
            timeout=(timeout, timeout),
        )
        client.set_http_retry_params(retry=False)
        client.store_instances(datasets, study_instance_uid=study)
    except requests.HTTPError as exc:
        if exc.response is None:
            return _all(batch, None, Outcome.RETRY, f"no response: {exc}", "no response")
        return _classify(batch, exc.response)
    except (requests.Timeout, requests.ConnectionError) as exc:
        return _all(batch, None, Outcome.RETRY, _short(f"{peer.url}: {exc}"), "no response")
    except requests.TooManyRedirects as exc:
        return _all(batch, None, Outcome.FINAL, _short(f"{peer.url}: {exc}"), "redirects")
    except requests.RequestException as exc:
        return _all(batch, None, Outcome.RETRY, _short(f"{peer.url}: {exc}"), "no response")
    except (KeyError, ValueError):
        # dicomweb-client could not read the response body (a media type it does not
        # expect); the response itself is still classified below.
        if not responses:
            raise
    finally:
        session.close()
    return _classify(batch, responses[-1])


def _classify(batch: Sequence[Instance], response: requests.Response) -> list[SendResult]:
    status = response.status_code
    status_text = f"HTTP {status}"
    phrase = _phrase(response)
    if not (200 <= status < 300 or status == 409):
        detail = _detail(response)
        error = f"{phrase}{': ' + detail if detail else ''}"
        return _all(batch, status, classify_http_status(status), error, status_text)
    body = _response_dataset(response)
    if status == 409 and body is None:
        return _all(batch, status, Outcome.FINAL, f"{phrase}: no response body", status_text)
    failed: dict[str, int | None] = {}
    stored: set[str] = set()
    if body is not None:
        for item in body.get("FailedSOPSequence", []):
            reason = item.get("FailureReason")
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = (
                int(reason) if reason is not None else None
            )
        for item in body.get("ReferencedSOPSequence", []):
            stored.add(str(item.get("ReferencedSOPInstanceUID", "")))
    results = []
    for instance in batch:
        uid = instance.sop_instance_uid
        if uid in failed:
            reason = failed[uid]
            if reason is None:
                results.append(
                    SendResult(
                        instance.path,
                        status,
                        Outcome.FINAL,
                        f"failed without a FailureReason ({status_text})",
                        status_text,
                    )
                )
            else:
                results.append(
                    SendResult(
                        instance.path,
                        reason,
                        classify_failure_reason(reason),
                        f"{failure_meaning(reason)} ({status_text})",
                        f"FailureReason 0x{reason:04X}",
                    )
                )
        elif uid in stored or status not in (202, 409):
            results.append(SendResult(instance.path, status, Outcome.DELIVERED, None, status_text))
        else:
            results.append(
                SendResult(
                    instance.path,
                    status,
                    Outcome.RETRY,
                    f"{phrase}: not in the response's stored or failed instances",
                    status_text,
                )
            )
    return results


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The Store Instances Response Module of a DICOM JSON body (PS3.18 F.2), or None."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not response.content:
        return None
    # Tolerant when reading: Orthanc answers a 409 with a DICOM JSON body and no
    # Content-Type at all.
    if media_type not in _JSON_TYPES and not (
        media_type == "" and response.content.lstrip().startswith(b"{")
    ):
        return None
    try:
        return Dataset.from_json(response.text)
    except (ValueError, TypeError, KeyError):
        logger.warning("unreadable STOW-RS response body (HTTP %d)", response.status_code)
        return None


def _phrase(response: requests.Response) -> str:
    try:
        return HTTPStatus(response.status_code).phrase
    except ValueError:
        return response.reason or "unknown status"


def _detail(response: requests.Response) -> str:
    """A short excerpt of a plain-text or JSON error body (an operator's hint)."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type not in ("text/plain", "application/json") or not response.content:
        return ""
    return _short(" ".join(response.text.split()), 200)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _all(
    batch: Sequence[Instance],
    status: int | None,
    outcome: Outcome,
    error: str,
    status_text: str,
) -> list[SendResult]:
    return [SendResult(i.path, status, outcome, error, status_text) for i in batch]
