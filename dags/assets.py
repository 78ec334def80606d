"""Every Airflow Asset of the pipeline, defined once; the DAG files import them
from here (Airflow puts the DAG folder on ``sys.path``).

ingest --(CURATED_LABELED, CURATED_CORPUS)--> train --(CANDIDATE_MODEL)--> release --(CHAMPION_MODEL)-->
monitor --(DRIFT)--> train"""

from __future__ import annotations

from airflow.sdk import Asset

CURATED_LABELED = Asset("finsent-curated-labeled")
CURATED_CORPUS = Asset("finsent-curated-corpus")
CANDIDATE_MODEL = Asset("finsent-model-candidate")
CHAMPION_MODEL = Asset("finsent-model-champion")
# Emitted by the monitor when the news drifted from the champion's training data; the train DAG listens.
DRIFT = Asset("finsent-drift")
