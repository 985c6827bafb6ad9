"""Deterministic output UIDs and Series Numbers."""

from __future__ import annotations

import uuid

import pytest
from pydicom.uid import UID

from lungnode.dicom.uids import OutputSeries, series_number, uuid_derived_uid
from lungnode.domain import ModelIdentity

MODEL = ModelIdentity(name="demo", version="1.0.0", sha256="0" * 64)
SOURCE = "1.2.826.0.1.3680043.8.498.1"


def test_same_inputs_give_the_same_uids() -> None:
    first = OutputSeries.for_model(SOURCE, MODEL, 1, "sc")
    second = OutputSeries.for_model(SOURCE, MODEL, 1, "sc")
    assert first.series_instance_uid == second.series_instance_uid
    assert [first.sop_instance_uid(i) for i in range(3)] == [
        second.sop_instance_uid(i) for i in range(3)
    ]


def test_uids_are_valid_uuid_derived_uids() -> None:
    output = OutputSeries.for_model(SOURCE, MODEL, 1, "sr")
    for uid in (output.series_instance_uid, output.sop_instance_uid(0)):
        assert uid.startswith("2.25.")
        assert UID(uid).is_valid
        assert len(uid) <= 64


def test_uids_are_pinned() -> None:
    """A changed derivation would duplicate every result re-sent after an upgrade."""
    output = OutputSeries.for_model(SOURCE, MODEL, 1, "pdf")
    assert output.series_instance_uid == "2.25.113772638570103408368223714307786935658"
    assert output.sop_instance_uid(0) == "2.25.261346005582611218576322682359304404371"
    # The name-based UUID (RFC 9562 version 5) of the length-prefixed part "1:a".
    expected = uuid.uuid5(uuid.UUID("3fe9dd9f-adc5-532d-82ef-5406f881ecb2"), "1:a")
    assert expected.version == 5
    assert uuid_derived_uid("a") == f"2.25.{expected.int}"


@pytest.mark.parametrize(
    "change",
    [
        {"analysis_version": 2},
        {"model_version": "1.0.1"},
        {"model_name": "other"},
        {"kind": "pdf"},
        {"kind": "pm"},
        {"kind": "kos"},
        {"source_series_uid": SOURCE + ".2"},
    ],
)
def test_any_identifying_change_gives_new_uids(change: dict[str, object]) -> None:
    base = {
        "source_series_uid": SOURCE,
        "model_name": "demo",
        "model_version": "1.0.0",
        "analysis_version": 1,
        "kind": "sc",
    }
    first = OutputSeries(**base)  # type: ignore[arg-type]
    second = OutputSeries(**{**base, **change})  # type: ignore[arg-type]
    assert first.series_instance_uid != second.series_instance_uid
    assert first.sop_instance_uid(0) != second.sop_instance_uid(0)


def test_instances_and_series_differ() -> None:
    output = OutputSeries.for_model(SOURCE, MODEL, 1, "sc")
    uids = {output.series_instance_uid, *(output.sop_instance_uid(i) for i in range(10))}
    assert len(uids) == 11


def test_parts_cannot_run_into_each_other() -> None:
    assert uuid_derived_uid("a|b", "c") != uuid_derived_uid("a", "b|c")
    assert uuid_derived_uid("ab", "c") != uuid_derived_uid("a", "bc")


def test_series_numbers_are_fixed() -> None:
    kinds = ("sc", "pdf", "sr", "pm", "kos")
    assert [series_number(kind, 1) for kind in kinds] == [9011, 9012, 9013, 9014, 9015]
    assert series_number("sr", 2) == 9023
    assert OutputSeries.for_model(SOURCE, MODEL, 0, "sc").series_number == 9001


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "seg", "analysis_version": 1},
        {"kind": "sc", "analysis_version": -1},
        {"kind": "sc", "analysis_version": 2**31},
    ],
)
def test_bad_inputs_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        series_number(**kwargs)  # type: ignore[arg-type]


def test_empty_source_and_negative_index_raise() -> None:
    with pytest.raises(ValueError, match="source_series_uid"):
        OutputSeries("", "demo", "1", 1, "sc")
    with pytest.raises(ValueError, match="index"):
        OutputSeries(SOURCE, "demo", "1", 1, "sc").sop_instance_uid(-1)
