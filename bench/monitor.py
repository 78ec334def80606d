"""Monitor benchmarks on the demo's champion (run ``make demo`` first).

* ``scoring``: stories/s of the monitor's scoring path (ONNX through
  ``serving.model.OnnxClassifier``, batched, length-sorted, a repeated text
  scored once) against scoring the same stories' texts one by one through
  PyTorch, in the same run.
* ``drift``: the drift detector's false-alarm rate on shuffled
  in-distribution windows (Reuters sentences outside the reference) and its
  detection rate on shifted windows (Financial PhraseBank negatives only;
  non-financial text: Python standard-library docstrings).
* ``span``: the whole Reuters-21578 span (1987-02-26..1987-10-20, 58 days with
  stories) through ``finsent monitor --from --to``'s function (what the DAG's
  tasks call, in one process); ``backfill``: the same span through ``airflow
  backfill create`` under a real scheduler (LocalExecutor); wall time of each.
* ``threads``: one and four scoring processes at once with ONNX Runtime on
  all cores or one thread each (what ``FINSENT_MONITOR__THREADS`` sets).

    .venv/bin/python bench/monitor.py --parts scoring,drift,span,backfill

Starts its own MLflow server on the demo's state (``.finsent``), works in
``.finsent/bench-monitor``, appends one JSON object per part to
``bench/results/monitor.jsonl`` and prints it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPAN = (date(1987, 2, 26), date(1987, 10, 20))
SCORING_DAYS = (date(1987, 3, 2), date(1987, 3, 3))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="scoring,drift,backfill")
    parser.add_argument("--state", type=Path, default=REPO / ".finsent", help="the demo's state folder")
    parser.add_argument("--work", type=Path, default=REPO / ".finsent" / "bench-monitor")
    parser.add_argument("--fpb-dir", type=Path, default=REPO.parent / "shared/data/financial_phrasebank")
    parser.add_argument("--reuters-dir", type=Path, default=REPO.parent / "shared/data/reuters21578")
    parser.add_argument("--baseline-stories", type=int, default=120, help="stories scored one text at a time (PyTorch)")
    parser.add_argument("--windows", type=int, default=100, help="drift windows per kind")
    parser.add_argument("--from", dest="first", type=date.fromisoformat, default=SPAN[0], help="first day of the span")
    parser.add_argument("--to", dest="last", type=date.fromisoformat, default=SPAN[1], help="last day of the span")
    parser.add_argument("--backfill-timeout", type=float, default=1800, help="seconds before the backfill part reports")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/monitor.jsonl")
    return parser.parse_args()


def bench_settings(args, tracking_uri: str, **monitor):
    from pipeline.config import MonitorConfig, Settings

    return Settings(project_dir=args.work / "project", state_dir=args.work / "state", tracking_uri=tracking_uri,
                    reuters_dir=args.reuters_dir, fpb_dir=args.fpb_dir, landing_dir=args.work / "landing",
                    monitor=MonitorConfig(**monitor))


def prepare(args, settings) -> None:
    """A landing zone of every Reuters day and the corpus the champion was adapted on (the drift reference)."""
    from pipeline.data.landing import layout_reuters

    layout_reuters(args.reuters_dir, settings.landing_zone)
    corpus = REPO / "data" / "curated" / "corpus" / "reuters.parquet"
    if not corpus.is_file():
        raise SystemExit(f"{corpus} is missing: run `make demo` first")
    settings.corpus_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(corpus, settings.corpus_path)


def scoring(args, settings) -> dict:
    import torch

    from pipeline import registry
    from pipeline.monitor.jobs import curated_stories
    from pipeline.monitor.models import load_champion
    from pipeline.monitor.score import score_texts, story_scores
    from pipeline.monitor.stories import plain_tokenizer, story_units
    from pipeline.train.model import load_classifier

    import pandas as pd

    stories = pd.concat([curated_stories(settings, day) for day in SCORING_DAYS], ignore_index=True)
    champion = load_champion(settings)
    classifier = champion.classifier
    plain = plain_tokenizer(classifier.tokenizer)

    def ours(frame):
        units = story_units(frame, plain, classifier.max_length - 2)
        return story_scores(units, score_texts(classifier, units["text"].tolist()), classifier.labels), units

    ours(stories.head(20))  # warm-up
    started = time.perf_counter()
    scores, units = ours(stories)
    ours_s = time.perf_counter() - started

    hf_dir = registry.download_hf_model(registry.connect_uri(settings.tracking_uri).get_model_version(
        settings.model_name, champion.version), args.work / "hf")
    model, tokenizer = load_classifier(str(hf_dir))
    model.eval()
    subset = stories.head(args.baseline_stories)
    subset_units = story_units(subset, plain, classifier.max_length - 2)
    with torch.no_grad():
        model(**tokenizer(["warm up"], return_tensors="pt"))
        started = time.perf_counter()
        probs = []
        for text in subset_units["text"]:
            batch = tokenizer([text], truncation=True, max_length=classifier.max_length, return_tensors="pt")
            probs.append(torch.softmax(model(**batch).logits, dim=-1)[0].numpy())
        baseline_s = time.perf_counter() - started
    baseline = story_scores(subset_units, np.array(probs), classifier.labels).set_index("id")
    ours_subset = scores.set_index("id").loc[baseline.index]
    ours_rate, baseline_rate = len(stories) / ours_s, len(subset) / baseline_s
    return {
        "stories": len(stories), "texts": len(units), "ours_s": round(ours_s, 2),
        "ours_stories_per_s": round(ours_rate, 1), "ours_texts_per_s": round(len(units) / ours_s, 1),
        "baseline_stories": len(subset), "baseline_texts": len(subset_units), "baseline_s": round(baseline_s, 2),
        "baseline_stories_per_s": round(baseline_rate, 2), "baseline_texts_per_s": round(len(subset_units) / baseline_s, 1),
        "speedup": round(ours_rate / baseline_rate, 2),
        "max_abs_net_diff": float((ours_subset["net_sentiment"] - baseline["net_sentiment"]).abs().max()),
        "torch_threads": torch.get_num_threads(), "model_version": champion.version,
    }


_THREADS_WORKER = """
import sys, time
from serving.model import OnnxClassifier
texts = open(sys.argv[2]).read().split("\\n")
classifier = OnnxClassifier(sys.argv[1], threads=int(sys.argv[3]) or None)
classifier.probabilities(texts[:16])
started = time.perf_counter()
classifier.probabilities(texts)
print(time.perf_counter() - started)
"""


def threads(args, settings) -> dict:
    """Several scoring processes at once, as parallel Airflow tasks run them:
    ONNX Runtime threads per process against wall time for all of them."""
    import pandas as pd

    from pipeline.data.sources import split_sentences
    from pipeline.monitor.models import load_champion

    model_dir = load_champion(settings).classifier.model_dir
    corpus = pd.read_parquet(settings.corpus_path, columns=["text"])["text"].head(2000)
    texts = [s for text in corpus for s in split_sentences(text)][:1500]
    path = args.work / "threads-texts.txt"
    path.write_text("\n".join(texts))
    out: dict = {"texts_per_process": len(texts), "runs": []}
    for processes, per_process in ((1, 0), (1, 1), (4, 0), (4, 1)):
        started = time.perf_counter()
        workers = [subprocess.Popen([sys.executable, "-c", _THREADS_WORKER, str(model_dir), str(path), str(per_process)],
                                    stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(processes)]
        inner = [float(w.communicate()[0]) for w in workers]
        wall = time.perf_counter() - started
        out["runs"].append({"processes": processes, "threads": per_process or "cores", "wall_s": round(wall, 2),
                            "scoring_s": [round(x, 2) for x in inner],
                            "texts_per_s": round(processes * len(texts) / max(inner), 1)})
    return out


def _docstring_sentences(limit: int) -> list[str]:
    """English prose that is not financial news: the standard library's docstrings."""
    import collections, email, http.client, json as json_module, logging as logging_module, pathlib, re as re_module
    import argparse as argparse_module, itertools, functools, textwrap, unittest, urllib.request, zipfile

    from pipeline.data.sources import split_sentences

    texts = []
    for module in (collections, email, http.client, json_module, logging_module, pathlib, re_module, argparse_module,
                   itertools, functools, textwrap, unittest, urllib.request, zipfile, os, subprocess, inspect):
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member) or ""
            texts += [s for s in split_sentences(" ".join(doc.split())) if 40 <= len(s) <= 300 and ">>>" not in s]
    return list(dict.fromkeys(texts))[:limit]


