"""Drift statistics and data-derived thresholds on synthetic scored texts: quiet on
in-distribution windows, loud (on the right statistic) on shifted ones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.monitor.drift import (
    DEFAULT_QUANTILE,
    STATISTIC_NAMES,
    DriftSample,
    ReferenceProfile,
    calibrate,
    detect,
    embedding_mmd,
    load_thresholds,
    prediction_js,
    prediction_psi,
    save_thresholds,
    text_descriptors,
)

DIM = 128
WINDOW = 200
MAX_TOKENS = 45


def scored_texts(rng: np.random.Generator, n: int, label_p=(0.25, 0.5, 0.25), embedding_shift: float = 0.0,
                 extra_tokens: int = 0, non_ascii_rate: float = 0.1, non_ascii_beta: float = 50) -> DriftSample:
    """n texts as the scorer would describe them: confident softmax outputs, Gaussian embeddings,
    Poisson lengths, a few unknown tokens and non-ASCII characters."""
    labels = rng.choice(3, n, p=label_p)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), labels] += 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    embeddings = (rng.normal(size=(n, DIM)) + embedding_shift).astype(np.float32)
    n_tokens = rng.poisson(35 + extra_tokens, n) + 1
    unk_share = np.where(rng.random(n) < 0.2, rng.beta(1, 30, n), 0.0)
    non_ascii_share = np.where(rng.random(n) < non_ascii_rate, rng.beta(1, non_ascii_beta, n), 0.0)
    descriptors = np.c_[n_tokens, unk_share, n_tokens > MAX_TOKENS, non_ascii_share]
    return DriftSample(probs, embeddings, descriptors)


@pytest.fixture(scope="module")
def calibrated() -> tuple[ReferenceProfile, dict[str, float]]:
    rng = np.random.default_rng(7)
    reference = ReferenceProfile.build(scored_texts(rng, 800))
    return reference, calibrate(reference, scored_texts(rng, 3000), WINDOW, n_windows=200, seed=1)


def test_text_descriptors_count_tokens_unknowns_truncation_and_non_ascii():
    out = text_descriptors(["abcd", "é€ab", ""], [[5, 0, 7, 0, 9], [1, 2, 3, 4, 5, 6], []], unk_id=0, max_tokens=5)
    np.testing.assert_allclose(out, [[5, 0.4, 0, 0], [6, 0, 1, 0.5], [0, 0, 0, 0]])


def test_prediction_statistics_are_zero_for_equal_histograms_and_large_for_a_flipped_one():
    rng = np.random.default_rng(0)
    balanced = scored_texts(rng, 400)
    assert prediction_js(balanced, balanced) == 0 and prediction_psi(balanced, balanced) == 0
    all_negative = DriftSample(np.tile([0.9, 0.05, 0.05], (400, 1)), balanced.embeddings, balanced.descriptors)
    assert prediction_js(balanced, all_negative) > 0.5
    assert math.isfinite(prediction_psi(balanced, all_negative)) and prediction_psi(balanced, all_negative) > 1


def test_profile_statistics_match_the_standalone_functions():
    rng = np.random.default_rng(1)
    reference, window = scored_texts(rng, 600), scored_texts(rng, 300, embedding_shift=0.2)
    statistics = ReferenceProfile.build(reference).statistics(window)
    assert list(statistics) == list(STATISTIC_NAMES)
    assert statistics["prediction_js"] == pytest.approx(prediction_js(reference, window))
    assert statistics["embedding_mmd"] == pytest.approx(embedding_mmd(reference.embeddings, window.embeddings))
    assert statistics["embedding_mmd"] > 0.01


def test_thresholds_are_finite_positive_and_reproducible(calibrated):
    reference, thresholds = calibrated
    assert list(thresholds) == list(STATISTIC_NAMES)
    assert all(math.isfinite(value) and value > 0 for value in thresholds.values()), thresholds
    assert 1 - DEFAULT_QUANTILE == pytest.approx(0.05 / len(STATISTIC_NAMES))
    pool = scored_texts(np.random.default_rng(3), 1000)
    assert calibrate(reference, pool, WINDOW, n_windows=30, seed=5) == calibrate(reference, pool, WINDOW, n_windows=30,
                                                                                  seed=5)


def test_fresh_in_distribution_windows_rarely_raise_a_false_alarm(calibrated):
    reference, thresholds = calibrated
    rng = np.random.default_rng(11)
    reports = [detect(reference, scored_texts(rng, WINDOW), thresholds) for _ in range(100)]
    assert all(len(report.statistics) == len(STATISTIC_NAMES) for report in reports)
    assert np.mean([report.drifted for report in reports]) <= 0.10


@pytest.mark.parametrize(("shift", "expected", "quiet_prefix"), [
    ({"embedding_shift": 0.1}, {"embedding_mmd"}, ("prediction_", "descriptor_")),
    ({"label_p": (1.0, 0.0, 0.0)}, {"prediction_js", "prediction_psi"}, ("descriptor_",)),
    ({"extra_tokens": 10}, {"descriptor_n_tokens", "descriptor_truncated"}, ("prediction_",)),
    ({"non_ascii_rate": 0.6, "non_ascii_beta": 10}, {"descriptor_non_ascii_share"}, ("prediction_", "embedding_")),
])
def test_a_shifted_window_is_detected_by_the_right_statistic(calibrated, shift, expected, quiet_prefix):
    reference, thresholds = calibrated
    rng = np.random.default_rng(13)
    reports = [detect(reference, scored_texts(rng, WINDOW, **shift), thresholds) for _ in range(10)]
    assert all(report.drifted and expected <= set(report.fired) for report in reports), [r.fired for r in reports]
    assert not any(name.startswith(quiet_prefix) for report in reports for name in report.fired)


def test_a_small_embedding_shift_is_detected_most_of_the_time(calibrated):
    reference, thresholds = calibrated
    rng = np.random.default_rng(17)
    reports = [detect(reference, scored_texts(rng, WINDOW, embedding_shift=0.06), thresholds) for _ in range(20)]
    assert np.mean(["embedding_mmd" in report.fired for report in reports]) >= 0.8


def test_a_window_below_min_window_is_not_judged(calibrated):
    reference, thresholds = calibrated
    report = detect(reference, scored_texts(np.random.default_rng(19), 20, label_p=(1, 0, 0)), thresholds)
    assert report.drifted is False and report.fired == [] and report.n_window == 20
    assert report.reason == "insufficient data: 20 texts < 50"
    assert detect(reference, scored_texts(np.random.default_rng(19), 60, label_p=(1, 0, 0)), thresholds).drifted


def test_report_to_dict_is_json_friendly(calibrated):
    reference, thresholds = calibrated
    report = detect(reference, scored_texts(np.random.default_rng(23), WINDOW, label_p=(1, 0, 0)), thresholds)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["drifted"] is True and "prediction_js" in data["fired"] and data["n_reference"] == 800
    assert data["statistics"]["prediction_js"] > data["thresholds"]["prediction_js"]


def test_detect_refuses_thresholds_missing_a_statistic(calibrated):
    reference, thresholds = calibrated
    with pytest.raises(ValueError, match="embedding_mmd"):
        detect(reference, scored_texts(np.random.default_rng(29), WINDOW),
               {name: value for name, value in thresholds.items() if name != "embedding_mmd"})


def test_thresholds_round_trip_through_json(calibrated, tmp_path):
    _, thresholds = calibrated
    meta = {"window_size": WINDOW, "n_windows": 200, "model_version": "3", "onnx_sha256": "ab" * 32}
    save_thresholds(tmp_path / "thresholds.json", thresholds, meta)
    assert load_thresholds(tmp_path / "thresholds.json") == (thresholds, meta)


def test_windows_built_from_days_count_the_day_to_day_variation_as_in_distribution(calibrated):
    """Each day has its own embedding offset (the news mix of the day): thresholds calibrated on
    windows of a few days take that variation in, and fresh weeks stay under the 5 % target, where
    thresholds from windows of random texts raise more false alarms."""
    reference, _ = calibrated
    rng = np.random.default_rng(3)

    def days(n_days: int, per_day: int) -> tuple[DriftSample, np.ndarray]:
        samples = [scored_texts(rng, per_day, embedding_shift=rng.normal(0, 0.15)) for _ in range(n_days)]
        joined = DriftSample(*(np.concatenate([getattr(s, f) for s in samples])
                               for f in ("probs", "embeddings", "descriptors")))
        return joined, np.repeat(np.arange(n_days), per_day)

    pool, groups = days(60, 45)
    thresholds = {"by day": calibrate(reference, pool, WINDOW, n_windows=200, seed=2, groups=groups, groups_per_window=7),
                  "at random": calibrate(reference, pool, WINDOW, n_windows=200, seed=2)}
    alarms = dict.fromkeys(thresholds, 0)
    for _ in range(40):
        week, _ = days(7, 45)
        window = week.take(rng.choice(len(week), WINDOW, replace=False))
        for name, values in thresholds.items():
            alarms[name] += detect(reference, window, values).drifted
    assert alarms["by day"] <= 2 < alarms["at random"], alarms


def test_a_share_must_move_a_point_even_when_the_reference_has_none():
    rng = np.random.default_rng(5)
    clean = scored_texts(rng, 800, non_ascii_rate=0.0)
    thresholds = calibrate(ReferenceProfile.build(clean), scored_texts(rng, 1000, non_ascii_rate=0.0), WINDOW, 50)
    assert thresholds["descriptor_non_ascii_share"] == pytest.approx(0.01)
    one_accent = scored_texts(rng, WINDOW, non_ascii_rate=0.005)
    assert "descriptor_non_ascii_share" not in detect(ReferenceProfile.build(clean), one_accent, thresholds).fired
