"""``pipeline.intake_pace``: the pre-scorer waits while instances arrive at full speed."""

from __future__ import annotations

from lungnode.pipeline.intake_pace import BUSY_RATE, IntakePace


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


def test_the_default_rate_tells_a_sender_at_full_speed_from_a_trickle() -> None:
    # Several hundred 512x512 slices a second from one association here; a PACS
    # over a slow link sends a few dozen.
    assert 30 < BUSY_RATE < 250
