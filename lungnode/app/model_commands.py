"""What the model commands do: predict, evaluate and train.

TensorFlow loads inside each command, never at import, so that the other
commands start fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lungnode.config import Settings
from lungnode.errors import LungnodeError

if TYPE_CHECKING:
    from lungnode.domain import AnalysisResult
    from lungnode.ml.bundle import ModelBundle


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
