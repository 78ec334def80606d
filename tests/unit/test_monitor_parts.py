"""The monitor's parts on small hand-made data: reprints, long sentences,
the index's baselines over gaps and low coverage, alerts, the SQL tables and
the webhook (a real local HTTP server)."""

from __future__ import annotations

import json
import threading
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer

from pipeline.config import MonitorConfig
from pipeline.monitor.alerts import post_webhook
from pipeline.monitor.dedup import find_reprints
from pipeline.monitor.index import day_aggregates, find_alerts, with_baselines
from pipeline.monitor.score import story_scores
from pipeline.monitor.store import MonitorStore
from pipeline.monitor.stories import plain_tokenizer, story_units
from pipeline.services import free_port

BODY = ("Shell said on Monday that its refinery in Rotterdam would close for three weeks of maintenance, cutting "
        "output of gasoline and heating oil while prices in the region stay high")


def _stories(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"id": i, "timestamp": ts, "title": None, "text": text} for i, ts, text in rows])


def test_exact_and_near_reprints_are_found_and_the_first_copy_is_the_original():
    earlier = _stories([("old-1", "1987-03-01T09:00:00", BODY)])
    today = _stories([
        ("b", "1987-03-02T10:00:00", "Opec ministers meet in Vienna next week to discuss output quotas for the second half"),
        ("a", "1987-03-02T09:00:00", "Opec ministers meet in Vienna next week to discuss output quotas for the second half!"),
        ("c", "1987-03-02T11:00:00", BODY.replace("Monday", "Tuesday")),  # near copy of yesterday's story
        ("d", "1987-03-02T12:00:00", "Wheat exports from Australia rose sharply in February on strong demand from China"),
    ])
    reprint_of = find_reprints(today, earlier, jaccard=0.8)
    assert reprint_of.tolist() == ["a", None, "old-1", None]
    shuffled = today.sample(frac=1.0, random_state=3)
    assert find_reprints(shuffled, earlier, 0.8).sort_index().tolist() == reprint_of.tolist()
    assert find_reprints(today, earlier.iloc[:0], 0.8).tolist() == ["a", None, None, None]


@pytest.fixture(scope="module")
def word_tokenizer(tiny_base) -> Tokenizer:
    return plain_tokenizer(Tokenizer.from_file(str(tiny_base / "tokenizer.json")))


def test_a_sentence_longer_than_the_window_is_cut_at_words_and_nothing_is_dropped(word_tokenizer):
    long_sentence = "Then " + " ".join(f"profit{i} rose" for i in range(60))
    stories = pd.DataFrame([{"id": "s1", "title": "PROFIT ROSE", "text": f"Sales fell. {long_sentence}."}])
    units = story_units(stories, word_tokenizer, max_tokens=20)
    assert units["is_title"].tolist()[0] and units["text"].tolist()[:2] == ["PROFIT ROSE", "Sales fell."]
    windows = units[units["split"]]["text"].tolist()
    assert len(windows) > 3
    assert all(len(word_tokenizer.encode(w, add_special_tokens=False).ids) <= 20 for w in windows)
    assert " ".join(windows).split() == f"{long_sentence}.".split()  # every word kept, none cut in two


def test_story_scores_aggregate_their_texts():
    units = pd.DataFrame({"story_id": ["s1", "s1", "s2"], "text": ["a", "b", "c"], "is_title": [True, False, True],
                          "split": [False, False, False]})
    probs = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    scores = story_scores(units, probs, ["negative", "neutral", "positive"]).set_index("id")
    assert scores.loc["s1", "net_sentiment"] == pytest.approx(((0.7 - 0.1) + (0.1 - 0.6)) / 2)
    assert scores.loc["s1", "positive_share"] == 0.5 and scores.loc["s1", "negative_share"] == 0.5
    assert scores.loc["s2", "label"] == "neutral" and scores.loc["s2", "n_texts"] == 1
    with pytest.raises(ValueError, match="lack"):
        story_scores(units, probs, ["bad", "neutral", "good"])


def _scored(n: int, net: float, entities=("usa",), topics=("earn",)) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"s{i}" for i in range(n)], "net_sentiment": [net] * n,
                         "label": ["positive" if net > 0 else "negative"] * n, "confidence": [0.9] * n,
                         "entities": [list(entities)] * n, "topics": [list(topics)] * n})


