"""Airflow imports this module at the start of each of its processes (the
folder is on PYTHONPATH, see ``pipeline.services.airflow_env``). The scheduler
running the LocalExecutor and a Celery worker fork every task from
themselves: importing the pipeline's heavy modules there, once and before the
forks, spares each task the 2-8 s of CPU it would spend importing pandas, ONNX
Runtime, MLflow and Great Expectations. Other Airflow commands skip it."""

import sys


def _forks_tasks(argv: list[str]) -> bool:
    return argv[1:2] == ["scheduler"] or argv[1:3] == ["celery", "worker"]


if _forks_tasks(sys.argv):
    import pipeline.preload  # noqa: F401


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers ``finsent stack up`` starts: several workers share one
    host there, so each task instance records ``<worker>@<host>`` (the Celery node's name)."""
    import os
    import socket

    name = os.environ.get("FINSENT_WORKER_NAME")
    return f"{name}@{socket.getfqdn()}" if name else socket.getfqdn()
