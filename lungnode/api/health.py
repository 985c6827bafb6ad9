"""``GET /api/v1/health``: unauthenticated; 200, or 503 naming the failing check."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

from apiflask import APIBlueprint
from flask import jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from lungnode.api import context

health_blueprint = APIBlueprint("health", __name__, tag="health")

_hash_cache: dict[tuple[str, float, int], str] = {}
_hash_lock = threading.Lock()


def _check_database() -> dict[str, Any]:
    with context.engine().connect() as connection:
        connection.execute(text("SELECT 1"))
    return {"ok": True}


#: Room above the reserve that the disk check asks for: one more CT slice (a
#: 512 x 512 slice is half a MiB), so that it fails as soon as C-STORE may answer
#: 0xA700, with ``min_free_disk_mb`` 0 too.
HEADROOM_MB = 1


def _check_disk() -> dict[str, Any]:
    """Free space in ``storage_dir``: at least the reserve below which C-STORE answers
    0xA700 (``min_free_disk_mb``), plus :data:`HEADROOM_MB`."""
    settings = context.settings()
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.storage_dir).free
    reserved_mb = settings.min_free_disk_mb
    ok = free >= (reserved_mb + HEADROOM_MB) * 2**20
    result: dict[str, Any] = {"ok": ok, "free_mb": free // 2**20, "reserved_mb": reserved_mb}
    if not ok:
        result["error"] = (
            f"storage full: {free / 2**20:.1f} MiB free, {reserved_mb} MiB reserved; "
            "C-STORE answers 0xA700 (out of resources) to what does not fit, and "
            "analysis jobs wait for space"
        )
    return result


def _check_scp() -> dict[str, Any]:
    status = context.node_status()
    if status is not None:
        return {"ok": status.scp_listening}
    settings = context.settings()
    host = "127.0.0.1" if settings.dicom_host in ("0.0.0.0", "::", "") else settings.dicom_host
    return _associate(host, settings.dicom_port, settings.ae_title)


def _associate(host: str, port: int, ae_title: str) -> dict[str, Any]:
    """Ask the SCP for an association and end it (PS3.8 7.1-7.3), twice before saying
    it did not answer.

    A bare TCP connection that sends nothing would hold one of the SCP's association
    slots until its network timeout; an A-ASSOCIATE answer, accepted or rejected
    (the API's AE need not be a peer of the node), proves the SCP is there, and the
    association ends at once. The reactor's fixes are installed first: without them
    pynetdicom can take a quick rejection for an abort (``dicom.reactor``), and did,
    once in CI. A second try, because a failing check can get the SCP restarted by
    its supervisor, and one missed answer is not worth that.
    """
    from lungnode.dicom import reactor  # pynetdicom: only for a probe

    reactor.install()
    answer = _associate_once(host, port, ae_title)
    return answer if answer["ok"] else _associate_once(host, port, ae_title)


def _associate_once(host: str, port: int, ae_title: str) -> dict[str, Any]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2
    ae.add_requested_context(Verification)
    with warnings.catch_warnings():
        # pynetdicom drops the socket of a refused connection unclosed; it is closed
        # when collected, here, without a ResourceWarning.
        warnings.simplefilter("ignore", ResourceWarning)
        association = ae.associate(host, port, ae_title=ae_title)
        answered = association.is_established or association.is_rejected
        if association.is_established:
            association.release()
        del association
        gc.collect()
    if answered:
        return {"ok": True}
    return {"ok": False, "error": f"no DICOM answer from {host}:{port}"}


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    with _hash_lock:
        _hash_cache[key] = digest.hexdigest()
    return digest.hexdigest()


def _check_model() -> dict[str, Any]:
    """The bundle's manifest is readable and the weights match its hash (no TensorFlow here),
    and the model's state: ``warming``, ``ready`` or ``failed`` in a node, which warms its
    model at start; ``on_demand`` or ``ready`` for the API alone, which loads it at the
    first prediction.

    Warming is ok: the node receives and stores while it warms, and jobs wait for
    the model, so a load balancer must not take it out of service (a PACS would
    then be refused for nothing). A failed warm-up fails the check: the node
    can receive, but never analyse.
    """
    settings = context.settings()
    candidate = Path(settings.model)
    bundle = candidate if candidate.is_dir() else settings.models_dir / settings.model
    manifest_path = bundle / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        weights = bundle / manifest["weights"]
        ok = _sha256(weights) == manifest["sha256"]
    except (OSError, KeyError, ValueError) as exc:
        return {"ok": False, "error": f"model bundle {settings.model!r} unusable: {exc}"}
    result: dict[str, Any] = {
        "ok": ok,
        "name": manifest.get("name"),
        "version": manifest.get("version"),
    }
    if not ok:
        result["error"] = "weights do not match the manifest's sha256"
    source = context.model_source()
    if source is not None:
        status = source.status()
        result["state"] = status["state"]
        if "warm_up_seconds" in status:
            result["warm_up_seconds"] = status["warm_up_seconds"]
        if status["state"] == "failed":
            result["ok"] = False
            result["error"] = status.get("error", "the model failed to load")
    else:
        result["state"] = "ready" if context.model_loaded() else "on_demand"
    return result


CHECKS = {
    "database": _check_database,
    "disk": _check_disk,
    "scp": _check_scp,
    "model": _check_model,
}


_HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["ok", "failing"]},
        "failing": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "object", "additionalProperties": {"type": "object"}},
    },
    "required": ["status", "failing", "checks"],
}


@health_blueprint.get("/health")
@health_blueprint.doc(
    responses={  # type: ignore[arg-type]  # APIFlask accepts this shape
        200: {
            "description": "Every check passes",
            "content": {"application/json": {"schema": _HEALTH_SCHEMA}},
        },
        503: {
            "description": "A check fails; failing names it",
            "content": {"application/json": {"schema": _HEALTH_SCHEMA}},
        },
    }
)
def health() -> ResponseReturnValue:
    """Unauthenticated: 200 when the database, disk, SCP and model checks pass, else 503."""
    results: dict[str, Any] = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check()
        except Exception as exc:
            results[name] = {"ok": False, "error": str(exc)}
    failing = [name for name, result in results.items() if not result["ok"]]
    body = {"status": "ok" if not failing else "failing", "failing": failing, "checks": results}
    return jsonify(body), 200 if not failing else 503
