"""More than one process receiving on the DICOM port (``ingest_processes``).

One Python process receives on one core at a time: pynetdicom's threads and
the C-STORE handlers take turns on the interpreter lock, so four associations
into one process are no faster than one (``scripts/bench_ingest.py``). With
``ingest_processes`` N > 1 the node still accepts every connection on its
one listening socket, and hands each to the least busy of N receivers: itself
or one of N-1 worker processes (a worker first when they are equally busy: the
node's own interpreter also runs the analysis). The hand-over passes the
accepted socket's file descriptor over a Unix socket (SCM_RIGHTS); the worker
then runs the association exactly as the node would, with the same SCP
handlers (``dicom.scp``), the same intake (file written and fsynced, row
committed, then 0x0000) and the same database. TLS is negotiated by whichever process
runs the association.

Each worker tells the node, over the same Unix socket, when a connection
closes (so the node knows how busy it is) and when an association that sent
instances ends (so the completion timer looks at its series at once, as it
does for the node's own associations). A worker that loses the node (stop,
crash, ``kill -9``) sees its Unix socket close, stops receiving and exits;
what it acknowledged is on disk and in the database already.

A worker that stops while the node runs (a crash, ``kill -9``, the OOM
killer) is restarted after a back-off that doubles from 1 s to 60 s (and
starts again from 1 s once a worker has lived 60 s); meanwhile the others
and the node take its connections. A worker exits 0 only when the node closes
its channel or on SIGTERM; a SIGTERM to the whole process group (a service
manager's stop) reaches the worker at the same moment as the node, so the
worker may be gone before the node has begun to stop. Such an exit is waited
on for a few seconds: if the node stops meanwhile, it was a clean stop and
nothing is logged as a fault; if not, the worker was stopped alone, which is
said (a warning) and it is restarted.

Workers never import TensorFlow: they only receive.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from lungnode.dicom.scp import SCPConfig, StorageSCP

logger = logging.getLogger(__name__)

#: Worker -> node messages (one byte each, on a SOCK_SEQPACKET pair).
READY = b"R"
CONNECTION_CLOSED = b"C"
ASSOCIATION_ENDED = b"E"

#: Seconds the node waits at start for a worker to be ready to receive.
_READY_SECONDS = 60.0

#: Seconds a stopping node waits for each worker to exit before killing it.
_JOIN_SECONDS = 10.0

#: Back-off before restarting a worker that stopped while the node runs: it
#: doubles from the first to the last, and starts again from the first once a
#: worker has lived as long as the last.
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 60.0

#: Seconds to wait, after a worker exited 0, for the node's own stop to begin
#: (a SIGTERM to the process group reaches the worker and the node at once).
_STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to receive as the node does (picklable)."""

    scp: SCPConfig
    database_url: str
    incoming_dir: Path
    #: Instance paths are recorded relative to it.
    storage_dir: Path
    min_free_bytes: int
    log_level: str
    #: The intake's page cache window (``dicom.page_cache``); None: no window.
    page_cache_bytes: int | None = None
    #: The worker's own connection pool (``db_pool_size``, ``db_max_overflow``).
    db_pool_size: int = 5
    db_max_overflow: int = 10


#: The main of a worker process: (config, channel to the node, worker name).
WorkerMain = Callable[["WorkerConfig", socket.socket, str], None]


@dataclass
class _Slot:
    """One receiver: slot 0 is the node itself, the others are worker processes."""

    name: str
    channel: socket.socket | None = None
    process: BaseProcess | None = None
    active: int = 0
    handed_over: int = 0
    #: Taking connections: the node always; a worker from its READY until it is gone.
    alive: bool = False
    ready: threading.Event = field(default_factory=threading.Event)
    #: time.monotonic() when the current process was started.
    started_at: float = 0.0
    #: One thread at a time waits for the process: two waitpid() calls race,
    #: and the loser would take a reaped worker for a live one.
    reaping: threading.Lock = field(default_factory=threading.Lock)


