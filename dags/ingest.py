"""ingest (@daily): the labeled reference set (Financial PhraseBank) and the
bulk corpus, plus exactly the run's day of the news landing zone; then DVC
versioning. Outputs are Assets the train DAG is scheduled on."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task
from assets import CURATED_LABELED, CURATED_CORPUS


@dag(
    dag_id="ingest",
    schedule="@daily",
    # Reuters-21578 starts on 1987-02-26: backfills over its days have real data.
    start_date=pendulum.datetime(1987, 2, 26, tz="UTC"),
    catchup=False,
    # One day at a time: each run versions the shared data/ folder with DVC.
    max_active_runs=1,
    tags=["finsent"],
)
def ingest_dag():
    @task
    def ingest_labeled() -> dict:
        from pipeline.config import get_settings
        from pipeline.data.ingest import ingest_labeled as run

        return run(get_settings())

    @task
    def ingest_corpus() -> dict | None:
        from pipeline.config import get_settings
        from pipeline.data.ingest import ingest_corpus as run

        return run(get_settings())

    @task
    def ingest_news(data_interval_start=None) -> dict:
        from pipeline.config import get_settings
        from pipeline.data.news import ingest_news_day

        return ingest_news_day(get_settings(), data_interval_start.date())

    @task(outlets=[CURATED_LABELED, CURATED_CORPUS])
    def version_data(labeled: dict, corpus: dict | None, news: dict) -> str:
        from pipeline.config import get_settings
        from pipeline.data.ingest import version_curated

        return version_curated(get_settings())

    version_data(ingest_labeled(), ingest_corpus(), ingest_news())


ingest_dag()
