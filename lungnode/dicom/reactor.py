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


def _with_wake_pipe(run_reactor: Callable[[Any], None]) -> Callable[[Any], None]:
    def run_reactor_with_wake_pipe(dul: Any) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        dul._lungnode_wake = (read_fd, write_fd)
        try:
            run_reactor(dul)
        finally:
            dul._lungnode_wake = None
            os.close(read_fd)
            os.close(write_fd)

    return run_reactor_with_wake_pipe


def _waking(send_pdu: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def send_pdu_and_wake(dul: Any, primitive: Any) -> None:
        send_pdu(dul, primitive)
        wake = getattr(dul, "_lungnode_wake", None)
        if wake is not None:
            try:
                os.write(wake[1], b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (the thread is awake anyway) or closing

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
        readable, _, _ = select.select([sock, wake[0]], [], [], seconds)
    except (OSError, ValueError):  # the socket closed under us: let pynetdicom see it
        time.sleep(seconds)
        return
    if wake[0] in readable:
        try:
            while os.read(wake[0], 512):
                pass
        except (BlockingIOError, OSError):
            pass


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