def drift(args, settings) -> dict:
    import pandas as pd

    from pipeline.data.sources import read_phrasebank, read_reuters
    from pipeline.monitor.drift import ReferenceProfile, detect
    from pipeline.monitor.models import load_champion
    from pipeline.monitor.reference import drift_sample, ensure_reference, reference_texts, sample_sentences

    champion = load_champion(settings)
    started = time.perf_counter()
    reference, thresholds, meta = ensure_reference(settings, champion)
    reference_s = time.perf_counter() - started
    size = settings.monitor.drift_window_texts
    used = set(reference_texts(settings, settings.monitor.drift_reference_texts, per_day=1, min_days=1)[0])
    corpus = read_reuters(args.reuters_dir)
    fresh = [s for s in sample_sentences(corpus["text"].tolist(), 3 * size + len(used), seed=11) if s not in used]
    raw, _ = read_phrasebank(args.fpb_dir)
    negatives = raw[raw["label"] == "negative"]["text"].drop_duplicates().tolist()
    kinds = {"in_distribution": fresh, "fpb_negatives": negatives, "non_financial": _docstring_sentences(3 * size)}
    profile = ReferenceProfile.build(reference)
    rng = np.random.default_rng(0)
    result = {"reference": meta, "reference_build_s": round(reference_s, 1), "window_texts": size,
              "thresholds": thresholds}
    for kind, texts in kinds.items():
        sample = drift_sample(champion, texts)
        fired, which = 0, {}
        for _ in range(args.windows):
            window = sample.take(rng.choice(len(sample), size=min(size, len(sample)), replace=False))
            report = detect(profile, window, thresholds)
            fired += report.drifted
            for name in report.fired:
                which[name] = which.get(name, 0) + 1
        result[kind] = {"texts": len(texts), "windows": args.windows, "fired_rate": fired / args.windows,
                        "statistics_fired": which}
    return result


