"""``pipeline.intake_pace``: the pre-scorer waits while instances arrive at full speed."""

from __future__ import annotations

from pathlib import Path

from lungnode.db.migrate import upgrade
from lungnode.db.repo import NodeRepository
from lungnode.db.session import make_engine, make_session_factory
from lungnode.pipeline.intake_pace import IntakePace
from tests.support.facts import axial_ct_facts

SERIES = "1.2.826.0.1.3680043.8.498.78"


class _Intake:
    """A clock and a newest instance id that the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.newest: int | None = None

    def clock(self) -> float:
        return self.now

    def newest_id(self) -> int | None:
        return self.newest


def test_a_burst_is_busy_and_a_trickle_is_not() -> None:
    intake = _Intake()
    pace = IntakePace(intake.newest_id, busy_rate=100, clock=intake.clock, min_interval=0.05)
    assert pace() is False  # nothing measured yet
    intake.newest, intake.now = 60, intake.now + 0.2  # 300 a second
    assert pace() is True
    intake.newest, intake.now = 62, intake.now + 0.2  # 10 a second
    assert pace() is False
    intake.newest, intake.now = 62, intake.now + 5.0  # idle
    assert pace() is False


def test_between_samples_the_last_answer_stands() -> None:
    intake = _Intake()
    intake.newest = 1
    pace = IntakePace(intake.newest_id, busy_rate=100, clock=intake.clock, min_interval=0.05)
    pace()
    intake.newest, intake.now = 41, intake.now + 0.1  # 400 a second
    assert pace() is True
    intake.newest, intake.now = 41, intake.now + 0.01  # too soon to sample again
    assert pace() is True
    intake.now += 0.1
    assert pace() is False


def test_rows_removed_count_as_nothing_arriving() -> None:
    intake = _Intake()
    intake.newest = 500
    pace = IntakePace(intake.newest_id, clock=intake.clock)
    pace()
    intake.newest, intake.now = 3, intake.now + 0.2
    assert pace() is False


def test_the_pace_of_a_real_database(tmp_path: Path) -> None:
    """``NodeRepository.newest_instance_id``, as the node's pre-scorer reads it."""
    url = f"sqlite:///{tmp_path / 'lungnode.db'}"
    upgrade(url)
    repo = NodeRepository(make_session_factory(make_engine(url)), tmp_path)
    assert repo.newest_instance_id() is None
    intake = _Intake()
    pace = IntakePace(repo.newest_instance_id, clock=intake.clock)
    assert pace() is False
    association = repo.association_started("CT01", None)
    for index in range(40):
        facts = axial_ct_facts(SERIES, index)
        assert repo.register_instance(facts, tmp_path / f"{index}.dcm", 1, association)
    intake.now += 0.2  # 40 in 0.2 s: 200 a second, above the default rate
    assert pace() is True
    newest = repo.newest_instance_id()
    assert newest is not None and newest >= 40
    intake.now += 1.0  # nothing more arrived
    assert pace() is False
