"""``lungnode ...`` commands: argument parsing, logging set-up, exit codes.

Each command calls into :mod:`lungnode.app`, the one place that joins the
layers into processes; this module parses arguments and configures logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lungnode import __version__
from lungnode.app import commands, model_commands, roles
from lungnode.config import load_settings
from lungnode.errors import ConfigError, LungnodeError

logger = logging.getLogger("lungnode")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO, highdicom every module it copies into an
    # output: keep their warnings and errors only.
    for chatty in ("pynetdicom", "highdicom"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lungnode {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True)

    serve = subcommands.add_parser("serve", help="run the DICOM SCP, the API and the workers")
    serve.set_defaults(func=commands.cmd_serve)

    # The scaled roles (queue = "celery"): one process each, any number of hosts.
    scp = subcommands.add_parser(
        "scp", help="scaled role: receive DICOM, assemble series, queue jobs on Celery"
    )
    scp.set_defaults(func=roles.cmd_scp)
    api = subcommands.add_parser(
        "api", help="scaled role: the REST API under gunicorn (api_workers x api_threads)"
    )
    api.set_defaults(func=roles.cmd_api)
    worker = subcommands.add_parser(
        "worker",
        help="scaled role: a Celery worker that analyses series, sends results and "
        "runs batch predictions",
    )
    worker.add_argument(
        "--queues",
        default="jobs,deliveries,predictions",
        help="comma-separated: jobs (loads the model), deliveries, predictions "
        "(batch-predict items; loads the model) (default: all three)",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="job processes, each with its own model (default: worker_concurrency)",
    )
    worker.set_defaults(func=roles.cmd_worker)
    beat = subcommands.add_parser(
        "beat", help="scaled role: re-send lost jobs, schedule deliveries, housekeeping (one)"
    )
    beat.set_defaults(func=roles.cmd_beat)

    db = subcommands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="apply the migrations")
    db_upgrade.add_argument("revision", nargs="?", default="head")
    db_upgrade.set_defaults(func=commands.cmd_db_upgrade)

    user = subcommands.add_parser("user", help="API users")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    user_add = user_commands.add_parser("add", help="add a user")
    user_add.add_argument("username")
    user_add.add_argument(
        "--role", default="viewer", choices=["admin", "radiologist", "viewer", "sender"]
    )
    user_add.add_argument("--email")
    user_add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    user_add.set_defaults(func=commands.cmd_user_add)

    send = subcommands.add_parser("send", help="send DICOM files or folders with C-STORE")
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--to", required=True, metavar="AE@HOST:PORT")
    send.add_argument("--calling-ae", default="LUNGNODE")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.set_defaults(func=commands.cmd_send)

    deliveries = subcommands.add_parser("deliveries", help="result deliveries (the outbox)")
    delivery_commands = deliveries.add_subparsers(dest="deliveries_command", required=True)
    deliveries_list = delivery_commands.add_parser("list", help="list the dead letters")
    deliveries_list.set_defaults(func=commands.cmd_deliveries_list)
    deliveries_retry = delivery_commands.add_parser("retry", help="send dead letters again")
    deliveries_retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    deliveries_retry.add_argument("--all", action="store_true", help="every dead letter")
    deliveries_retry.set_defaults(func=commands.cmd_deliveries_retry)

    jobs = subcommands.add_parser("jobs", help="analysis jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_list = jobs_commands.add_parser("list", help="list jobs, with attempts and last error")
    jobs_list.add_argument("--state", choices=["queued", "running", "done", "failed"])
    jobs_list.set_defaults(func=commands.cmd_jobs_list)
    jobs_retry = jobs_commands.add_parser("retry", help="run failed jobs again")
    jobs_retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    jobs_retry.add_argument("--all", action="store_true", help="every failed job")
    jobs_retry.set_defaults(func=commands.cmd_jobs_retry)

    cleanup = subcommands.add_parser(
        "cleanup", help="delete old uploads that no prediction refers to (upload_retention_hours)"
    )
    cleanup.set_defaults(func=commands.cmd_cleanup)
    predict = subcommands.add_parser(
        "predict", help="classify a DICOM file, a series folder, a PNG or a JPEG"
    )
    predict.add_argument("path", metavar="PATH", help="DICOM file, folder of one series, PNG, JPG")
    predict.add_argument("--json", action="store_true", help="print the result as JSON")
    predict.add_argument("--report", metavar="FILE", help="also write the PDF report to FILE")
    predict.add_argument("--model", help="bundle folder or name (default: the model setting)")
    predict.set_defaults(func=model_commands.cmd_predict)

    evaluate = subcommands.add_parser(
        "evaluate", help="accuracy, confusion matrix and ROC AUC on a folder-per-class image set"
    )
    evaluate.add_argument("--data", required=True, metavar="DIR", help="one folder per class")
    evaluate.add_argument(
        "--plot", default="evaluation.png", metavar="FILE.png", help="(default evaluation.png)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the measures as JSON")
    evaluate.add_argument("--model", help="bundle folder or name (default: the model setting)")
    evaluate.set_defaults(func=model_commands.cmd_evaluate)

    train = subcommands.add_parser("train", help="train a model bundle")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="the demo model, on phantoms")
    source.add_argument("--data", metavar="DIR", help="a folder-per-class image set")
    train.add_argument(
        "--out", metavar="DIR", help="bundle folder (--demo: models_dir/lung-ct-demo)"
    )
    train.add_argument("--seed", type=int, default=20240601)
    train.add_argument("--epochs", type=int, help="(default: 10 for --demo, 40 for --data)")
    train.add_argument("--name", help="model name in the manifest (default: the --out name)")
    train.set_defaults(func=model_commands.cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"lungnode: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    try:
        return int(args.func(settings, args))
    except KeyboardInterrupt:
        return 130
    except LungnodeError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
