"""The gate's rule and the behavioural suite, without a registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import LABELS, ReleaseConfig
from pipeline.release.behavioural import SUITE_DIR, SuiteError, load_suite, run_suite
from pipeline.release.gate import Evaluation, decide_promotion, paired_bootstrap

RNG = np.random.default_rng(0)
Y = RNG.integers(0, 3, size=600)
SLICES = {"allagree": {"accuracy": 0.9, "n": 300.0}, "agree50": {"accuracy": 0.8, "n": 600.0}}
BEHAVIOUR = {"pass_rate": 0.8, "capabilities": {"negation": {"passed": 20, "n": 25, "pass_rate": 0.8}}}


def _evaluation(version: str, correct_share: float, seed: int, slices=SLICES, behaviour=BEHAVIOUR, labels=LABELS):
    rng = np.random.default_rng(seed)
    predicted = np.where(rng.random(len(Y)) < correct_share, Y, (Y + 1) % 3)
    from sklearn.metrics import f1_score

    return Evaluation(version=version, labels=list(labels), predicted=predicted, slices=slices, behaviour=behaviour,
                      macro_f1=float(f1_score(Y, predicted, average="macro")))


def test_the_paired_bootstrap_matches_sklearn_and_brackets_the_point_estimate():
    from sklearn.metrics import f1_score

    a, b = _evaluation("2", 0.85, 1), _evaluation("1", 0.80, 2)
    point, low, high = paired_bootstrap(Y, a.predicted, b.predicted, 3, rounds=500)
    assert point == pytest.approx(f1_score(Y, a.predicted, average="macro") - f1_score(Y, b.predicted, average="macro"))
    assert low < point < high and low > 0  # 5 points better on 600 sentences is clear


def test_a_better_candidate_is_promoted_with_its_interval():
    decision = decide_promotion(Y, _evaluation("2", 0.88, 1), _evaluation("1", 0.80, 2), ReleaseConfig())
    assert decision.promote, decision.reason
    assert decision.improvement_ci[0] > 0 and {c["check"] for c in decision.checks} >= {"improvement", "bootstrap"}


def test_an_identical_candidate_is_not_promoted():
    same = _evaluation("1", 0.8, 2)
    decision = decide_promotion(Y, _evaluation("2", 0.8, 2), same, ReleaseConfig())
    assert not decision.promote and "identical" in decision.reason


def test_a_tie_is_not_promoted_even_with_other_predictions():
    champion = _evaluation("1", 0.8, 2)
    candidate = _evaluation("2", 0.8, 3)
    candidate.macro_f1 = champion.macro_f1
    candidate.predicted = champion.predicted.copy()
    candidate.predicted[:2] = candidate.predicted[[1, 0]]  # other predictions, the same counts per class
    decision = decide_promotion(Y, candidate, champion, ReleaseConfig())
    assert not decision.promote and "improvement" in decision.reason


def test_a_noisy_small_gain_fails_the_bootstrap_with_a_strict_tolerance():
    champion = _evaluation("1", 0.80, 2)
    candidate = _evaluation("2", 0.80, 2)
    wrong = np.flatnonzero(candidate.predicted != Y)[:3]
    candidate.predicted[wrong] = Y[wrong]  # 3 sentences better out of 600
    decision = decide_promotion(Y, candidate, champion, ReleaseConfig(bootstrap_tolerance=0.0))
    assert not decision.promote and "bootstrap" in decision.reason


def test_a_slice_or_a_capability_that_regresses_rejects_with_the_reason():
    champion = _evaluation("1", 0.80, 2)
    worse_slice = {**SLICES, "allagree": {"accuracy": 0.85, "n": 300.0}}
    decision = decide_promotion(Y, _evaluation("2", 0.9, 1, slices=worse_slice), champion, ReleaseConfig())
    assert not decision.promote and "slice:allagree" in decision.reason
    worse = {"pass_rate": 0.6, "capabilities": {"negation": {"passed": 15, "n": 25, "pass_rate": 0.6}}}
    decision = decide_promotion(Y, _evaluation("2", 0.9, 1, behaviour=worse), champion, ReleaseConfig())
    assert not decision.promote and "behaviour:negation" in decision.reason and "15/25" in decision.reason


def test_another_label_set_is_rejected_and_the_first_model_needs_the_floor():
    champion = _evaluation("1", 0.80, 2)
    other = _evaluation("2", 0.95, 1, labels=("bearish", "neutral", "bullish"))
    assert "label set" in decide_promotion(Y, other, champion, ReleaseConfig()).reason
    assert decide_promotion(Y, _evaluation("1", 0.9, 1), None, ReleaseConfig(min_macro_f1=0.6)).promote
    low = decide_promotion(Y, _evaluation("1", 0.3, 1), None, ReleaseConfig(min_macro_f1=0.6))
    assert not low.promote and "floor" in low.reason


def test_the_repository_suite_has_150_cases_of_every_kind():
    cases = load_suite(None, LABELS)
    assert len(cases) >= 150
    assert {c.test for c in cases} == {"MFT", "INV", "DIR"}
    assert {"negation", "hedging", "comparatives", "numbers", "entity_swap", "noise"} <= {c.capability for c in cases}
    assert SUITE_DIR.is_dir()


def test_suite_pass_rules_for_mft_inv_and_dir():
    def keyword_model(texts):  # positive on "rose", negative on "fell", else neutral
        rows = []
        for text in texts:
            row = {"negative": 0.1, "neutral": 0.8, "positive": 0.1}
            if "rose" in text:
                row = {"negative": 0.05, "neutral": 0.15, "positive": 0.8}
            if "fell" in text:
                row = {"negative": 0.8, "neutral": 0.15, "positive": 0.05}
            rows.append([row[label] for label in LABELS])
        return np.array(rows)

    cases = [
        {"id": "a", "capability": "numbers", "test": "MFT", "text": "Sales rose 5 %.", "expected": "positive"},
        {"id": "b", "capability": "numbers", "test": "MFT", "text": "Sales were flat.", "expected": "negative"},
        {"id": "c", "capability": "noise", "test": "INV", "text": "Sales rose.", "variant": "Sales rose (Reuters)."},
        {"id": "d", "capability": "noise", "test": "INV", "text": "Sales rose.", "variant": "Sales fell."},
        {"id": "e", "capability": "numbers", "test": "DIR", "text": "Sales rose.", "variant": "Sales fell.",
         "direction": "down"},
        {"id": "f", "capability": "numbers", "test": "DIR", "text": "Sales rose.", "variant": "Sales fell.",
         "direction": "up"},
    ]
    from pipeline.release.behavioural import _case

    result = run_suite([_case(c, "x", LABELS) for c in cases], keyword_model, LABELS)
    assert result["capabilities"]["numbers"]["failed"] == ["b", "f"]
    assert result["capabilities"]["noise"] == {"passed": 1, "n": 2, "failed": ["d"], "pass_rate": 0.5}


def test_a_bad_suite_line_names_its_file_and_line(tmp_path):
    (tmp_path / "broken.jsonl").write_text(
        json.dumps({"id": "x", "capability": "c", "test": "MFT", "text": "t", "expected": "positive"}) + "\n"
        + json.dumps({"id": "y", "capability": "c", "test": "DIR", "text": "t", "variant": "v"}) + "\n")
    with pytest.raises(SuiteError, match=r"broken.jsonl:2: a DIR case needs direction"):
        load_suite(tmp_path, LABELS)
    (tmp_path / "broken.jsonl").write_text('{"id": "x", "test": "MFT", "capability": "c", "text": "t", "expected": "up"}\n')
    with pytest.raises(SuiteError, match="is not a label"):
        load_suite(tmp_path, LABELS)
