"""The CPU priority of the node's analysis threads: intake first.

A node that receives and analyses on the same cores must not keep a sender
waiting for the model. An acknowledgement waits on the receiving thread, and
the analysis can wait a moment. So the threads that analyse run at a lower
priority (a higher nice value) than the rest of the process. Linux gives each
thread its own nice value, and a thread inherits the one of the thread that
creates it:

- the slice pre-scorer's thread (``pipeline.prescore``, ``PRESCORE_NICENESS``);
- the model's compute threads: the thread pools TensorFlow creates the first
  time the model runs. The warm-up thread (``pipeline.warmup``) lowers its own
  priority by ``MODEL_NICENESS`` before it loads the model, so the pools inherit
  it. A series job's Python thread keeps the process's priority, and its
  forward passes run on those pools.

On an idle machine a nice value changes nothing. On a busy one, measured with
``scripts/bench_ingest.py`` on 2 cores (``docs/benchmarks.md``), one
association with pre-scoring received 235 against 210 instances/s: a
TensorFlow pool at the process's priority took the core that the receiving
thread woke up on.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

#: How much lower the model's compute threads run than the process (nice). They
#: never hold the interpreter lock while they compute, so nothing waits on them
#: for it; the warm-up thread that creates them holds it only while it loads.
MODEL_NICENESS = 10


def lower_thread_priority(by: int) -> None:
    """Raise the calling thread's nice value by ``by`` (Linux, where each thread has
    its own; elsewhere a no-op, as it would lower the whole process). Never raises:
    at worst the thread keeps the process's priority."""
    if by <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        niceness = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, niceness + by))
    except OSError as exc:
        logger.info("a thread keeps the process's CPU priority: %s", exc)
