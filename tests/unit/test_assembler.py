"""The series completion rules, as pure functions."""

from __future__ import annotations

import random

from hypothesis import assume, given
from hypothesis import strategies as st

from lungnode.series.assembler import (
    RULE_ASSOCIATION_RELEASED,
    RULE_DECLARED_COUNT,
    RULE_QUIET_TIMER,
    CompletionRules,
    InstanceGeometry,
    SeriesSnapshot,
    check_stack,
    decide,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
RULES = CompletionRules(quiet_seconds=15.0, grace_seconds=2.0, spacing_tolerance=0.1)


def stack(
    n: int,
    spacing: float = 1.25,
    start: float = -100.0,
    skip: set[int] | None = None,
    orientation: tuple[float, ...] = AXIAL,
) -> list[InstanceGeometry]:
    skip = skip or set()
    return [
        InstanceGeometry((-150.0, -150.0, start + i * spacing), orientation)  # type: ignore[arg-type]
        for i in range(n)
        if i not in skip
    ]


def snapshot(
    instances: list[InstanceGeometry],
    declared: int | None = None,
    *,
    last: float = 100.0,
    open_: bool = True,
    released: bool = False,
    ended: float | None = None,
) -> SeriesSnapshot:
    return SeriesSnapshot(instances, declared, last, open_, released, ended)


def test_declared_count_met_completes_at_once() -> None:
    decision = decide(snapshot(stack(40), declared=40), now=100.0, rules=RULES)
    assert decision.complete and decision.rule == RULE_DECLARED_COUNT


def test_while_senders_send_short_of_a_declared_count_the_stack_is_not_judged() -> None:
    """No rule could complete the series yet: the decision says what it waits for,
    and leaves the stack (a gap here) to the moment a rule could use it."""
    gapped = stack(40, skip={7})
    for declared in (None, 40):
        waiting = decide(snapshot(gapped, declared, last=100.0), now=101.0, rules=RULES)
        assert not waiting.complete
        assert waiting.recheck_in == RULES.quiet_seconds - 1.0
        assert waiting.reason.endswith(": 39 instances")
    released = snapshot(gapped, last=100.0, open_=False, released=True, ended=100.5)
    judged = decide(released, now=101.0, rules=RULES)
    assert not judged.complete and "gap" in judged.reason


def test_declared_count_not_met_waits() -> None:
    decision = decide(snapshot(stack(39), declared=40), now=100.0, rules=RULES)
    assert not decision.complete
    assert decision.recheck_in == RULES.quiet_seconds


def test_gap_blocks_declared_count_and_release() -> None:
    gapped = stack(41, skip={20})
    assert len(gapped) == 40
    check = check_stack(gapped)
    assert not check.even and "gap" in check.reason
    assert not decide(snapshot(gapped, declared=40), now=100.0, rules=RULES).complete
    released = snapshot(gapped, open_=False, released=True, ended=100.0)
    assert not decide(released, now=110.0, rules=RULES).complete
    # ... but the quiet timer completes it anyway, and says why.
    late = decide(released, now=115.0, rules=RULES)
    assert late.complete and late.rule == RULE_QUIET_TIMER and "gap" in late.reason


def test_release_plus_grace_completes_even_stack() -> None:
    released = snapshot(stack(30), open_=False, released=True, ended=101.0)
    waiting = decide(released, now=102.0, rules=RULES)
    assert not waiting.complete and waiting.recheck_in is not None
    assert abs(waiting.recheck_in - 1.0) < 1e-9
    done = decide(released, now=103.0, rules=RULES)
    assert done.complete and done.rule == RULE_ASSOCIATION_RELEASED


def test_second_association_still_open_blocks_release_rule() -> None:
    # One association released, a second one for the same series still sending.
    both = snapshot(stack(30), open_=True, released=False, ended=101.0)
    assert not decide(both, now=110.0, rules=RULES).complete


def test_aborted_sender_waits_for_quiet_timer() -> None:
    aborted = snapshot(stack(30), open_=False, released=False, ended=101.0)
    assert not decide(aborted, now=105.0, rules=RULES).complete
    assert decide(aborted, now=115.0, rules=RULES).rule == RULE_QUIET_TIMER


def test_duplicate_positions_and_mixed_orientation_are_not_one_stack() -> None:
    duplicate = stack(10) + stack(1)
    assert "share one position" in check_stack(duplicate).reason
    mixed = stack(5) + stack(5, start=0.0, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    assert "orientation" in check_stack(mixed).reason


def test_missing_geometry_and_multiframe() -> None:
    assert not check_stack([InstanceGeometry(None, None)] * 3).even
    assert check_stack([InstanceGeometry(None, None, number_of_frames=200)]).even


@given(
    n=st.integers(min_value=2, max_value=400),
    spacing=st.floats(min_value=0.3, max_value=10.0),
    start=st.floats(min_value=-1000.0, max_value=1000.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_even_stack_in_any_arrival_order(n: int, spacing: float, start: float, seed: int) -> None:
    instances = stack(n, spacing=spacing, start=start)
    random.Random(seed).shuffle(instances)
    assert check_stack(instances).even
    assert decide(snapshot(instances, declared=n), now=0.0, rules=RULES).complete


@given(
    n=st.integers(min_value=4, max_value=300),
    spacing=st.floats(min_value=0.3, max_value=10.0),
    data=st.data(),
)
def test_any_missing_inner_slice_is_a_gap(n: int, spacing: float, data: st.DataObject) -> None:
    missing = data.draw(st.integers(min_value=1, max_value=n - 2))
    instances = stack(n, spacing=spacing, skip={missing})
    assert not check_stack(instances).even
    assert not decide(snapshot(instances, declared=n - 1), now=0.0, rules=RULES).complete


@given(quiet=st.floats(min_value=0.0, max_value=100.0))
def test_quiet_timer_always_completes_eventually(quiet: float) -> None:
    assume(quiet >= RULES.quiet_seconds)
    decision = decide(
        snapshot([InstanceGeometry(None, None)] * 2, last=0.0), now=quiet, rules=RULES
    )
    assert decision.complete and decision.rule == RULE_QUIET_TIMER
