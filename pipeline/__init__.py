"""finsent: the pipeline library. It knows nothing of Airflow."""