def _history(days: dict[date, tuple[int, float]], cfg: MonitorConfig) -> pd.DataFrame:
    frames = [day_aggregates(_scored(n, net), day, cfg.min_stories) for day, (n, net) in days.items()]
    return pd.concat(frames, ignore_index=True)


def test_zscore_uses_the_trailing_days_that_have_stories_and_skips_low_coverage():
    cfg = MonitorConfig(baseline_days=5, min_baseline_days=3, min_stories=5, alert_zscore=3.0, alert_min_stories=10)
    start = date(1987, 3, 1)
    # Stories every third day (a gappy feed), one low-coverage day with an extreme value.
    days = {start + timedelta(days=3 * i): (20, 0.1 + 0.01 * (i % 3)) for i in range(8)}
    days[start + timedelta(days=25)] = (2, -0.9)
    history = _history(days, cfg)
    today = start + timedelta(days=30)
    rows = with_baselines(day_aggregates(_scored(20, -0.5), today, cfg.min_stories), history, today, cfg)
    overall = rows[rows["dimension"] == "overall"].iloc[0]
    baseline = [net for d, (n, net) in sorted(days.items()) if n >= cfg.min_stories][-5:]
    assert overall["baseline_days"] == 5
    assert overall["zscore"] == pytest.approx((-0.5 - np.mean(baseline)) / np.std(baseline, ddof=1))
    assert set(rows["dimension"]) == {"overall", "entity", "topic"}
    alerts = find_alerts(rows, cfg)
    assert len(alerts) == 3 and set(alerts["direction"]) == {"down"}
    assert -0.5 < overall["decayed_net"] < max(baseline)  # today weighs most, older days less


def test_low_coverage_days_get_no_zscore_and_no_alert():
    cfg = MonitorConfig(min_stories=5, min_baseline_days=2, alert_min_stories=1)
    start = date(1987, 3, 1)
    history = _history({start + timedelta(days=i): (10, 0.1 * (i % 2)) for i in range(6)}, cfg)
    today = start + timedelta(days=7)
    rows = with_baselines(day_aggregates(_scored(3, -0.9), today, cfg.min_stories), history, today, cfg)
    assert rows["low_coverage"].all() and rows["zscore"].isna().all()
    assert rows["net_mean"].notna().all()  # shown, not a zero
    assert find_alerts(rows, cfg).empty


def test_replacing_a_day_never_duplicates_its_rows(tmp_path):
    store = MonitorStore(f"sqlite:///{tmp_path / 'monitor.db'}")
    cfg = MonitorConfig()
    day = date(1987, 3, 2)
    rows = day_aggregates(_scored(12, 0.2, entities=("usa", "uk")), day, cfg.min_stories).assign(baseline_days=0)
    assert store.replace_day("index", day, rows) == 4
    store.replace_day("index", day, rows)
    store.replace_day("index", day + timedelta(days=1), rows)
    kept = store.read("index", day, day)
    assert len(kept) == 4 and kept["zscore"].isna().all()
    assert store.read("index", day, day + timedelta(days=1), dimension="entity", key="uk")["day"].tolist() == [
        "1987-03-02", "1987-03-03"]


def _stored_baselines_match_the_whole_history(store: MonitorStore) -> None:
    cfg = MonitorConfig(baseline_days=4, min_baseline_days=3, min_stories=5)
    start = date(1987, 3, 1)
    # A gappy feed with "uk" on some days only, a low-coverage day and a day after the one indexed.
    days = {start + timedelta(days=2 * i): (20, 0.05 * i) for i in range(9)}
    days[start + timedelta(days=3)] = (2, -0.9)
    today = start + timedelta(days=15)
    for day, (n, net) in {**days, today + timedelta(days=1): (20, 0.9)}.items():
        entities = ("usa", "uk") if day.day % 4 == 1 else ("usa",)
        store.replace_day("index", day, day_aggregates(_scored(n, net, entities=entities), day, cfg.min_stories))
    whole = store.read("index", start, today + timedelta(days=1))
    current = day_aggregates(_scored(20, -0.5, entities=("usa", "uk")), today, cfg.min_stories)
    stored = store.baseline_rows(today, start, current, cfg.baseline_days)
    assert stored.groupby(["dimension", "key"]).size().max() == cfg.baseline_days  # only what the baselines use
    assert not stored["low_coverage"].any() and (stored["day"] < today.isoformat()).all()
    assert set(stored["key"]) == set(current["key"])
    columns = ["dimension", "key", "baseline_days", "zscore", "decayed_net"]
    pd.testing.assert_frame_equal(with_baselines(current, stored, today, cfg)[columns],
                                  with_baselines(current, whole, today, cfg)[columns])


