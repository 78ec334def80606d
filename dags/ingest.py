"""ingest: Financial PhraseBank + Reuters-21578 → cleaned, split, validated,
versioned Parquet under data/ (DVC), announced as Assets."""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

CURATED_LABELED = Asset("finsent-curated-labeled")
CURATED_CORPUS = Asset("finsent-curated-corpus")


@dag(dag_id="ingest", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["finsent"])
def ingest_dag():
    @task(outlets=[CURATED_LABELED, CURATED_CORPUS])
    def ingest() -> dict:
        from pipeline.config import get_settings
        from pipeline.data.ingest import ingest as run_ingest

        return run_ingest(get_settings())

    ingest()


ingest_dag()
