"""``lungnode ...`` commands: the only place that wires everything and configures logging."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from lungnode import __version__
from lungnode.config import Settings, load_settings
from lungnode.errors import ConfigError, LungnodeError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from lungnode.db.deliveries import DeliveryRepository
    from lungnode.domain import AnalysisResult
    from lungnode.ml.bundle import ModelBundle

logger = logging.getLogger("lungnode")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep its warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))


def _log_settings(settings: Settings) -> None:
    logger.info("lungnode %s, effective settings:", __version__)
    for name, value in settings.masked().items():
        logger.info("  %s = %s", name, value)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.pipeline.node import Node

    settings.check_safe_to_start()
    _log_settings(settings)
    node = Node(settings, analyse=True)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    node.start()
    logger.info("ready: DICOM %s on port %d", settings.ae_title, node.scp.port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.db.migrate import upgrade

    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, args.revision)
    print(f"database at revision {args.revision}")
    return 0


def cmd_user_add(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from lungnode.db.migrate import upgrade
    from lungnode.db.models import Role, User
    from lungnode.db.repo import NodeRepository
    from lungnode.db.session import make_engine, make_session_factory
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
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
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
    NodeRepository(sessions).audit("cli", "user.add", args.username, {"role": role.value})
    engine.dispose()
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


def _deliveries(settings: Settings) -> tuple[Engine, DeliveryRepository]:
    from lungnode.db.deliveries import DeliveryRepository
    from lungnode.db.migrate import upgrade
    from lungnode.db.session import make_engine, make_session_factory

    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    return engine, DeliveryRepository(make_session_factory(engine))


def cmd_deliveries_list(settings: Settings, args: argparse.Namespace) -> int:
    engine, repo = _deliveries(settings)
    dead = repo.dead_letters()
    if not dead:
        print("no dead letters")
    for row in dead:
        print(
            f"{row.id}\t{row.destination}\t{row.sop_instance_uid}\tattempts={row.attempts}"
            f"\t{row.updated_at:%Y-%m-%d %H:%M:%S}\t{row.last_error or ''}"
        )
    engine.dispose()
    return 0


def cmd_deliveries_retry(settings: Settings, args: argparse.Namespace) -> int:
    if not args.all and not args.ids:
        print("name delivery ids, or --all", file=sys.stderr)
        return 2
    engine, repo = _deliveries(settings)
    count = repo.retry(None if args.all else list(args.ids))
    engine.dispose()
    print(f"{count} dead letter(s) queued again; a running node sends them within seconds")
    return 0


def cmd_cleanup(settings: Settings, args: argparse.Namespace) -> int:
    from lungnode.api import delete_stale_uploads
    from lungnode.db.migrate import upgrade
    from lungnode.db.session import make_engine, make_session_factory

    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    deleted = delete_stale_uploads(settings, make_session_factory(engine))
    engine.dispose()
    print(
        f"deleted {len(deleted)} upload(s) older than {settings.upload_retention_hours:g} h "
        "that no prediction refers to"
    )
    return 0


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up chatter off the terminal (before it is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _load_model(settings: Settings, name: str | None) -> ModelBundle:
    from lungnode.ml.bundle import load_bundle

    _quiet_tensorflow()
    return load_bundle(
        name or settings.model, settings.models_dir, trust_pickle=settings.trust_pickle
    )


def _describe(result: AnalysisResult, source: Path) -> str:
    """The readable summary of ``lungnode predict``: no patient data, only the analysis."""
    from lungnode.report.pdf import NOT_FOR_DIAGNOSTIC_USE, SYNTHETIC_MODEL_NOTICE

    count = result.slice_scores.shape[0]
    lines = [f"{source.name}: {count} slice{'s' if count != 1 else ''} analysed"]
    lines.append(f"Verdict: {result.verdict_text()}")
    if explanation := result.explanation():
        lines.append(explanation)
    lines.append("Class scores:")
    for label, score in sorted(result.class_scores.items(), key=lambda item: -item[1]):
        lines.append(f"  {label:<26} {score:6.3f}  {'#' * round(score * 30)}")
    lines.append("Key slices, most suspicious first:")
    for index, ref in zip(result.key_slices, result.key_slice_refs, strict=True):
        where = f"SOP Instance UID {ref.sop_instance_uid}" if ref.sop_instance_uid else "picture"
        if ref.frame_number is not None:
            where += f", frame {ref.frame_number}"
        lines.append(
            f"  slice {index + 1:>4}  score {result.slice_scores[index].max():.3f}  {where}"
        )
    model = result.model
    lines.append(f"Model: {model.name} {model.version} (sha256 {model.sha256})")
    lines.append(
        "Timings: " + ", ".join(f"{stage} {s:.3f} s" for stage, s in result.timings_s.items())
    )
    lines.append(SYNTHETIC_MODEL_NOTICE if model.synthetic else NOT_FOR_DIAGNOSTIC_USE)
    return "\n".join(lines)


def cmd_predict(settings: Settings, args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        print(f"lungnode predict: {path} does not exist", file=sys.stderr)
        return 2
    bundle = _load_model(settings, args.model)
    from lungnode.pipeline.analyze import analyze_path, report_pdf, result_json

    try:
        analysis = analyze_path(path, bundle)
    except (LungnodeError, ValueError, OSError) as exc:
        print(f"lungnode predict: {exc}", file=sys.stderr)
        return 2
    result = analysis.result
    if not result.analysed:
        print(f"lungnode predict: not analysed: {result.not_analysed_reason}", file=sys.stderr)
        return 1
    if args.report:
        report = Path(args.report)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_bytes(report_pdf(analysis))
    if args.json:
        answer = result_json(result)
        if args.report:
            answer["report"] = str(args.report)
        print(json.dumps(answer, indent=2))
    else:
        print(_describe(result, path))
        if args.report:
            print(f"Report: {args.report}")
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    bundle = _load_model(settings, args.model)
    from lungnode.ml.evaluation import evaluate_folder, plot_evaluation

    try:
        evaluation = evaluate_folder(Path(args.data), bundle)
    except (ValueError, OSError) as exc:
        print(f"lungnode evaluate: {exc}", file=sys.stderr)
        return 2
    plot = plot_evaluation(evaluation, Path(args.plot)) if args.plot else None
    if args.json:
        answer = evaluation.to_json()
        answer["model"] = {"name": bundle.identity.name, "version": bundle.identity.version}
        answer["plot"] = str(plot) if plot else None
        print(json.dumps(answer, indent=2))
        return 0
    labels = evaluation.labels
    print(f"{evaluation.truth.size} images, model {bundle.identity.name} {bundle.identity.version}")
    print(f"accuracy (highest score): {evaluation.accuracy:.4f}")
    print(f"accuracy (series rule, as predict): {evaluation.rule_accuracy:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    width = max(len(label) for label in labels)
    print(" " * (width + 2) + "".join(f"{i:>7}" for i in range(len(labels))))
    for i, (label, row) in enumerate(zip(labels, evaluation.confusion, strict=True)):
        print(f"{i} {label:<{width}}" + "".join(f"{count:>7}" for count in row))
    print("ROC AUC, one class against the rest:")
    for label, auc in evaluation.auc().items():
        print(f"  {label:<{width}}  " + ("n/a (no images)" if math.isnan(auc) else f"{auc:.4f}"))
    if plot:
        print(f"plot: {plot}")
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from lungnode.ml.train import train_demo, train_from_folder

    if args.demo:
        out = Path(args.out) if args.out else settings.models_dir / "lung-ct-demo"
        train_demo(out, seed=args.seed, epochs=args.epochs or 10, verbose=2)
    else:
        if not args.out:
            print("lungnode train: --data needs --out DIR", file=sys.stderr)
            return 2
        out = Path(args.out)
        try:
            train_from_folder(
                Path(args.data),
                out,
                name=args.name or out.name,
                seed=args.seed,
                epochs=args.epochs or 40,
                verbose=2,
            )
        except (ValueError, OSError) as exc:
            print(f"lungnode train: {exc}", file=sys.stderr)
            return 2
    print(f"bundle written to {out}; use it with --model {out} or LUNGNODE_MODEL={out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungnode", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lungnode {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM SCP, the API and the workers")
    serve.set_defaults(func=cmd_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="apply the migrations")
    db_upgrade.add_argument("revision", nargs="?", default="head")
    db_upgrade.set_defaults(func=cmd_db_upgrade)

    user = commands.add_parser("user", help="API users")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    user_add = user_commands.add_parser("add", help="add a user")
    user_add.add_argument("username")
    user_add.add_argument("--role", default="viewer", choices=["admin", "radiologist", "viewer"])
    user_add.add_argument("--email")
    user_add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    user_add.set_defaults(func=cmd_user_add)

    send = commands.add_parser("send", help="send DICOM files or folders with C-STORE")
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--to", required=True, metavar="AE@HOST:PORT")
    send.add_argument("--calling-ae", default="LUNGNODE")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.set_defaults(func=cmd_send)

    deliveries = commands.add_parser("deliveries", help="result deliveries (the outbox)")
    delivery_commands = deliveries.add_subparsers(dest="deliveries_command", required=True)
    deliveries_list = delivery_commands.add_parser("list", help="list the dead letters")
    deliveries_list.set_defaults(func=cmd_deliveries_list)
    deliveries_retry = delivery_commands.add_parser("retry", help="send dead letters again")
    deliveries_retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    deliveries_retry.add_argument("--all", action="store_true", help="every dead letter")
    deliveries_retry.set_defaults(func=cmd_deliveries_retry)

    cleanup = commands.add_parser(
        "cleanup", help="delete old uploads that no prediction refers to (upload_retention_hours)"
    )
    cleanup.set_defaults(func=cmd_cleanup)
    predict = commands.add_parser(
        "predict", help="classify a DICOM file, a series folder, a PNG or a JPEG"
    )
    predict.add_argument("path", metavar="PATH", help="DICOM file, folder of one series, PNG, JPG")
    predict.add_argument("--json", action="store_true", help="print the result as JSON")
    predict.add_argument("--report", metavar="FILE", help="also write the PDF report to FILE")
    predict.add_argument("--model", help="bundle folder or name (default: the model setting)")
    predict.set_defaults(func=cmd_predict)

    evaluate = commands.add_parser(
        "evaluate", help="accuracy, confusion matrix and ROC AUC on a folder-per-class image set"
    )
    evaluate.add_argument("--data", required=True, metavar="DIR", help="one folder per class")
    evaluate.add_argument(
        "--plot", default="evaluation.png", metavar="FILE.png", help="(default evaluation.png)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the measures as JSON")
    evaluate.add_argument("--model", help="bundle folder or name (default: the model setting)")
    evaluate.set_defaults(func=cmd_evaluate)

    train = commands.add_parser("train", help="train a model bundle")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="the demo model, on phantoms")
    source.add_argument("--data", metavar="DIR", help="a folder-per-class image set")
    train.add_argument(
        "--out", metavar="DIR", help="bundle folder (--demo: models_dir/lung-ct-demo)"
    )
    train.add_argument("--seed", type=int, default=20240601)
    train.add_argument("--epochs", type=int, help="(default: 10 for --demo, 40 for --data)")
    train.add_argument("--name", help="model name in the manifest (default: the --out name)")
    train.set_defaults(func=cmd_train)
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
