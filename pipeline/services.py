"""Starting and stopping the embedded services (MLflow server, Airflow home,
serving app) on this machine: 127.0.0.1, free ports, own process groups."""

from __future__ import annotations

import configparser
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path

from pipeline.config import OrchestrationConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def start_process(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the process group it leads, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def mlflow_server_command(state_dir: Path, port: int) -> list[str]:
    """The embedded tracking server: SQLite backend, local artifact store, one worker."""
    root = (state_dir / "mlflow").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return [
        _bin("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]


def start_mlflow_server(state_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = start_process(mlflow_server_command(state_dir, port), state_dir / "logs" / "mlflow.log", env)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", timeout=180, process=process)
    return process, uri


def airflow_settings(airflow_home: Path, dags_folder: Path) -> dict[str, dict[str, str]]:
    """An embedded Airflow 3: SQLite metadata DB, LocalExecutor, small parallelism."""
    return {
        "core": {
            "dags_folder": str(dags_folder.resolve()),
            "load_examples": "False",
            "executor": "LocalExecutor",
            "parallelism": "4",
            "dags_are_paused_at_creation": "True",
        },
        # SQLite allows one writer: with the scheduler, DAG processor and API server
        # all writing, a CLI call needs to wait for the lock (60 s, not sqlite's 5 s).
        "database": {"sql_alchemy_conn": f"sqlite:///{airflow_home.resolve() / 'airflow.db'}?timeout=60"},
    }


def airflow_env(airflow_home: Path, dags_folder: Path, base: dict | None = None) -> dict[str, str]:
    """Environment for ``airflow`` commands on this home. The same settings go
    to ``airflow.cfg`` there, so ``AIRFLOW_HOME=… airflow standalone`` by hand
    sees the same database, DAGs and executor."""
    airflow_home = airflow_home.resolve()
    airflow_home.mkdir(parents=True, exist_ok=True)
    settings = airflow_settings(airflow_home, dags_folder)
    config = configparser.ConfigParser(interpolation=None)
    config.read(airflow_home / "airflow.cfg")
    # Scheduler, API server and task workers must sign and check task tokens
    # with one secret; without a shared one every task is refused (403).
    secret = config.get("api_auth", "jwt_secret", fallback=None) or secrets.token_urlsafe(32)
    settings["api_auth"] = {"jwt_secret": secret}
    config = configparser.ConfigParser(interpolation=None)
    config.read_dict(settings)
    with open(airflow_home / "airflow.cfg", "w") as handle:
        config.write(handle)
    env = dict(base if base is not None else os.environ)
    env["AIRFLOW_HOME"] = str(airflow_home)
    for section, options in settings.items():
        env.update({f"AIRFLOW__{section.upper()}__{key.upper()}": value for key, value in options.items()})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# Airflow's own structured log lines: "2026-11-25T18:43:09.568590Z [info     ] ...".
_AIRFLOW_LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z \[")


def airflow(args: list[str], env: dict[str, str], log_path: Path, echo_task_output: bool = False) -> None:
    """Runs an ``airflow`` command with its full output in ``log_path``. With
    ``echo_task_output``, what the tasks print (progress bars, step results)
    is shown live and Airflow's own log lines stay in the file. Failures raise
    with the end of the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "a") as log, subprocess.Popen(
        [_bin("airflow"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        for line in process.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            if echo_task_output and not _AIRFLOW_LOG_LINE.match(line):
                sys.stdout.write(line)
                sys.stdout.flush()
    if process.returncode != 0:
        raise RuntimeError(
            f"airflow {' '.join(args)} exited with {process.returncode}; full log: {log_path}\n" + "\n".join(tail)
        )


def migrate_airflow_db(env: dict[str, str], log_path: Path) -> None:
    """``airflow db migrate``; an embedded SQLite database is then switched to
    write-ahead logging (a property of the file, kept from then on), so the
    scheduler's and API server's reads no longer block a CLI call's writes."""
    airflow(["db", "migrate"], env, log_path)
    url = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if url.startswith("sqlite:///"):
        database = url.removeprefix("sqlite:///").split("?", 1)[0]
        with sqlite3.connect(database, timeout=60) as connection:
            connection.execute("PRAGMA journal_mode=WAL")


def create_gpu_pool(env: dict[str, str], log_path: Path, orchestration: OrchestrationConfig) -> None:
    """The pool that training tasks run in: one slot per GPU, so no two jobs share a device."""
    airflow(["pools", "set", orchestration.gpu_pool, str(orchestration.gpu_pool_slots), "finsent training (one slot per GPU)"],
            env, log_path)


def start_airflow_services(env: dict[str, str], logs: Path) -> tuple[list[subprocess.Popen], str]:
    """API server, scheduler and DAG processor on free ports, each in its own
    process group: what ``airflow backfill`` and scheduled runs need. Returns
    the processes and the API server's URL; ``env`` is updated to point at it."""
    api_port, log_port = free_port(), free_port()
    env.update({
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
    })
    airflow_bin = _bin("airflow")
    processes = [start_process([airflow_bin, "api-server", "--host", "127.0.0.1", "--port", str(api_port)], logs / "airflow-api-server.log", env)]
    try:
        wait_for_http(f"http://127.0.0.1:{api_port}/api/v2/monitor/health", timeout=120, process=processes[0])
        for component in ("scheduler", "dag-processor"):
            processes.append(start_process([airflow_bin, component], logs / f"airflow-{component}.log", env))
    except BaseException:
        for process in processes:
            stop_process(process)
        raise
    return processes, f"http://127.0.0.1:{api_port}"


def start_serving(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    process = start_process(
        [sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(port)], log_path, env
    )
    wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, process=process)
    return process
