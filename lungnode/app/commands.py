"""What the node's own commands do: serve, db, user, send, deliveries, jobs, cleanup.

``lungnode.cli`` parses the arguments and calls these. Each opens what it
needs through this package (:func:`lungnode.app.database.open_database`).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from lungnode import __version__
from lungnode.app.autograph_files import remove_autograph_files
from lungnode.app.database import open_database
from lungnode.config import Settings
from lungnode.errors import ConfigError, ListenError

logger = logging.getLogger("lungnode")


def _log_settings(settings: Settings) -> None:
    logger.info("lungnode %s, effective settings:", __version__)
    for name, value in settings.masked().items():
        logger.info("  %s = %s", name, value)


def _no_huge_pages_for_numpy() -> None:
    """Ask NumPy not to madvise huge pages for its large arrays (unless the user chose).

    Each series job fills a fresh volume (300 slices of 512x512 float32: 315 MB).
    With huge pages madvised and the kernel's usual ``defrag = madvise``, the
    first such allocations wait on memory compaction: the first series after a
    start took 1.5x a warm one, all of it in decoding, and 0.9x without
    (``scripts/bench_cold_start.py``, docs/benchmarks.md). NumPy reads the
    variable once, at import: this runs before the node imports NumPy.
    """
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    _no_huge_pages_for_numpy()
    from lungnode.app.node import Node

    settings.check_safe_to_start()
    settings.check_safe_to_serve_http()
    if settings.queue == "celery":
        raise ConfigError(
            "lungnode serve runs the local queue; with LUNGNODE_QUEUE=celery run the "
            "roles instead: lungnode scp, api, worker and beat (docs/deploy.md)"
        )
    _log_settings(settings)
    node = Node(settings, analyse=True)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        node.start()
    except ListenError:
        node.stop()  # what started before the port was refused: stopped, not left
        raise
    logger.info("ready: DICOM %s on port %d", settings.ae_title, node.scp.port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        left_running = node.stop()
    if left_running or "tensorflow" in sys.modules:
        # Everything durable is closed. A job given up by the stop (queued again)
        # or the model's warm-up may still run on a daemon thread, inside
        # TensorFlow: end now rather than let the interpreter tear its modules
        # down under it; and TensorFlow's own teardown takes about a second
        # that saves nothing.
        remove_autograph_files()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.db.migrate import upgrade

    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, args.revision)
    print(f"database at revision {args.revision}")
    return 0


def cmd_user_add(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from lungnode.db.models import Role, User
    from lungnode.db.repo import NodeRepository
    from lungnode.passwords import hash_password

    role = Role(args.role)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.username}: ")
        if password != getpass.getpass("again: "):
            print("passwords differ", file=sys.stderr)
            return 2
    if len(password) < 8:
        print("password must have at least 8 characters", file=sys.stderr)
        return 2
    with open_database(settings) as database:
        with database.sessions.begin() as session:
            if session.scalar(select(User.id).where(User.username == args.username)) is not None:
                print(f"user {args.username!r} exists", file=sys.stderr)
                return 1
            session.add(
                User(
                    username=args.username,
                    email=args.email,
                    role=role.value,
                    password_hash=hash_password(password),
                )
            )
        NodeRepository(database.sessions, settings.storage_dir).audit(
            "cli", "user.add", args.username, {"role": role.value}
        )
    print(f"user {args.username!r} added with role {role.value}")
    return 0


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lungnode.dicom.scu import Destination, Outcome, SendResult, iter_dicom_files, send_files

    destination = Destination.parse(args.to)
    paths = iter_dicom_files([Path(p) for p in args.paths])
    if not paths:
        print("no DICOM files found", file=sys.stderr)
        return 2
    failures: list[SendResult] = []
    with tqdm(total=len(paths), unit="instance", disable=args.quiet) as bar:

        def _on_sent(result: SendResult) -> None:
            if result.outcome is not Outcome.DELIVERED:
                failures.append(result)
            bar.update(1)

        send_files(paths, destination, calling_ae=args.calling_ae, on_sent=_on_sent)
    if failures and len(failures) == len(paths) and len({f.error for f in failures}) == 1:
        print(f"FAILED: {failures[0].error}", file=sys.stderr)
        failures_shown: list[SendResult] = []
    else:
        failures_shown = failures[:20]
    for failure in failures_shown:
        status = f"0x{failure.status:04X}" if failure.status is not None else "no status"
        print(f"FAILED {failure.path}: {status} {failure.error or ''}", file=sys.stderr)
    print(f"sent {len(paths) - len(failures)} of {len(paths)} to {args.to}")
    return 0 if not failures else 1


def cmd_deliveries_list(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.db.deliveries import DeliveryRepository

    with open_database(settings) as database:
        dead = DeliveryRepository(database.sessions, settings.storage_dir).dead_letters()
    if not dead:
        print("no dead letters")
    for row in dead:
        print(
            f"{row.id}\t{row.destination}\t{row.sop_instance_uid}\tattempts={row.attempts}"
            f"\t{row.updated_at:%Y-%m-%d %H:%M:%S}\t{row.last_error or ''}"
        )
    return 0


def cmd_deliveries_retry(settings: Settings, args: argparse.Namespace) -> int:
    if not args.all and not args.ids:
        print("name delivery ids, or --all", file=sys.stderr)
        return 2
    from lungnode.db.deliveries import DeliveryRepository

    with open_database(settings) as database:
        repo = DeliveryRepository(database.sessions, settings.storage_dir)
        count = repo.retry(None if args.all else list(args.ids))
    print(f"{count} dead letter(s) queued again; a running node sends them within seconds")
    return 0


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.db.jobs import JobRepository
    from lungnode.db.models import JobState

    with open_database(settings) as database:
        jobs = JobRepository(database.sessions).jobs(JobState(args.state) if args.state else None)
    if not jobs:
        print(f"no {args.state} jobs" if args.state else "no jobs")
    for job in jobs:
        due = (
            f"\tnext attempt {job.next_attempt_at:%Y-%m-%d %H:%M:%S}" if job.next_attempt_at else ""
        )
        print(
            f"{job.id}\tseries {job.series_id} v{job.version}\t{job.state}"
            f"\tattempts={job.attempts}{due}\t{job.reason or job.last_error or ''}"
        )
    return 0


def cmd_jobs_retry(settings: Settings, args: argparse.Namespace) -> int:
    if not args.all and not args.ids:
        print("name job ids, or --all", file=sys.stderr)
        return 2
    from lungnode.db.jobs import JobRepository
    from lungnode.db.repo import NodeRepository

    with open_database(settings) as database:
        retried = JobRepository(database.sessions).retry_failed_jobs(
            None if args.all else list(args.ids)
        )
        if retried:
            NodeRepository(database.sessions, settings.storage_dir).audit(
                "cli", "job.retry", ",".join(str(i) for i in retried)
            )
    not_failed = sorted(set(args.ids) - set(retried)) if not args.all else []
    if not_failed:
        print(f"not failed, left alone: {' '.join(map(str, not_failed))}", file=sys.stderr)
    print(f"{len(retried)} failed job(s) queued again; a running node starts them within seconds")
    return 1 if not_failed else 0


def cmd_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.app.housekeeping import Housekeeping

    with open_database(settings) as database:
        deleted = Housekeeping(settings, database.sessions).run_once()
    print(
        f"deleted {len(deleted)} upload(s) older than {settings.upload_retention_hours:g} h "
        "that no prediction refers to"
    )
    return 0
