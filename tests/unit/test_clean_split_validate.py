import pandas as pd
import pytest

from pipeline.config import OFFLINE_MINILM, IngestConfig
from pipeline.data.clean import clean_labeled
from pipeline.data.sources import RAW_COLUMNS, read_phrasebank
from pipeline.data.split import hash_split, split_labeled
from pipeline.data.tokens import load_tokenizer, token_counts
from pipeline.data.validate import DataValidationError, labeled_frame, validate_labeled
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


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(OFFLINE_MINILM)


def _validation_frame(splits, tokenizer):
    frame = labeled_frame(splits)
    return frame.assign(n_tokens=token_counts(frame["text"].tolist(), tokenizer))


def test_validation_passes_clean_splits_and_names_failures(fpb_clean, minilm_tokenizer):
    cfg = IngestConfig()
    splits = split_labeled(fpb_clean, cfg)
    report = validate_labeled(_validation_frame(splits, minilm_tokenizer), cfg, 126)
    assert report.success and not report.row_failures, report.failures
    leaked = {**splits, "test": pd.concat([splits["test"], splits["train"].head(3)])}
    report = validate_labeled(_validation_frame(leaked, minilm_tokenizer), cfg, 126)
    assert not report.success
    # Both copies of each of the 3 leaked sentences are unexpected.
    assert any("expect_column_values_to_be_unique" in f and "'unexpected_count': 6" in f for f in report.failures)
    with pytest.raises(DataValidationError, match="expect_column_values_to_be_unique"):
        report.raise_for_failures()


def test_row_level_failures_name_their_rows_and_batch_failures_their_numbers(fpb_clean, minilm_tokenizer):
    cfg = IngestConfig()
    frame = _validation_frame(split_labeled(fpb_clean, cfg), minilm_tokenizer)
    frame.loc[0, "label"] = "bullish"
    frame.loc[1, "text"] = "Operating profit rose to EUR 13.1 mn \ufffd"
    frame.loc[2, "text"] = "Net sales increased to EUR 5 mn from EUR 4 mn â\x80\x99s"
    report = validate_labeled(frame, cfg, 126)
    assert report.success, report.failures  # three rows are within every ``mostly``
    assert report.row_failures == {
        0: "label not in the set (expect_column_values_to_be_in_set)",
        1: "non-printable or garbled characters (expect_column_values_to_not_match_regex)",
        2: "non-printable or garbled characters (expect_column_values_to_not_match_regex)",
    }

    # Too many garbled rows, too many truncated sentences, a skewed label mix: the batch fails with numbers.
    garbled = frame.assign(text=frame["text"].where(frame.index >= 100, frame["text"] + " \ufffd"))
    report = validate_labeled(garbled, cfg, 20)
    assert not report.success
    failures = " | ".join(report.failures)
    assert "expect_column_values_to_not_match_regex" in failures and "'unexpected_count': 100" in failures
    truncated = next(f for f in report.failures if "'column': 'n_tokens'" in f and "'max_value': 20" in f)
    assert "unexpected_percent" in truncated
    skewed = frame.assign(label="neutral", is_negative=0, is_neutral=1, is_positive=0)
    report = validate_labeled(skewed, cfg, 126)
    shares = [f for f in report.failures if f.startswith("expect_column_mean_to_be_between")]
    assert len(shares) == 3 and any("is_neutral" in f and "'observed_value': 1.0" in f for f in shares)
    assert validate_labeled(skewed, IngestConfig(label_reference={}), 126).success


def test_duplicates_do_not_count_against_the_clean_share(tmp_path):
    from pipeline.data.clean import require_clean_share
    from pipeline.data.validate import DataValidationError

    require_clean_share({"rows_in": 100, "clean": 60, "quarantined": 0, "duplicates": 40}, 0.95, tmp_path)
    with pytest.raises(DataValidationError, match="only 90.0% of 60 distinct rows"):
        require_clean_share({"rows_in": 100, "clean": 54, "quarantined": 6, "duplicates": 40}, 0.95, tmp_path)
