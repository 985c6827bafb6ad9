"""The reactor checkpoint is a barrier: a send never loses its response to the
association's own thread (``dicom.reactor``, the fifth fix)."""

from __future__ import annotations

import threading
import time
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

from lungnode.dicom import reactor


def _association() -> Any:
    assert reactor.install()
    assoc: Any = Association(AE(), mode="requestor")
    assert isinstance(assoc._reactor_checkpoint, reactor.Checkpoint)
    return assoc


def _take_on_association_thread(assoc: Any) -> object:
    """What ``get_msg(block=False)`` returns on the association's own thread."""
    taken: list[object] = []
    assoc.run = lambda: taken.append(assoc.dimse.get_msg(block=False))
    assoc.start()
    assoc.join(5)
    return taken[0]


def test_the_association_thread_takes_nothing_while_a_send_holds_the_checkpoint() -> None:
    response = (1, "C-STORE-RSP")
    running = _association()
    running.dimse.msg_queue.put(response)
    assert _take_on_association_thread(running) == response  # not paused: it serves

    paused = _association()
    paused.dimse.msg_queue.put(response)
    paused._reactor_checkpoint.clear()  # a send pauses the reactor
    assert _take_on_association_thread(paused) == (None, None)
    assert paused.dimse.get_msg(block=True) == response  # the send gets its response


def test_a_pause_waits_for_a_take_under_way() -> None:
    checkpoint = _association()._reactor_checkpoint
    cleared = threading.Event()
    with checkpoint.taking:  # the association's thread is taking a message
        pauser = threading.Thread(target=lambda: (checkpoint.clear(), cleared.set()))
        pauser.start()
        time.sleep(0.2)
        assert not cleared.is_set()
    pauser.join(5)
    assert cleared.is_set() and not checkpoint.is_set()
