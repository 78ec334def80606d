import pytest

from pipeline.data.sources import normalize_text, parse_phrasebank_line, read_phrasebank, parse_reuters_timestamp, read_phrasebank_hub, read_reuters
from tests.conftest import FPB_DIR


def test_parse_line_splits_on_last_at():
    assert parse_phrasebank_line("Sales @ 5 % rose@positive") == ("Sales @ 5 % rose", "positive")
    with pytest.raises(ValueError, match="no '@'"):
        parse_phrasebank_line("no separator here")


def test_read_full_phrasebank_counts_and_agreement():
    raw, agreement = read_phrasebank(FPB_DIR)
    assert len(raw) == 4846  # lines of 50Agree, per the data README
    assert raw["error"].isna().all()
    assert raw["label"].value_counts().to_dict() == {"neutral": 2879, "positive": 1363, "negative": 604}
    levels = {level: sum(1 for v in agreement.values() if v == level) for level in (50, 66, 75, 100)}
    assert levels[100] == 2259  # distinct AllAgree sentences
    assert sum(levels.values()) == 4838  # distinct sentences of 50Agree
    # latin-1 decoded and the original mojibake kept as is (README: "Sepp+ñl+ñ" for Seppälä)
    assert sum("Sepp+\u00f1l+\u00f1" in text for text in raw["text"]) == 2


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Sentences_50Agree.txt"):
        read_phrasebank(tmp_path)


def test_reuters_bodies_are_clean_and_dated(reuters_subset):
    corpus = read_reuters(reuters_subset)
    assert 900 <= len(corpus) <= 1000
    assert corpus["date"].between("1987-02-01", "1987-10-31").all()
    assert not corpus["text"].str.contains("&#").any()
    assert not corpus["text"].str.contains("&lt;").any()
    assert not corpus["text"].str.endswith("Reuter").any()
    assert corpus["doc_id"].is_unique


def test_normalize_collapses_whitespace():
    assert normalize_text("  a\t b \r\n c ") == "a b c"


def test_hub_reader_maps_class_labels_and_agreement():
    # No hub here: the loader is replaced by in-memory datasets of the hub's shape.
    import datasets

    rows = {
        "sentences_50agree": [("Profit rose .", 2), ("Sales fell .", 0), ("Meeting held .", 1)],
        "sentences_66agree": [("Profit rose .", 2), ("Sales fell .", 0)],
        "sentences_75agree": [("Profit rose .", 2)],
        "sentences_allagree": [("Profit rose .", 2)],
    }
    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "neutral", "positive"]),
    })

    def load(dataset_id, config):
        texts, labels = zip(*rows[config])
        return datasets.Dataset.from_dict({"sentence": list(texts), "label": list(labels)}, features=features)

    raw, agreement = read_phrasebank_hub("takala/financial_phrasebank", load=load)
    assert raw[["text", "label"]].values.tolist() == [["Profit rose .", "positive"], ["Sales fell .", "negative"], ["Meeting held .", "neutral"]]
    assert agreement == {"Profit rose .": 100, "Sales fell .": 66, "Meeting held .": 50}


def test_reuters_timestamps_parse_and_garbled_clocks_do_not_crash():
    assert parse_reuters_timestamp("26-FEB-1987 15:01:01.79") == "1987-02-26T15:01:01"
    assert parse_reuters_timestamp("31-MAR-1987 605:12:19.00") is None  # as in reut2-*.sgm