def span(args, settings) -> dict:
    """The whole span in one process, through the functions the DAG's tasks call."""
    from pipeline.monitor.jobs import monitor_range

    first, last = args.first, args.last
    out: dict = {"span": [first.isoformat(), last.isoformat()], "calendar_days": (last - first).days + 1}
    cli_settings = settings.model_copy(update={"project_dir": args.work / "cli-project", "state_dir": args.work / "cli-state"})
    cli_settings.corpus_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(settings.corpus_path, cli_settings.corpus_path)
    started = time.perf_counter()
    result = monitor_range(cli_settings, first, last)
    out["cli"] = {"wall_s": round(time.perf_counter() - started, 1), "days_with_news": result["days_with_news"],
                  "stories": result["stories"], "reprints": result["reprints"], "alerts": len(result["alerts"]),
                  "drifted_days": result["drifted_days"]}
    return out


def backfill(args, settings) -> dict:
    """The whole span through ``airflow backfill create`` under a real scheduler."""
    from pipeline import services

    first, last = args.first, args.last
    out: dict = {"span": [first.isoformat(), last.isoformat()], "calendar_days": (last - first).days + 1}
    home = args.work / "airflow"
    shutil.rmtree(home, ignore_errors=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FINSENT_", "AIRFLOW"))}
    env = services.airflow_env(home, REPO / "dags", {
        **base, "FINSENT_PROJECT_DIR": str(settings.project_dir), "FINSENT_STATE_DIR": str(settings.state_dir),
        "FINSENT_LANDING_DIR": str(settings.landing_zone), "FINSENT_TRACKING_URI": settings.tracking_uri,
        "FINSENT_REUTERS_DIR": str(args.reuters_dir), "FINSENT_FPB_DIR": str(args.fpb_dir),
        "FINSENT_MONITOR__START_DATE": first.isoformat(), "FINSENT_MONITOR__END_DATE": last.isoformat(),
    })
    logs = args.work / "logs"
    services.migrate_airflow_db(env, logs / "airflow-db.log")
    services.airflow(["dags", "reserialize"], env, logs / "airflow-cli.log")
    services.airflow(["dags", "unpause", "monitor"], env, logs / "airflow-cli.log")
    started = time.perf_counter()
    services.airflow(["backfill", "create", "--dag-id", "monitor", "--from-date", first.isoformat(),
                      "--to-date", last.isoformat(), "--reprocess-behavior", "completed"], env, logs / "airflow-cli.log")
    processes, _ = services.start_airflow_services(env, logs)
    try:
        runs = services.wait_for_runs("monitor", env, lambda run: run["run_id"].startswith("backfill__"),
                                      out["calendar_days"], timeout=args.backfill_timeout)
    finally:
        for process in reversed(processes):
            services.stop_process(process)
    finished = [r for r in runs if r["state"] in ("success", "failed")]
    out["airflow_backfill"] = {"wall_s": round(time.perf_counter() - started, 1), "runs": len(runs),
                               "finished": len(finished), "days_with_news_done": sum(
                                   (settings.monitor_dir / f"date={r['logical_date'][:10]}" / "index.parquet").is_file()
                                   for r in finished),
                               "failed": [r["run_id"] for r in finished if r["state"] != "success"],
                               "parallelism": env["AIRFLOW__CORE__PARALLELISM"],
                               "tasks": _task_seconds(env)}
    return out


def _task_seconds(env: dict[str, str]) -> list[dict]:
    """Per task and state: how many ran and their seconds, from Airflow's metadata DB."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    query = sqlalchemy.text("SELECT task_id, state, COUNT(*), SUM(duration), AVG(duration) FROM task_instance "
                            "WHERE dag_id = 'monitor' GROUP BY task_id, state ORDER BY task_id, state")
    try:
        with engine.connect() as connection:
            return [{"task": task, "state": state, "count": count, "total_s": round(total or 0, 1),
                     "mean_s": round(mean or 0, 2)} for task, state, count, total, mean in connection.execute(query)]
    finally:
        engine.dispose()


def main() -> None:
    args = parse_args()
    from pipeline import services

    args.work.mkdir(parents=True, exist_ok=True)
    mlflow_process, tracking_uri = services.start_mlflow_server(args.state.resolve())
    try:
        settings = bench_settings(args, tracking_uri)
        prepare(args, settings)
        for part in args.parts.split(","):
            started = time.perf_counter()
            figures = {"scoring": scoring, "drift": drift, "span": span, "backfill": backfill,
                       "threads": threads}[part](args, settings)
            record = {"bench": f"monitor.{part}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "host": platform.node(), "cpus": os.cpu_count(), "part_wall_s": round(time.perf_counter() - started, 1),
                      "command": "python bench/monitor.py --parts " + part, **figures}
            line = json.dumps(record, default=str)
            print(line, flush=True)
            with open(args.out, "a") as handle:
                handle.write(line + "\n")
    finally:
        services.stop_process(mlflow_process)


if __name__ == "__main__":
    main()
