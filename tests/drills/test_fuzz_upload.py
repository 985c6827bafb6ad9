"""Fuzzing drill, target 3: the single-image upload (``POST /predict`` with a file, and
``POST /upload``) on mutated PNG, JPEG and DICOM bodies.

The app runs with a small real model (the API tests' untrained bundle), through
Flask's test client, so that an exception in a view is seen here as it would be
logged in a server. Each example mutates a valid picture or CT instance, or sends
random bytes, under a random file name, part content type and, now and then, a
request content type that is not multipart at all. Every answer must be below 500;
an error must be the documented JSON shape with a code documented for its status
(docs/api.md, "Errors"); and no partial upload may be left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from tests.api import conftest as api_fixtures
from tests.api.conftest import API, jpeg_bytes, png_bytes
from tests.drills.conftest import Drill
from tests.drills.fuzzing import (
    Tally,
    apply_edits,
    ct_seeds,
    edits,
    escapes_fail,
    fuzz_settings,
    hot_end,
    report,
    time_bound,
)

# The API tests' fixtures, for this module: an app with users, and the small model.
make_api = api_fixtures.make_api
tiny_bundle = api_fixtures.tiny_bundle

#: The codes docs/api.md documents for each status an upload may answer.
KNOWN_CODES: dict[int, frozenset[str]] = {
    400: frozenset({"bad_request"}),
    413: frozenset({"payload_too_large"}),
    415: frozenset({"unsupported_media_type"}),
    422: frozenset(
        {"validation_error", "unreadable_image", "image_too_small", "not_analysed", "not_ct"}
    ),
    503: frozenset({"model_unavailable", "model_warming"}),
}
ENDPOINTS = ("/api/v1/predict", "/api/v1/upload")
PART_TYPES = (
    "application/octet-stream",
    "image/png",
    "image/jpeg",
    "application/dicom",
    "text/plain; charset=utf-8",
    "",
)
BOUNDARY = "lungnode-fuzz-boundary"
#: Longest one request may take before it counts as a hang (seconds): a prediction
#: with the small model takes well under one.
TIME_BOUND_S = 60.0


def _bodies(directory: Path) -> list[tuple[str, bytes]]:
    seeds = [("PNG", png_bytes(48, seed=3)), ("JPEG", jpeg_bytes(48))]
    seeds += [(f"DICOM {seed.name}", seed.data) for seed in ct_seeds(directory)]
    return seeds


def _multipart(field: str, filename: str | None, part_type: str, content: bytes) -> bytes:
    disposition = f'form-data; name="{field}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if part_type:
        head += f"Content-Type: {part_type}\r\n"
    return (
        head.encode("utf-8", "surrogateescape")
        + b"\r\n"
        + content
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["scan.png", "IM0001", "../../etc/passwd", "a.dcm", "x" * 300, ""]
)
request_types = st.sampled_from(
    [
        f"multipart/form-data; boundary={BOUNDARY}",
        "multipart/form-data",
        "multipart/form-data; boundary=other",
        "application/json",
        "application/x-www-form-urlencoded",
        "image/png",
    ]
)


def _check_answer(status: int, body: Any, endpoint: str) -> str:
    """The answer is documented; its outcome, for the tally."""
    assert status < 500, (status, body)
    assert isinstance(body, dict), (status, body)
    if status == 201:
        assert ("prediction_id" if endpoint.endswith("predict") else "file_id") in body, body
        return "201 created"
    assert status in KNOWN_CODES, (status, body)
    error = body.get("error")
    assert isinstance(error, dict) and set(error) == {"code", "message", "details"}, body
    assert error["code"] in KNOWN_CODES[status], (status, body)
    return f"{status} {error['code']}"


@pytest.mark.drill
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_upload_answers_mutated_images_with_documented_errors(
    drill: Drill, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    bundle = request.getfixturevalue("tiny_bundle")
    api: API = request.getfixturevalue("make_api")(model=str(bundle))
    headers = api.headers("radiologist")
    seeds = _bodies(tmp_path / "seeds")
    uploads = api.settings.storage_dir / "uploads"
    tally = Tally("upload (POST /predict, /upload)")

    @fuzz_settings(drill, short=150, long=5_000, deadline_s=TIME_BOUND_S)
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        endpoint = data.draw(st.sampled_from(ENDPOINTS), label="endpoint")
        index = data.draw(st.integers(-1, len(seeds) - 1), label="seed")
        if index < 0:
            content = data.draw(st.binary(max_size=2048), label="random bytes")
        else:
            name, seed = seeds[index]
            note(f"seed: {name}")
            content = apply_edits(seed, data.draw(edits(len(seed), hot_end(seed)), label="edits"))
        # Mostly a well-formed part, so that most examples reach the image readers.
        odd_part = data.draw(st.integers(0, 9), label="odd part") == 0
        field = data.draw(st.sampled_from(["image", ""]), label="field") if odd_part else "file"
        filename = data.draw(names, label="filename")
        if odd_part and data.draw(st.booleans(), label="no filename"):
            filename = None  # a plain form field, not a file
        part_type = data.draw(st.sampled_from(PART_TYPES), label="part type")
        body = _multipart(field, filename, part_type, content)
        request_type = (
            data.draw(request_types, label="request type")
            if data.draw(st.integers(0, 9), label="odd request") == 0
            else f"multipart/form-data; boundary={BOUNDARY}"
        )
        with escapes_fail(), tally.example(), time_bound(TIME_BOUND_S):
            response = api.client.post(
                endpoint, data=body, content_type=request_type, headers=headers
            )
        outcome = _check_answer(response.status_code, response.get_json(silent=True), endpoint)
        tally.saw(outcome)
        leftovers = list(uploads.glob(".*.part")) if uploads.is_dir() else []
        assert not leftovers, leftovers

    fuzz()
    report(drill, tally)
