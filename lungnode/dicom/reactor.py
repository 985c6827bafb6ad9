"""pynetdicom's reactor threads, woken by events instead of fixed sleeps.

Every pynetdicom association runs two polling loops. The DUL thread sleeps
``_run_loop_delay`` (1 ms) whenever it finds nothing to do, and the
association thread sleeps 1 ms before each look for a decoded DIMSE message.
On a C-STORE that means up to three such sleeps per instance: before the
request's PDUs are read, before the handler is called, and before the
response goes out. At a few milliseconds per instance that is a fifth of the
time of a single association (``scripts/bench_ingest.py``). Shorter sleeps
win that back on one association but burn the CPU that several associations
need, so the sleeps become waits that end early on the event they wait for:

- the DUL thread waits for its socket to become readable or for a primitive
  to be queued for sending (the queueing thread writes to a pipe the DUL
  thread watches), at most ``_run_loop_delay`` as before;
- the association thread waits on its DIMSE message queue, at most 1 ms as
  before.

Only those two sleeps change, and only in those threads; their upper bounds
stay pynetdicom's. Installed once per process by :func:`install`; against a
pynetdicom whose internals differ from what this expects, it installs nothing
and logs why, and pynetdicom keeps its own behaviour.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pynetdicom.association as association_module
import pynetdicom.dul as dul_module
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

logger = logging.getLogger(__name__)

#: The association reactor's per-loop sleep in pynetdicom (association.py).
_ASSOCIATION_SLEEP_S = 0.001

_lock = threading.Lock()
_installed = False


def install() -> bool:
    """Patch pynetdicom's two reactor sleeps (module docstring); idempotent.

    Returns True when the waits are in place, False when this pynetdicom does
    not look as expected (nothing is changed then).
    """
    global _installed
    with _lock:
        if _installed:
            return True
        expected = (
            getattr(association_module, "time", None) is time
            and getattr(dul_module, "time", None) is time
            and callable(getattr(DULServiceProvider, "run_reactor", None))
            and callable(getattr(DULServiceProvider, "send_pdu", None))
        )
        if not expected:
            logger.warning("reactor waits not installed: unexpected pynetdicom internals")
            return False
        patches: dict[tuple[object, str], object] = {
            (DULServiceProvider, "run_reactor"): _with_wake_pipe(DULServiceProvider.run_reactor),
            (DULServiceProvider, "send_pdu"): _waking(DULServiceProvider.send_pdu),
            (dul_module, "time"): _time_with_sleep(_dul_sleep),
            (association_module, "time"): _time_with_sleep(_association_sleep),
        }
        for (owner, name), replacement in patches.items():
            setattr(owner, name, replacement)
        _installed = True
        logger.debug("pynetdicom reactor waits installed")
        return True


def _time_with_sleep(sleep: Callable[[float], None]) -> types.ModuleType:
    """The ``time`` module as the patched module sees it: everything as is but ``sleep``."""
    module = types.ModuleType("time", time.__doc__)
    for name in dir(time):
        if not name.startswith("__"):
            setattr(module, name, getattr(time, name))
    module.sleep = sleep  # type: ignore[attr-defined]
    return module


class _WakePipe:
    """A pipe that other threads write to so that one DUL thread wakes up.

    Writing and closing take the same lock: once closed, a descriptor number
    may be reused by any file the process opens next, and a late write must
    never land there.
    """

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write_fd, b"\0")
            except OSError:
                pass  # full: the thread has wake-ups pending anyway

    def drain(self) -> None:
        """Called by the woken thread only."""
        try:
            while os.read(self.read_fd, 512):
                pass
        except OSError:
            pass  # empty (EAGAIN)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.read_fd)
            os.close(self._write_fd)


def _with_wake_pipe(run_reactor: Callable[[Any], None]) -> Callable[[Any], None]:
    def run_reactor_with_wake_pipe(dul: Any) -> None:
        pipe = _WakePipe()
        dul._lungnode_wake = pipe
        try:
            run_reactor(dul)
        finally:
            dul._lungnode_wake = None
            pipe.close()

    return run_reactor_with_wake_pipe


def _waking(send_pdu: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def send_pdu_and_wake(dul: Any, primitive: Any) -> None:
        send_pdu(dul, primitive)
        pipe = getattr(dul, "_lungnode_wake", None)
        if pipe is not None:
            pipe.wake()

    return send_pdu_and_wake


def _dul_sleep(seconds: float) -> None:
    """In a DUL thread: wait for the socket or a queued primitive, at most ``seconds``."""
    dul = threading.current_thread()
    wake = getattr(dul, "_lungnode_wake", None)
    transport = getattr(dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if not isinstance(dul, DULServiceProvider) or wake is None or sock is None:
        time.sleep(seconds)
        return
    if not dul.to_provider_queue.empty():
        return
    try:
        readable, _, _ = select.select([sock, wake.read_fd], [], [], seconds)
    except (OSError, ValueError):  # the socket closed under us: let pynetdicom see it
        time.sleep(seconds)
        return
    if wake.read_fd in readable:
        wake.drain()


def _association_sleep(seconds: float) -> None:
    """In an association thread's reactor: wait for a DIMSE message, at most ``seconds``."""
    assoc = threading.current_thread()
    if seconds != _ASSOCIATION_SLEEP_S or not isinstance(assoc, Association):
        time.sleep(seconds)
        return
    messages = assoc.dimse.msg_queue
    # not_empty shares the queue's mutex, so look at the deque itself
    # (qsize() would take that mutex a second time).
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(seconds)
        if messages.queue:
            # Queue.put wakes one waiter only. A send_*() of this association waits
            # for its response in get_msg() on this same condition (pynetdicom pauses
            # this reactor first, but its pause can race): pass on the wake-up this
            # wait may have taken, or that thread sleeps until its DIMSE timeout.
            messages.not_empty.notify()
