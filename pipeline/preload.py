"""The modules a task process would import, imported ahead by the process
that forks the tasks (see ``dags/local_settings/airflow_local_settings.py``).
Importing starts no thread, so forking afterwards is safe."""

import great_expectations  # noqa: F401
import mlflow  # noqa: F401
import onnxruntime  # noqa: F401

import pipeline.data.ingest  # noqa: F401
import pipeline.data.news  # noqa: F401
import pipeline.monitor.drift  # noqa: F401
import pipeline.monitor.jobs  # noqa: F401
import pipeline.monitor.models  # noqa: F401
import pipeline.monitor.reference  # noqa: F401
import pipeline.registry  # noqa: F401
