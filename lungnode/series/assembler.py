"""When is a series complete? Pure rules over instance metadata.

DICOM has no "end of series" message, so every node guesses. lungnode decides
in this order (see DESIGN.md, Series completeness):

1. ``declared_count``: complete now, when the instance count equals a declared
   total (ImagesInAcquisition, PS3.3 C.7.6.1) and the slice positions form one
   evenly spaced stack with no gap.
2. ``association_released``: complete after a short grace, when every
   association that sent instances of the series has been released (not
   aborted) and the stack is even.
3. ``quiet_timer``: complete after the quiet timer otherwise, whatever the stack.

Rule 4, a late instance after analysis started, is the caller's business: it
puts the series back to receiving, and the next completion queues a new
version of the analysis.

Whether the positions form one even stack is ``imaging.geometry.slice_stack``
(PS3.3 C.7.6.2.1.1), the same function decoding sorts a series with, under
the one spacing tolerance (the ``series_spacing_tolerance`` setting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lungnode.imaging.geometry import SPACING_TOLERANCE, slice_stack

RULE_DECLARED_COUNT = "declared_count"
RULE_ASSOCIATION_RELEASED = "association_released"
RULE_QUIET_TIMER = "quiet_timer"


@dataclass(frozen=True)
class InstanceGeometry:
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    number_of_frames: int = 1


@dataclass(frozen=True)
class StackCheck:
    even: bool
    reason: str
    spacing_mm: float | None = None


@dataclass(frozen=True)
class CompletionRules:
    quiet_seconds: float = 15.0
    grace_seconds: float = 2.0
    #: Largest relative deviation of a slice step from the median step
    #: (``imaging.geometry.slice_stack``).
    spacing_tolerance: float = SPACING_TOLERANCE


@dataclass(frozen=True)
class SeriesSnapshot:
    """What is known of a receiving series at one moment (times in seconds, one clock)."""

    instances: Sequence[InstanceGeometry]
    declared_count: int | None
    last_received_at: float
    #: True while an association that sent instances of this series is still open.
    senders_open: bool
    #: True when every association that sent instances ended by a release.
    senders_released: bool
    #: When the last of those associations ended; None if none has.
    last_sender_ended_at: float | None


@dataclass(frozen=True)
class Decision:
    complete: bool
    rule: str | None
    reason: str
    #: Seconds until the decision could change with no new input; None if complete.
    recheck_in: float | None = None
    #: The rule that completes the series when ``recheck_in`` has passed with no new
    #: input, if one will: ``association_released`` while its grace runs. A node
    #: may prepare the analysis meanwhile (``pipeline.series_job``).
    awaiting: str | None = None


def check_stack(
    instances: Sequence[InstanceGeometry], tolerance: float = SPACING_TOLERANCE
) -> StackCheck:
    """Do the instances form one evenly spaced stack of parallel slices with no gap?

    Single-frame instances are judged by ``imaging.geometry.slice_stack``.
    The frames of a multi-frame instance carry their geometry in functional
    groups that intake does not keep, so one such instance counts as a stack
    and several cannot be judged.
    """
    if not instances:
        return StackCheck(False, "no instances")
    if len(instances) == 1 and instances[0].number_of_frames > 1:
        return StackCheck(True, "one multi-frame instance")
    if any(i.number_of_frames > 1 for i in instances):
        return StackCheck(False, "several multi-frame instances: frame geometry not checked")
    stack = slice_stack(
        [i.position for i in instances], [i.orientation for i in instances], tolerance
    )
    return StackCheck(stack.even, stack.reason, stack.spacing_mm)


def decide(snapshot: SeriesSnapshot, now: float, rules: CompletionRules) -> Decision:
    """Apply the completion rules in order; the first that holds wins.

    The stack is checked only when a rule could complete the series now or start
    its grace: while senders are still sending, short of a declared count, the
    check would decide nothing, and on a long series it is most of what a pass of
    the completion timer costs.
    """
    count = len(snapshot.instances)
    declared = snapshot.declared_count
    quiet = now - snapshot.last_received_at
    counted = declared is not None and declared > 0 and count == declared
    released = (
        not snapshot.senders_open
        and snapshot.senders_released
        and snapshot.last_sender_ended_at is not None
    )
    if not (counted or released or quiet >= rules.quiet_seconds):
        waiting_for = "declared count" if declared else "sender release or quiet timer"
        return Decision(
            False,
            None,
            f"waiting for {waiting_for}: {count} instances",
            rules.quiet_seconds - quiet,
        )
    stack = check_stack(snapshot.instances, rules.spacing_tolerance)
    if counted and stack.even:
        return Decision(
            True, RULE_DECLARED_COUNT, f"{count} of {declared} declared; {stack.reason}"
        )

    waits: list[float] = []
    awaiting = None
    if released and snapshot.last_sender_ended_at is not None and stack.even:
        waited = now - snapshot.last_sender_ended_at
        if waited >= rules.grace_seconds:
            return Decision(
                True,
                RULE_ASSOCIATION_RELEASED,
                f"sender released {waited:.1f} s ago; {stack.reason}",
            )
        waits.append(rules.grace_seconds - waited)
        awaiting = RULE_ASSOCIATION_RELEASED

    if quiet >= rules.quiet_seconds:
        return Decision(True, RULE_QUIET_TIMER, f"no instance for {quiet:.1f} s; {stack.reason}")
    waits.append(rules.quiet_seconds - quiet)

    waiting_for = "declared count" if declared else "sender release or quiet timer"
    return Decision(
        False,
        None,
        f"waiting for {waiting_for}: {count} instances; {stack.reason}",
        min(waits),
        awaiting,
    )
