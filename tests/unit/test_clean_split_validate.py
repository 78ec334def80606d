import pandas as pd
import pytest

from pipeline.config import IngestConfig
from pipeline.data.clean import clean_labeled
from pipeline.data.sources import RAW_COLUMNS, read_phrasebank
from pipeline.data.split import hash_split, split_labeled
from pipeline.data.validate import DataValidationError, validate_labeled
from tests.conftest import FPB_DIR


def _raw(rows):
    return pd.DataFrame([{**{"source": "t", "line": i, "error": None}, **row} for i, row in enumerate(rows)], columns=RAW_COLUMNS)


def test_bad_rows_are_quarantined_with_reasons_and_counts_reconcile():
    raw = _raw([
        {"text": "Profit rose sharply", "label": "positive"},
        {"text": "Profit rose sharply", "label": "positive"},  # exact duplicate
        {"text": "Sales were flat", "label": "neutral"},
        {"text": "Sales were flat", "label": "positive"},  # conflicting label
        {"text": "   ", "label": "neutral"},
        {"text": "Shares fell", "label": "bullish"},
        {"text": "Bad\x00byte here", "label": "negative"},
        {"text": "no separator", "label": None, "error": "no '@' separator"},
        {"text": "Costs fell", "label": "positive"},
    ])
    result = clean_labeled(raw, {}, IngestConfig())
    reasons = result.quarantine["reason"].tolist()
    assert result.counts == {"rows_in": 9, "clean": 2, "quarantined": 6, "duplicates": 1}
    assert sum(r.startswith("conflicting labels") for r in reasons) == 2
    assert {"empty text", "unknown label 'bullish'", "control characters in text", "no '@' separator"} <= set(reasons)
    assert set(result.clean["text"]) == {"Profit rose sharply", "Costs fell"}


def test_full_phrasebank_dedup_matches_the_data_readme():
    raw, agreement = read_phrasebank(FPB_DIR)
    result = clean_labeled(raw, agreement, IngestConfig())
    # 6 exact repeats, 2 sentences with two labels (4 rows), 4,838 distinct sentences.
    assert result.counts == {"rows_in": 4846, "clean": 4836, "quarantined": 4, "duplicates": 6}
    assert (result.clean["agreement"] == 100).sum() == 2259


@pytest.fixture(scope="module")
def fpb_clean():
    raw, agreement = read_phrasebank(FPB_DIR)
    return clean_labeled(raw, agreement, IngestConfig()).clean


def _assert_disjoint_cover(splits, clean):
    texts = [set(frame["text"]) for frame in splits.values()]
    assert sum(len(t) for t in texts) == len(clean)
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_stratified_split_is_the_canonical_72_8_20(fpb_clean):
    cfg = IngestConfig(split_method="stratified")
    splits = split_labeled(fpb_clean, cfg)
    _assert_disjoint_cover(splits, fpb_clean)
    assert {name: len(frame) for name, frame in splits.items()} == {"train": 3481, "validation": 387, "test": 968}
    share = fpb_clean["label"].value_counts(normalize=True)
    for frame in splits.values():
        assert (frame["label"].value_counts(normalize=True) - share).abs().max() < 0.02
    shuffled = split_labeled(fpb_clean.sample(frac=1.0, random_state=7), cfg)
    for name in splits:
        pd.testing.assert_frame_equal(splits[name], shuffled[name])


def test_hash_split_is_balanced_stable_and_keeps_near_duplicates_together(fpb_clean):
    cfg = IngestConfig()
    assert cfg.split_method == "hash"
    splits = split_labeled(fpb_clean, cfg)
    _assert_disjoint_cover(splits, fpb_clean)
    for name, fraction in (("train", 0.72), ("validation", 0.08), ("test", 0.20)):
        assert abs(len(splits[name]) / len(fpb_clean) - fraction) < 0.02
    share = fpb_clean["label"].value_counts(normalize=True)
    for name in ("train", "test"):
        assert (splits[name]["label"].value_counts(normalize=True) - share).abs().max() < 0.03
    # New data never moves an old sentence: the split of the old rows is unchanged.
    extra = pd.DataFrame({"text": [f"New sentence number {i} ." for i in range(300)], "label": "neutral", "agreement": 50})
    grown = split_labeled(pd.concat([fpb_clean, extra]), cfg)
    for name in splits:
        assert set(splits[name]["text"]) <= set(grown[name]["text"])
    # Near-duplicates share a split key, hence a split.
    assert hash_split("Operating profit rose to EUR 13.1 mn .", cfg) == hash_split("operating profit rose to EUR 13.1 mn", cfg)


def test_validation_passes_clean_splits_and_names_failures(fpb_clean):
    cfg = IngestConfig()
    splits = split_labeled(fpb_clean, cfg)
    assert validate_labeled(splits, cfg).success
    leaked = {**splits, "test": pd.concat([splits["test"], splits["train"].head(3)])}
    report = validate_labeled(leaked, cfg)
    assert not report.success
    # Both copies of each of the 3 leaked sentences are unexpected.
    assert any("expect_column_values_to_be_unique" in f and "'unexpected_count': 6" in f for f in report.failures)
    bad_label = {**splits, "train": splits["train"].assign(label=lambda d: d["label"].where(d.index > 0, "bullish"))}
    with pytest.raises(DataValidationError, match="expect_column_values_to_be_in_set"):
        validate_labeled(bad_label, cfg).raise_for_failures()
