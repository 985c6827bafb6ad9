"""Slice scoring in batches and the lesion_slices series rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from lungnode.domain import CLASS_LABELS, INDETERMINATE, AnalysisResult, HUVolume, SliceRef
from lungnode.imaging.windowing import build_model_input
from lungnode.ml.bundle import ModelBundle, load_bundle
from lungnode.ml.inference import BackgroundScorer, aggregate, score_slices
from lungnode.ml.train import build_small_cnn, write_bundle
from lungnode.pipeline.analyze import conclude

ADENO, LARGE, NORMAL, SQUAMOUS = range(4)
RULE = {
    "rule": "lesion_slices",
    "normal_label": "Normal",
    "min_slices": 3,
    "threshold": 0.8,
    "top_n": 4,
}


def _scores(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


def _normal_rows(n: int) -> list[list[float]]:
    return [[0.02, 0.02, 0.94, 0.02]] * n


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    keras.utils.set_random_seed(1)
    model = build_small_cnn((32, 32), 2, 4)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    write_bundle(
        model,
        out,
        name="tiny",
        version="1",
        labels=CLASS_LABELS,
        input_size=(32, 32),
        windows=("lung", "mediastinal"),
        gradcam_layer="gradcam_conv",
    )
    return load_bundle(out)


def test_normal_unless_enough_lesion_slices() -> None:
    # Two confident adenocarcinoma slices are not enough for min_slices=3.
    scores = _scores(_normal_rows(20) + [[0.9, 0.03, 0.05, 0.02]] * 2)
    verdict = aggregate(scores, CLASS_LABELS, RULE)
    assert verdict.verdict == "Normal"
    assert verdict.lesion_slices == [20, 21]
    # Key slices are still the most suspicious ones, most suspicious first.
    assert verdict.key_slices[:2] == [20, 21]
    assert verdict.class_scores["Normal"] == pytest.approx(verdict.confidence)
    assert sum(verdict.class_scores.values()) == pytest.approx(1.0)


def test_lesion_class_with_highest_mean_over_top_slices_wins() -> None:
    rows = _normal_rows(20)
    rows[5] = [0.85, 0.0, 0.05, 0.10]
    rows[6] = [0.10, 0.0, 0.05, 0.85]
    rows[7] = [0.05, 0.0, 0.05, 0.90]
    rows[8] = [0.02, 0.0, 0.08, 0.90]
    verdict = aggregate(_scores(rows), CLASS_LABELS, RULE)
    assert verdict.verdict == "Squamous Cell Carcinoma"
    assert sorted(verdict.key_slices) == [5, 6, 7, 8]
    expected = np.mean([rows[i] for i in (5, 6, 7, 8)], axis=0)
    assert verdict.confidence == pytest.approx(expected[SQUAMOUS], rel=1e-5)
    assert sum(verdict.class_scores.values()) == pytest.approx(1.0)
    assert verdict.rule["lesion_slice_count"] == 4


def test_threshold_is_inclusive_and_applies_to_any_lesion_class() -> None:
    rows = _normal_rows(5) + [
        [0.8, 0.1, 0.05, 0.05],
        [0.1, 0.8, 0.05, 0.05],
        [0.05, 0.8, 0.1, 0.05],
    ]
    verdict = aggregate(_scores(rows), CLASS_LABELS, RULE)
    assert verdict.lesion_slices == [5, 6, 7]
    assert verdict.verdict == "Large Cell Carcinoma"


def test_short_inputs_need_only_as_many_lesion_slices_as_they_have() -> None:
    one = aggregate(_scores([[0.95, 0.01, 0.02, 0.02]]), CLASS_LABELS, RULE)
    assert one.verdict == "Adenocarcinoma" and one.rule["min_slices_applied"] == 1
    confident_normal = aggregate(_scores([[0.1, 0.01, 0.87, 0.02]]), CLASS_LABELS, RULE)
    assert confident_normal.verdict == "Normal"
    assert confident_normal.confidence == pytest.approx(0.87, rel=1e-5)


def test_no_class_over_its_bar_is_indeterminate_without_a_confidence() -> None:
    """pydicom's CT_small.dcm scores like this: Adenocarcinoma 0.75, under the 0.8
    lesion threshold, and Normal 0.02. It used to be "Normal, confidence 0.023"."""
    ct_small = aggregate(_scores([[0.749, 0.166, 0.023, 0.062]]), CLASS_LABELS, RULE)
    assert ct_small.verdict == INDETERMINATE and ct_small.confidence is None
    assert ct_small.class_scores["Adenocarcinoma"] == pytest.approx(0.749, rel=1e-4)
    assert ct_small.key_slices == [0] and ct_small.lesion_slices == []
    # A series: too few lesion slices for a lesion verdict, too many doubtful ones
    # (mean Normal 0.6 < 0.8) for Normal.
    rows = _normal_rows(5) + [[0.6, 0.01, 0.37, 0.02]] * 5 + [[0.85, 0.05, 0.05, 0.05]]
    series = aggregate(_scores(rows), CLASS_LABELS, RULE)
    assert series.verdict == INDETERMINATE and series.confidence is None
    assert series.class_scores["Normal"] == pytest.approx(0.6, abs=1e-3)
    assert sum(series.class_scores.values()) == pytest.approx(1.0)


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        aggregate(_scores(_normal_rows(2)), CLASS_LABELS, {"rule": "vote"})
    with pytest.raises(ValueError, match="shape"):
        aggregate(np.zeros((0, 4), np.float32), CLASS_LABELS, RULE)


def test_score_slices_batches_match_one_big_call(tiny_bundle: ModelBundle) -> None:
    rng = np.random.default_rng(3)
    hu = rng.uniform(-1000, 300, (70, 48, 48)).astype(np.float32)
    timings: dict[str, float] = {}
    scores = score_slices(tiny_bundle, hu, batch_size=32, timings=timings)
    assert scores.shape == (70, 4) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    reference = tiny_bundle.model.predict_on_batch(
        build_model_input(hu, ("lung", "mediastinal"), (32, 32))
    )
    np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-5)
    assert timings["preprocess"] > 0 and timings["inference"] > 0


def test_analysis_uses_manifest_rule_overrides_and_reports_timings(
    tiny_bundle: ModelBundle,
) -> None:
    from lungnode.domain import HUVolume, SliceRef
    from lungnode.pipeline.analyze import analyze_volume

    hu = np.full((6, 32, 32), -850.0, dtype=np.float32)
    volume = HUVolume(hu, [SliceRef(f"2.25.{i}") for i in range(6)])
    result = analyze_volume(volume, tiny_bundle, rule_overrides={"threshold": 0.0})
    # With threshold 0 every slice is a lesion slice: the verdict must be a lesion class.
    assert result.verdict != "Normal"
    assert len(result.lesion_slices) == 6
    assert result.rule["threshold"] == 0.0 and result.rule["min_slices"] == 3
    assert set(result.timings_s) >= {"preprocess", "inference", "aggregate", "total"}
    assert result.slice_scores.shape == (6, 4)


def test_predict_is_thread_safe(tiny_bundle: ModelBundle) -> None:
    from concurrent.futures import ThreadPoolExecutor

    x = np.random.default_rng(0).random((8, 32, 32, 2), dtype=np.float32)
    expected = tiny_bundle.predict(x)
    with ThreadPoolExecutor(4) as pool:
        results: list[Any] = list(pool.map(lambda _: tiny_bundle.predict(x), range(8)))
    for result in results:
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_bad_input_shapes(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(ValueError, match="slices, rows, cols"):
        score_slices(tiny_bundle, np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        score_slices(tiny_bundle, np.zeros((1, 32, 32), np.float32), batch_size=0)


def test_demo_bundle_classifies_held_out_phantoms() -> None:
    from lungnode.ml.phantoms import generate_dataset

    root = Path(__file__).resolve().parents[2]
    demo = load_bundle(root / "models" / "lung-ct-demo")
    assert demo.identity.synthetic and "NOT FOR DIAGNOSTIC USE" in demo.identity.intended_use
    # Seeds far from the training seeds: these phantoms were never seen.
    for size in (256, 512):
        hu, y = generate_dataset(987_654 + size, 30, size=size)
        predicted = score_slices(demo, hu).argmax(axis=1)
        accuracy = float((predicted == y).mean())
        assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f} at {size}x{size}"
        for index in range(4):  # every class, not just the easy ones
            assert (predicted[y == index] == index).mean() >= 0.85


def test_background_scorer_matches_score_slices(tiny_bundle: ModelBundle) -> None:
    rng = np.random.default_rng(5)
    hu = rng.uniform(-1000, 400, size=(70, 48, 48)).astype(np.float32)
    expected = score_slices(tiny_bundle, hu, batch_size=32)
    with BackgroundScorer(tiny_bundle) as scorer:
        # Out of order, and the caller reuses its buffer after each submit.
        buffer = np.empty((32, 48, 48), dtype=np.float32)
        for first in (64, 0, 32):
            part = hu[first : first + 32]
            buffer[: len(part)] = part
            scorer.submit(first, buffer[: len(part)])
            buffer[...] = 0.0
        scores = scorer.finish()
    assert scores.shape == (70, 4)
    assert np.allclose(scores, expected, atol=1e-5)
    assert scorer.timings["inference"] > 0 and scorer.timings["preprocess"] > 0
    with pytest.raises(RuntimeError, match="after finish"):
        scorer.submit(0, hu[:1])


def test_background_scorer_reports_a_model_failure(tiny_bundle: ModelBundle) -> None:
    class Broken:
        manifest = tiny_bundle.manifest

        def predict(self, batch: np.ndarray) -> np.ndarray:
            raise MemoryError("out of memory in the model")

    scorer = BackgroundScorer(Broken(), depth=1)  # type: ignore[arg-type]
    hu = np.zeros((2, 32, 32), dtype=np.float32)
    with pytest.raises(RuntimeError, match="the model failed") as info:
        # However many batches follow, the failure surfaces and nothing hangs.
        for first in range(0, 20, 2):
            scorer.submit(first, hu)
        scorer.finish()
    assert isinstance(info.value.__cause__, MemoryError)
    scorer.close()


def _result(scores: np.ndarray, bundle: ModelBundle) -> AnalysisResult:
    """The result the pipeline concludes from these slice scores (no pixels needed)."""
    n = scores.shape[0]
    volume = HUVolume(
        hu=np.zeros((n, 1, 1), dtype=np.float32),
        slices=[SliceRef(sop_instance_uid=str(i)) for i in range(n)],
    )
    return conclude(volume, bundle, scores, with_heatmaps=False, rule_overrides=RULE)


def test_the_explanation_says_how_close_a_normal_series_came(tiny_bundle: ModelBundle) -> None:
    scores = _scores(_normal_rows(10) + [[0.03, 0.02, 0.20, 0.75]])
    result = _result(scores, tiny_bundle)
    assert result.verdict == "Normal" and result.confidence < 0.9
    assert result.explanation() == (
        "0 of 11 slices reached the lesion threshold 0.80; the rule needs 3 for a lesion "
        "verdict. Highest lesion score: 0.750 (Squamous Cell Carcinoma, slice 11)."
    )


def test_the_explanation_of_a_lesion_verdict_counts_the_slices(tiny_bundle: ModelBundle) -> None:
    result = _result(_scores(_normal_rows(5) + [[0.9, 0.03, 0.05, 0.02]] * 4), tiny_bundle)
    assert result.verdict == "Adenocarcinoma"
    assert result.explanation() == (
        "4 of 9 slices reached the lesion threshold 0.80; the rule needs 3 for a lesion verdict."
    )
    not_analysed = AnalysisResult.not_analysed("no pixels", result.model)
    assert not_analysed.explanation() == ""


def test_an_indeterminate_result_says_why_in_one_wording(tiny_bundle: ModelBundle) -> None:
    result = _result(_scores([[0.749, 0.166, 0.023, 0.062]]), tiny_bundle)
    assert result.verdict == INDETERMINATE and result.confidence is None
    assert result.verdict_text() == (
        "Indeterminate (no class reached its threshold; highest score Adenocarcinoma 0.749)"
    )
    assert result.explanation() == (
        "0 of 1 slice reached the lesion threshold 0.80; the rule needs 1 for a lesion "
        "verdict. The mean Normal score 0.023 is below 0.80, so the series is not Normal "
        "either. Highest lesion score: 0.749 (Adenocarcinoma, slice 1)."
    )
    lesion = _result(_scores(_normal_rows(5) + [[0.9, 0.03, 0.05, 0.02]] * 4), tiny_bundle)
    assert lesion.verdict_text() == f"Adenocarcinoma (confidence {lesion.confidence:.3f})"