class IngestWorkers:
    """Starts the worker processes and chooses the receiver of each new connection."""

    def __init__(
        self,
        config: WorkerConfig,
        workers: int,
        on_association_ended: Callable[[], None],
        worker_main: WorkerMain,
    ) -> None:
        """``worker_main(config, channel, name)`` is the worker process's main: the
        wiring layer's (``lungnode.app.ingest_worker.run_worker``), importable by
        name in a spawned process. It receives on ``channel`` with the protocol below."""
        if workers < 1:
            raise ValueError("need at least one worker process")
        self.config = config
        self.on_association_ended = on_association_ended
        self.worker_main = worker_main
        self._slots = [_Slot("node", alive=True)]
        self._slots += [_Slot(f"ingest-{k}") for k in range(1, workers + 1)]
        self._lock = threading.Lock()
        #: Held while a process is started or the workers are told to stop, so
        #: that no worker starts once the stop has begun.
        self._life_lock = threading.Lock()
        self._next = 0
        self._readers: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._context = multiprocessing.get_context("spawn")

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        for slot in self._slots[1:]:
            self._spawn(slot)
            reader = threading.Thread(
                target=self._supervise, args=(slot,), name=f"{slot.name}-reader", daemon=True
            )
            reader.start()
            self._readers.append(reader)
        # Connections handed to a worker that is still starting would wait for
        # it: take none until each says it is ready (a second or so).
        for slot in self._slots[1:]:
            if not slot.ready.wait(_READY_SECONDS):
                logger.error("%s did not start; receiving without it", slot.name)
        ready = sum(1 for slot in self._slots if slot.alive)
        logger.info("receiving in %d process(es): the node and %d worker(s)", ready, ready - 1)

    def stopping(self) -> None:
        """The node has begun to stop: a worker that exits now is not a fault, nor restarted.

        The node says so first thing in its stop, before the SCP stops, so that a
        worker that got the same SIGTERM as the node is seen as part of the stop.
        """
        self._stopping.set()

    def stop(self) -> None:
        """Close the channels (workers stop receiving and exit); wait for them."""
        with self._life_lock:
            self._stopping.set()
            slots = list(self._slots[1:])
        for slot in slots:
            if slot.channel is not None:
                try:
                    slot.channel.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                slot.channel.close()
        for slot in slots:
            with slot.reaping:
                if slot.process is not None:
                    slot.process.join(_JOIN_SECONDS)
                    if slot.process.is_alive():
                        logger.warning("%s did not stop; killing it", slot.name)
                        slot.process.kill()
                        slot.process.join(_JOIN_SECONDS)
        for reader in self._readers:
            reader.join(1.0)

    def _spawn(self, slot: _Slot) -> bool:
        """Start the worker process of ``slot``; False when the node is stopping."""
        with self._life_lock:
            if self._stopping.is_set():
                return False
            node_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            process = self._context.Process(
                target=self.worker_main,
                args=(self.config, worker_end, slot.name),
                name=f"lungnode-{slot.name}",
                daemon=True,
            )
            process.start()
            worker_end.close()
            slot.channel, slot.process = node_end, process
            slot.started_at = time.monotonic()
            return True

    def _supervise(self, slot: _Slot) -> None:
        """Read the worker's messages; when it is gone, say why and start another."""
        delay = RESTART_FIRST_SECONDS
        while True:
            self._read(slot)
            with self._lock:
                slot.alive, slot.active = False, 0
            slot.ready.set()  # a worker that died starting is not waited for
            if self._stopping.is_set():
                return  # stop() waits for the process
            exitcode = self._reap(slot)
            if self._stopping.is_set():
                return
            if exitcode == 0 and self._stopping.wait(_STOP_GRACE_SECONDS):
                return  # the same SIGTERM as the node's: part of a clean stop
            if time.monotonic() - slot.started_at >= RESTART_MAX_SECONDS:
                delay = RESTART_FIRST_SECONDS
            if exitcode == 0:
                logger.warning(
                    "%s exited (exit code 0, as on a SIGTERM of its own) while the node runs; "
                    "receiving without it, restarting it in %g s",
                    slot.name,
                    delay,
                )
            else:
                logger.error(
                    "%s stopped unexpectedly (%s); receiving without it, restarting it in %g s",
                    slot.name,
                    _describe_exit(exitcode),
                    delay,
                )
            if self._stopping.wait(delay) or not self._spawn(slot):
                return
            delay = min(delay * 2, RESTART_MAX_SECONDS)
            assert slot.process is not None
            logger.info("%s restarted (pid %s)", slot.name, slot.process.pid)

    def _reap(self, slot: _Slot) -> int | None:
        """The exit code of the worker whose channel closed (killed if it lingers)."""
        process = slot.process
        if slot.channel is not None:
            slot.channel.close()
        if process is None:
            return None
        with slot.reaping:
            process.join(_JOIN_SECONDS)
            if process.exitcode is None and not self._stopping.is_set():
                process.kill()  # it closed its channel but did not exit: it is of no use
                process.join(_JOIN_SECONDS)
            return process.exitcode

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots[1:] if s.process and s.process.pid]

    def handed_over(self) -> dict[str, int]:
        """Connections handed to each worker since start (for status and tests)."""
        with self._lock:
            return {s.name: s.handed_over for s in self._slots[1:]}

    # -- dispatch ------------------------------------------------------------------

    def choose(self) -> int:
        """The slot for a new connection: the least busy live one. Among equally busy
        ones a worker comes before the node, which also runs the series jobs, the
        slice pre-scorer and the API on its interpreter lock; workers take turns."""
        with self._lock:
            live = [i for i, s in enumerate(self._slots) if s.alive]
            fewest = min(self._slots[i].active for i in live)
            candidates = [i for i in live if self._slots[i].active == fewest]
            workers = [i for i in candidates if i != 0]
            if workers:
                candidates = workers
            self._next += 1
            chosen = candidates[self._next % len(candidates)]
            self._slots[chosen].active += 1
            return chosen

    def local_closed(self) -> None:
        """A connection the node ran itself has closed."""
        with self._lock:
            self._slots[0].active = max(0, self._slots[0].active - 1)

    def hand_over(self, index: int, connection: socket.socket, address: Any) -> bool:
        """Pass ``connection`` to worker ``index``; False if that worker is gone.

        The node's copy of the descriptor is the caller's to close.
        """
        slot = self._slots[index]
        message = json.dumps(list(address)).encode()
        try:
            if slot.channel is None:
                raise OSError("no channel")
            socket.send_fds(slot.channel, [message], [connection.fileno()])
        except OSError as exc:
            logger.error("%s cannot take a connection (%s); receiving it here", slot.name, exc)
            with self._lock:
                slot.alive = False
                slot.active = 0
                self._slots[0].active += 1
            return False
        with self._lock:
            slot.handed_over += 1
        return True

    def _read(self, slot: _Slot) -> None:
        assert slot.channel is not None
        while True:
            try:
                message = slot.channel.recv(16)
            except OSError:
                message = b""
            if not message:
                break
            if message == READY:
                with self._lock:
                    slot.alive = True
                slot.ready.set()
            elif message == CONNECTION_CLOSED:
                with self._lock:
                    slot.active = max(0, slot.active - 1)
            elif message == ASSOCIATION_ENDED:
                self.on_association_ended()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running, killed"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# -- the worker's side of the channel ------------------------------------------------


class NodeChannel:
    """A worker's end of its channel: tells the node what happened, takes connections."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self._send_lock = threading.Lock()

    def tell(self, message: bytes) -> None:
        with self._send_lock:
            try:
                self.channel.send(message)
            except OSError:
                pass  # the node is gone; receive_connections ends too

    def receive_connections(self, scp: StorageSCP) -> None:
        """Say READY, then run each handed-over connection until the node closes its end."""
        self.tell(READY)
        while True:
            try:
                message, fds, _flags, _address = socket.recv_fds(self.channel, 1024, 4)
            except OSError:
                return
            if not message and not fds:
                return  # the node closed its end
            for fd in fds:
                connection = socket.socket(fileno=fd)
                try:
                    address = tuple(json.loads(message))
                except ValueError:
                    address = ("", 0)
                scp.receive(connection, address)
