"""The modules a task process would import, imported ahead by the process
that forks the tasks (see ``dags/local_settings/airflow_local_settings.py``):
the monitor's and the curation's, with pandas, ONNX Runtime and MLflow under
them, and Great Expectations, which the validation imports only when it runs.
Importing starts no thread, so forking afterwards is safe."""

import great_expectations  # noqa: F401

import pipeline.data.ingest  # noqa: F401
import pipeline.monitor.drift  # noqa: F401
import pipeline.monitor.jobs  # noqa: F401
import pipeline.monitor.models  # noqa: F401
import pipeline.monitor.reference  # noqa: F401
