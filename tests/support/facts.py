"""The facts the intake records of an axial CT slice, for tests that register
instances in a repository without sending them."""

from __future__ import annotations

from lungnode.domain import InstanceFacts

STUDY = "1.2.826.0.1.3680043.8.498.7"


def axial_ct_facts(series: str, index: int, declared: int | None = None) -> InstanceFacts:
    """Slice ``index`` (from 0) of ``series``, 1.25 mm apart, of ``declared`` slices."""
    return InstanceFacts(
        study_instance_uid=STUDY,
        series_instance_uid=series,
        sop_instance_uid=f"{series}.{index + 1}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
        series_number=1,
        instance_number=index + 1,
        number_of_frames=1,
        position=[0.0, 0.0, 1.25 * index],
        orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        declared_count=declared,
    )
