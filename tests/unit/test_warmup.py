"""WarmModel: one load, whoever asks first; its state; a failure named (no TensorFlow here).

The warm-up with a real model and a real node is in ``tests/api/test_model_warmup.py``.
"""

from __future__ import annotations

import os
import sys
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from lungnode.errors import BundleError
from lungnode.pipeline.cpu_priority import MODEL_NICENESS
from lungnode.pipeline.warmup import ModelState, WarmModel
from tests.conftest import unavailable


class Loads:
    """A load that waits for ``gate`` and counts its calls."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0
        self.bundle = SimpleNamespace(identity=SimpleNamespace(name="tiny", version="0.0.1"))

    def __call__(self) -> Any:
        self.calls += 1
        self.gate.wait(10)
        return self.bundle


def test_every_caller_waits_for_the_one_warm_up() -> None:
    loads = Loads()
    warmed: list[Any] = []
    model = WarmModel(loads, warm=warmed.append)
    got: list[Any] = []
    callers = [threading.Thread(target=lambda: got.append(model.bundle())) for _ in range(4)]
    for caller in callers:
        caller.start()
    model.start()
    assert model.state is ModelState.WARMING
    assert model.status() == {"state": "warming"}
    loads.gate.set()
    for caller in callers:
        caller.join(10)
    assert got == [loads.bundle] * 4
    assert loads.calls == 1 and warmed == [loads.bundle]
    assert model.state is ModelState.READY
    assert model.status()["state"] == "ready" and model.status()["warm_up_seconds"] >= 0


def test_a_failed_warm_up_is_said_and_raised() -> None:
    def load() -> Any:
        raise BundleError("cannot load model.keras: not a zip file")

    model = WarmModel(load)
    model.start()
    with pytest.raises(BundleError, match="failed to load: cannot load model.keras"):
        model.bundle()
    assert model.state is ModelState.FAILED
    assert model.status()["error"] == "cannot load model.keras: not a zip file"


def test_a_caller_may_bound_its_wait() -> None:
    loads = Loads()
    model = WarmModel(loads, warm=lambda _bundle: None)
    model.start()
    with pytest.raises(BundleError, match="still warming"):
        model.bundle(timeout=0.05)
    loads.gate.set()
    assert model.bundle(timeout=10) is loads.bundle


def test_threads_the_model_makes_while_it_loads_run_at_the_lower_priority() -> None:
    """TensorFlow's pools are made on the warm-up thread the first time the model runs:
    made there, a thread inherits the warm-up thread's nice value (Linux)."""
    if not sys.platform.startswith("linux"):
        unavailable("a per-thread nice value is Linux's")
    seen: dict[str, int] = {}

    def load() -> Any:
        seen["warm-up"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def pool() -> None:
            seen["pool"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        thread = threading.Thread(target=pool)
        thread.start()
        thread.join(10)
        return Loads().bundle

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    model = WarmModel(load, warm=lambda _bundle: None, niceness=MODEL_NICENESS)
    model.start()
    model.bundle(timeout=10)
    assert seen == {
        "warm-up": min(19, base + MODEL_NICENESS),
        "pool": min(19, base + MODEL_NICENESS),
    }
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
