"""The monitor's steps for one day, called by the monitor DAG's tasks and by
``finsent monitor`` alike: score the day's news, build its index and alerts,
check drift. Each writes its own files of ``data/monitor/date=<day>/`` and
replaces that day's rows of the SQL tables, so a re-run or a backfill of a
day replaces it and never adds to it. Later days' z-scores and decayed
averages read the earlier days' index: re-run from the first changed day."""

from __future__ import annotations

import json
import logging
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Settings
from pipeline.data.landing import day_files
from pipeline.monitor import MonitorError
from pipeline.monitor.alerts import describe, post_webhook
from pipeline.monitor.days import monitor_partition
from pipeline.monitor.dedup import find_reprints
from pipeline.monitor.index import INDEX_COLUMNS, day_aggregates, find_alerts, with_baselines
from pipeline.monitor.score import score_texts, story_scores
from pipeline.monitor.store import MonitorStore
from pipeline.monitor.stories import (
    load_day_stories, plain_tokenizer, read_parquet_partition, story_units,
)

log = logging.getLogger(__name__)

STORY_FILE, INDEX_FILE, ALERTS_FILE = "stories.parquet", "index.parquet", "alerts.parquet"
SHADOW_FILE, DRIFT_SAMPLE_FILE, DRIFT_FILE = "shadow.parquet", "drift_sample.npz", "drift.json"
HISTORY_DAYS = 400  # how far back baselines look for 30 days with stories


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def _write_json(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def _clear(partition: Path, *names: str) -> None:
    for name in names:
        (partition / name).unlink(missing_ok=True)


def store_for(settings: Settings) -> MonitorStore:
    if settings.monitor.database_url is None:  # the default SQLite file: its folder may not exist yet
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    return MonitorStore(settings.monitor_database_url)


def curated_stories(settings: Settings, day: date) -> pd.DataFrame | None:
    """The day's curated stories, curating the landing files first when the
    day has some but no curated partition yet."""
    stories = load_day_stories(settings, day)
    if stories is None and day_files(settings.landing_zone, day):
        from pipeline.data.news import ingest_news_day

        log.info("curating %s's landing files first (no curated partition yet)", day)
        ingest_news_day(settings, day)
        stories = load_day_stories(settings, day)
    return stories


def _earlier_stories(settings: Settings, day: date) -> pd.DataFrame:
    frames = []
    for back in range(settings.monitor.reprint_days, 0, -1):
        # Curated here if need be: in a parallel backfill the earlier day's own run may not have come yet.
        earlier = curated_stories(settings, day - timedelta(days=back))
        if earlier is not None:
            frames.append(earlier[["id", "timestamp", "title", "text"]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "timestamp", "title", "text"])


def _shadow(settings: Settings, champion, units: pd.DataFrame, probs: np.ndarray, stories: pd.DataFrame) -> dict | None:
    """The candidate's view of the same texts: agreement with the champion and a sample of disagreements."""
    from pipeline import registry
    from pipeline.monitor.models import load_alias

    candidate = load_alias(settings, registry.CANDIDATE)
    if candidate is None or candidate.version == champion.version or not len(units):
        return None
    theirs = score_texts(candidate.classifier, units["text"].tolist())
    ours_label = np.array(champion.classifier.labels)[probs.argmax(axis=1)]
    theirs_label = np.array(candidate.classifier.labels)[theirs.argmax(axis=1)]
    agree = ours_label == theirs_label
    their_stories = story_scores(units, theirs, candidate.classifier.labels).set_index("id")["label"]
    our_stories = stories.set_index("id")["label"].dropna()
    story_agreement = float((our_stories == their_stories.reindex(our_stories.index)).mean()) if len(our_stories) else None
    disagreements = units.loc[~agree, ["story_id", "text"]].assign(
        champion_label=ours_label[~agree], candidate_label=theirs_label[~agree],
        champion_version=champion.version, candidate_version=candidate.version,
    ).head(settings.monitor.shadow_sample)
    return {"champion_version": champion.version, "candidate_version": candidate.version, "texts": len(units),
            "agreement": float(agree.mean()), "story_agreement": story_agreement, "disagreements": disagreements}


def _forget_day(settings: Settings, day: date, store: MonitorStore | None) -> None:
    """A day that has no news (any more): none of its outputs remain."""
    partition = monitor_partition(settings, day)
    if partition.is_dir():
        for path in partition.iterdir():
            path.unlink()
        partition.rmdir()
    store = store or store_for(settings)
    for table in ("index", "alerts", "drift", "shadow"):
        store.replace_day(table, day, pd.DataFrame())


def score_news(settings: Settings, day: date, store: MonitorStore | None = None) -> dict:
    """Scores the day's stories with the champion (reprints counted once, and
    shadow-scored with the candidate when there is one) and keeps a sample of
    the day's sentences for the drift checks."""
    from pipeline.monitor.models import load_champion
    from pipeline.monitor.reference import day_seed, drift_sample, sample_sentences, save_sample

    partition = monitor_partition(settings, day)
    stories = curated_stories(settings, day)
    if stories is None or stories.empty:
        log.info("no news for %s (no curated stories, no landing files in %s): nothing to score",
                  day, settings.landing_zone)
        _forget_day(settings, day, store)
        return {"date": day.isoformat(), "status": "no news", "stories": 0}
    champion = load_champion(settings)
    stories["reprint_of"] = find_reprints(stories, _earlier_stories(settings, day), settings.monitor.near_duplicate_jaccard)
    originals = stories[stories["reprint_of"].isna()]
    classifier = champion.classifier
    units = story_units(originals, plain_tokenizer(classifier.tokenizer), classifier.max_length - 2)
    probs = score_texts(classifier, units["text"].tolist())
    scored = stories.merge(story_scores(units, probs, classifier.labels), on="id", how="left").assign(
        day=day.isoformat(), model_version=champion.version, onnx_sha256=champion.onnx_sha256)
    drift_texts = sample_sentences(originals["text"].tolist(), settings.monitor.drift_texts_per_day, day_seed(day))

    _write_parquet(scored.drop(columns=["text"]), partition / "stories.parquet")
    if drift_texts:
        save_sample(partition / DRIFT_SAMPLE_FILE, drift_texts, drift_sample(champion, drift_texts))
    else:
        _clear(partition, DRIFT_SAMPLE_FILE)
    shadow = _shadow(settings, champion, units, probs, scored[scored["reprint_of"].isna()])
    store = store or store_for(settings)
    if shadow is not None:
        disagreements = shadow.pop("disagreements")
        _write_parquet(disagreements, partition / SHADOW_FILE)
        log.info("shadow: candidate v%s agrees with champion v%s on %.1f%% of %d texts (disagreements in %s)",
                 shadow["candidate_version"], shadow["champion_version"], 100 * shadow["agreement"], shadow["texts"],
                 partition / SHADOW_FILE)
        for row in disagreements.head(3).itertuples():
            log.info("shadow: champion %s, candidate %s: %s", row.champion_label, row.candidate_label, row.text[:160])
    else:
        _clear(partition, SHADOW_FILE)
    store.replace_day("shadow", day, pd.DataFrame([shadow] if shadow else []))
    summary = {
        "date": day.isoformat(), "status": "scored", "stories": len(stories), "reprints": int(stories["reprint_of"].notna().sum()),
        "texts": len(units), "split_texts": int(units["split"].sum()), "model_version": champion.version,
        "onnx_sha256": champion.onnx_sha256, "shadow": shadow, "partition": str(partition.resolve()),
    }
    _write_json(summary, partition / "_score.json")
    return summary


def build_index(settings: Settings, day: date, store: MonitorStore | None = None) -> dict:
    """The day's index rows (overall, per entity, per topic) and its alerts."""
    partition = monitor_partition(settings, day)
    store = store or store_for(settings)
    path = partition / STORY_FILE
    if not path.is_file():
        log.info("no scored stories for %s: no index rows", day)
        _clear(partition, INDEX_FILE, ALERTS_FILE)
        store.replace_day("index", day, pd.DataFrame())
        store.replace_day("alerts", day, pd.DataFrame())
        return {"date": day.isoformat(), "status": "no news", "alerts": []}
    stories = read_parquet_partition(path)
    originals = stories[stories["reprint_of"].isna()]
    cfg = settings.monitor
    today = day_aggregates(originals, day, cfg.min_stories)
    history = store.baseline_rows(day, day - timedelta(days=HISTORY_DAYS), today, cfg.baseline_days)
    index = with_baselines(today, history, day, cfg)
    index = index.assign(model_version=stories["model_version"].iloc[0], onnx_sha256=stories["onnx_sha256"].iloc[0])
    index = index[INDEX_COLUMNS].sort_values(["dimension", "key"]).reset_index(drop=True)
    alerts = find_alerts(index, cfg)
    _write_parquet(index, partition / INDEX_FILE)
    _write_parquet(alerts, partition / ALERTS_FILE)
    store.replace_day("index", day, index)
    store.replace_day("alerts", day, alerts)
    records = json.loads(alerts.to_json(orient="records"))
    for alert in records:
        log.warning("%s", describe(alert))
    webhook = None
    if records and settings.alert_webhook:
        webhook = post_webhook(settings.alert_webhook, {"day": day.isoformat(), "alerts": records})
    overall = index[index["dimension"] == "overall"]
    return {"date": day.isoformat(), "status": "indexed", "rows": len(index), "alerts": records, "webhook": webhook,
            "overall": json.loads(overall.to_json(orient="records"))[0] if len(overall) else None}


def _window(settings: Settings, day: date):
    from pipeline.monitor.drift import DriftSample
    from pipeline.monitor.reference import load_sample

    samples = []
    for back in range(settings.monitor.drift_window_days - 1, -1, -1):
        path = monitor_partition(settings, day - timedelta(days=back)) / DRIFT_SAMPLE_FILE
        if path.is_file():
            samples.append(load_sample(path)[1])
    if not samples:
        return None
    return DriftSample(probs=np.concatenate([s.probs for s in samples]),
                       embeddings=np.concatenate([s.embeddings for s in samples]),
                       descriptors=np.concatenate([s.descriptors for s in samples]))


def detect_drift(settings: Settings, day: date, store: MonitorStore | None = None) -> dict:
    """Compares the trailing ``drift_window_days`` days' sentences with the
    champion's reference; ``drifted`` says whether to retrain."""
    from pipeline.monitor.drift import detect
    from pipeline.monitor.models import load_champion
    from pipeline.monitor.reference import day_seed, ensure_reference

    cfg = settings.monitor
    partition = monitor_partition(settings, day)
    store = store or store_for(settings)
    window = _window(settings, day)
    result = {"date": day.isoformat(), "window_days": cfg.drift_window_days, "drifted": False}
    if window is None or len(window) < cfg.drift_window_texts:
        n = 0 if window is None else len(window)
        log.info("drift %s: %d texts in the trailing %d days, fewer than a window (%d): no decision",
                 day, n, cfg.drift_window_days, cfg.drift_window_texts)
        _clear(partition, DRIFT_FILE)
        store.replace_day("drift", day, pd.DataFrame())
        return {**result, "status": "insufficient data", "window_texts": n}
    champion = load_champion(settings)
    reference, thresholds, meta = ensure_reference(settings, champion)
    picked = np.random.default_rng(day_seed(day)).choice(len(window), size=cfg.drift_window_texts, replace=False)
    report = detect(reference, window.take(np.sort(picked)), thresholds)
    rows = pd.DataFrame([{"statistic": name, "value": value, "threshold": report.thresholds.get(name),
                          "drifted": name in report.fired, "window_texts": cfg.drift_window_texts,
                          "model_version": champion.version, "onnx_sha256": champion.onnx_sha256}
                         for name, value in report.statistics.items()])
    store.replace_day("drift", day, rows)
    result = {**result, "status": "checked", **report.to_dict(), "reference": meta, "model_version": champion.version}
    _write_json(result, partition / DRIFT_FILE)
    if report.drifted:
        log.warning("DRIFT %s: %s past their thresholds", day, ", ".join(
            f"{name} {report.statistics[name]:.4g} > {report.thresholds[name]:.4g}" for name in report.fired))
    return result


def monitor_day(settings: Settings, day: date, store: MonitorStore | None = None) -> dict:
    """What the monitor DAG does for one day, in one process."""
    store = store or store_for(settings)
    scored = score_news(settings, day, store)
    if scored["status"] == "no news":  # as in the DAG, where the day's other tasks are skipped
        return {"date": day.isoformat(), "stories": 0, "reprints": 0, "status": "no news", "alerts": [],
                "overall": None, "drifted": False, "drift_status": "no news", "shadow": None}
    indexed = build_index(settings, day, store)
    drift = detect_drift(settings, day, store)
    return {"date": day.isoformat(), "stories": scored.get("stories", 0), "reprints": scored.get("reprints", 0),
            "status": scored["status"], "alerts": indexed["alerts"], "overall": indexed.get("overall"),
            "drifted": drift["drifted"], "drift_status": drift["status"], "shadow": scored.get("shadow")}


def monitor_range(settings: Settings, first: date, last: date) -> dict:
    """``finsent monitor --from --to``: each day in order, one line per day."""
    from tqdm.auto import tqdm

    if last < first:
        raise MonitorError(f"--to {last} is before --from {first}")
    store = store_for(settings)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    results = []
    try:
        for day in tqdm(days, desc="monitor", unit="day"):
            results.append(monitor_day(settings, day, store))
    finally:
        store.close()
    scored = [r for r in results if r["status"] == "scored"]
    return {"from": first.isoformat(), "to": last.isoformat(), "days": len(days), "days_with_news": len(scored),
            "stories": sum(r["stories"] for r in results), "reprints": sum(r["reprints"] for r in results),
            "alerts": [a for r in results for a in r["alerts"]],
            "drifted_days": [r["date"] for r in results if r["drifted"]],
            "database": settings.monitor_database_url, "partitions": str(settings.monitor_dir.resolve())}