def test_baselines_read_from_the_table_match_the_whole_history(tmp_path):
    _stored_baselines_match_the_whole_history(MonitorStore(f"sqlite:///{tmp_path / 'monitor.db'}"))


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []
    fail_first = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Receiver.fail_first > 0:
            _Receiver.fail_first -= 1
            self.send_response(503)
        else:
            _Receiver.received.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_is_retried_and_a_dead_one_never_raises():
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _Receiver.fail_first = 1
        result = post_webhook(f"http://127.0.0.1:{server.server_port}/hook", {"day": "1987-03-02", "alerts": [1]},
                              backoff_s=0.01)
        assert result["delivered"] and result["attempts"] == 2
        assert _Receiver.received == [{"day": "1987-03-02", "alerts": [1]}]
    finally:
        server.shutdown()
    dead = post_webhook(f"http://127.0.0.1:{free_port()}/hook", {"x": 1}, attempts=2, backoff_s=0.01, timeout_s=1)
    assert not dead["delivered"] and dead["attempts"] == 2 and dead["error"]


@pytest.fixture()
def postgres_url():
    """A fresh database on the machine's PostgreSQL (the scaled-out configuration's), dropped afterwards."""
    import os

    import psycopg

    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3,
                                autocommit=True)
    except psycopg.OperationalError as err:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {err}")
    name = f"finsent_monitor_test_{os.getpid()}"
    admin.execute(f"DROP DATABASE IF EXISTS {name}")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def test_the_tables_work_on_postgres_and_a_rerun_replaces_the_day(postgres_url):
    store = MonitorStore(postgres_url)
    day = date(1987, 3, 2)
    rows = day_aggregates(_scored(12, 0.2), day, 5).assign(baseline_days=0, model_version="3", onnx_sha256="ab" * 32)
    for _ in range(2):
        store.replace_day("index", day, rows)
    kept = store.read("index", day, day, dimension="overall")
    assert len(kept) == 1 and kept["net_mean"].tolist() == [pytest.approx(0.2)] and not kept["low_coverage"].any()
    assert len(store.read("index", day, day)) == 3
    store.close()


def test_baselines_from_postgres_match_the_whole_history(postgres_url):
    store = MonitorStore(postgres_url)
    try:
        _stored_baselines_match_the_whole_history(store)
    finally:
        store.close()


def test_the_onnx_encoder_embeds_as_the_pytorch_encoder_does(tiny_classifier, tiny_onnx, tmp_path):
    import torch

    from pipeline.export.onnx import export_encoder
    from pipeline.monitor.models import Encoder
    from pipeline.train.model import load_classifier
    from serving.model import OnnxClassifier

    texts = ["Profit rose.", "Net sales fell by 5 % in the quarter compared with a year earlier .", "Shares", "x " * 200]
    classifier = OnnxClassifier(tiny_onnx)
    encoder = Encoder(export_encoder(tiny_classifier, tmp_path / "encoder.onnx", classifier.max_length), classifier, 1)
    ours = encoder.embed(texts, batch_size=2)

    model, tokenizer = load_classifier(str(tiny_classifier))
    batch = tokenizer(texts, truncation=True, max_length=classifier.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.base_model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_a_day_has_work_only_with_news_or_outputs_to_clear(tmp_path):
    from pipeline.config import Settings
    from pipeline.data.landing import news_partition
    from pipeline.monitor.days import has_work, monitor_partition

    settings = Settings(project_dir=tmp_path / "project", state_dir=tmp_path / "state", landing_dir=tmp_path / "landing")
    quiet, landed, curated, scored = (date(1987, 3, d) for d in (1, 2, 3, 4))
    (settings.landing_zone / landed.isoformat()).mkdir(parents=True)
    (settings.landing_zone / landed.isoformat() / "notes.txt").write_text("not a landing file")
    assert not has_work(settings, landed)  # only tabular files count
    (settings.landing_zone / landed.isoformat() / "wire.jsonl").write_text("{}\n")
    news_partition(settings, curated).mkdir(parents=True)
    (news_partition(settings, curated) / "news.parquet").write_bytes(b"")
    monitor_partition(settings, scored).mkdir(parents=True)  # an earlier run's outputs, to be cleared
    assert [has_work(settings, day) for day in (quiet, landed, curated, scored)] == [False, True, True, True]
