"""Starting and stopping the embedded services (MLflow server, Airflow home,
serving app) on this machine: 127.0.0.1, free ports, own process groups."""

from __future__ import annotations

import ast
import configparser
import json
import logging
import os
import re
import secrets
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import deque
from pathlib import Path

from pipeline.config import OrchestrationConfig, ScaledConfig
from pipeline.logs import Segments, StatusLine, meter_percent, parse_mark, parse_meter, plain, summarize

log = logging.getLogger(__name__)


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


def mlflow_server_command(state_dir: Path, port: int, scaled: ScaledConfig | None = None) -> list[str]:
    """The tracking server, one worker: embedded, a SQLite backend and a local artifact store; scaled,
    the backend store on PostgreSQL and the artifacts where the scaled settings say."""
    root = (state_dir / "mlflow").resolve()
    root.mkdir(parents=True, exist_ok=True)
    backend, artifacts = f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")
    if scaled is not None:
        backend, artifacts = scaled.database_url(scaled.mlflow_database), scaled.artifacts_destination or artifacts
    return [
        _bin("mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]


def start_mlflow_server(state_dir: Path, port: int | None = None,
                        scaled: ScaledConfig | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = start_process(mlflow_server_command(state_dir, port, scaled), state_dir / "logs" / "mlflow.log", env)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", timeout=180, process=process)
    return process, uri


def airflow_settings(airflow_home: Path, dags_folder: Path, scaled: ScaledConfig | None = None) -> dict[str, dict[str, str]]:
    """Embedded (``scaled`` None): an SQLite metadata DB, the LocalExecutor, small parallelism.
    Scaled: the metadata DB on PostgreSQL, the CeleryExecutor with the Redis broker, task states
    in the metadata DB's server (Celery's database result backend)."""
    settings = {
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
    if scaled is not None:
        metadata = scaled.database_url(scaled.airflow_database)
        # Parallelism: Airflow's own default (AIRFLOW__CORE__PARALLELISM): the workers' concurrency bounds each host.
        settings["core"]["executor"] = "CeleryExecutor"
        del settings["core"]["parallelism"]
        # Airflow's async engine would take asyncpg for PostgreSQL; psycopg 3 is async itself.
        settings["database"] = {"sql_alchemy_conn": metadata,
                                "sql_alchemy_conn_async": metadata.replace("+psycopg:", "+psycopg_async:", 1)}
        settings["celery"] = {"broker_url": scaled.broker_url, "result_backend": f"db+{metadata}",
                              "worker_concurrency": str(scaled.worker_concurrency)}
        settings["operators"] = {"default_queue": "default"}
    return settings


def airflow_env(airflow_home: Path, dags_folder: Path, base: dict | None = None,
                scaled: ScaledConfig | None = None, api_port: int | None = None) -> dict[str, str]:
    """Environment for ``airflow`` commands on this home. The same settings go
    to ``airflow.cfg`` there, so ``AIRFLOW_HOME=… airflow standalone`` by hand
    sees the same database, DAGs and executor (and, with ``api_port``, the API
    server that the task workers report to)."""
    airflow_home = airflow_home.resolve()
    airflow_home.mkdir(parents=True, exist_ok=True)
    settings = airflow_settings(airflow_home, dags_folder, scaled)
    if api_port is not None:
        settings["api"] = {"port": str(api_port)}
        settings["core"]["execution_api_server_url"] = f"http://127.0.0.1:{api_port}/execution/"
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
    # Several monitor days score at once: their ONNX Runtime threads share the cores instead of fighting over them.
    tasks_per_host = scaled.worker_concurrency if scaled is not None else int(settings["core"]["parallelism"])
    env.setdefault("FINSENT_MONITOR__THREADS", str(max(1, (os.cpu_count() or 1) // tasks_per_host)))
    # airflow_local_settings.py: the scheduler imports the pipeline before forking tasks.
    local_settings = str((dags_folder / "local_settings").resolve())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [local_settings, env.get("PYTHONPATH")]))
    return env


# Airflow's own structured log lines: "2026-11-25T18:43:09.568590Z [info     ] ...".
_AIRFLOW_LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z \[")
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(?P<task>\S+) map_index=(?P<map_index>-?\d+)")
_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=")
_RETURNED = re.compile(r"\] Done\. Returned value was: (?P<value>.*) \[airflow\.task\.operators\.[\w.]+\]")
_TASK_FAILED = re.compile(r"\[error\s*\] Task failed with exception")
# Our own loggers' warnings: as Airflow logs them (in-process tasks) and as a step's terminal shows them.
_PIPELINE_WARNING = re.compile(
    r"^(?:\S+Z \[(?P<level>warning|error|critical)\s*\] (?P<event>.*?)\s+\[pipeline(?:\.\w+)*\]"
    r"|\d{2}:\d{2}:\d{2} (?P<level2>WARNING|ERROR|CRITICAL) pipeline(?:\.\w+)*: (?P<message>.*))"
)


class TaskEcho:
    """What ``airflow dags test`` prints, cut down for the terminal: one
    status line for the running task (its progress bar, or how long it has
    run), rewritten in place; one summary line per task that has one (the
    marked lines ``steps.run_step`` prints, or the result an in-process task
    returned, from Airflow's log); our own warnings; a line when a task fails.
    Everything else (Airflow's, the libraries' and the steps' own logs) stays
    in the log file."""

    def __init__(self, dag_id: str, log_path: Path, status: StatusLine | None = None, refresh: float | None = None,
                 clock=time.monotonic):
        self.dag_id, self.log_path, self._clock = dag_id, log_path, clock
        self.status = status or StatusLine()
        isatty = getattr(self.status.stream, "isatty", lambda: False)()
        # Piped into a file, the bar is redrawn less often: the file keeps every redraw.
        self.refresh = refresh if refresh is not None else (1.0 if isatty else 5.0)
        self.task: str | None = None
        self.meter: str | None = None
        self.summarized = False
        self._started = self._rendered = 0.0
        self._shown = ""

    @property
    def label(self) -> str:
        return self.task or self.dag_id

    def feed(self, text: str) -> None:
        if started := _TASK_START.search(text):
            map_index = int(started.group("map_index"))
            self.task = started.group("task") + (f"[{map_index}]" if map_index > 0 else "")
            self.meter, self.summarized, self._started = None, False, self._clock()
            self.render(force=True)
        elif _TASK_END.search(text):
            self.task, self._shown = None, ""
            self.status.clear()
        elif returned := _RETURNED.search(text):
            if self.task is not None:
                self._returned(returned.group("value"))
        elif _TASK_FAILED.search(text):
            self.echo(f"failed; Airflow's log: {self.log_path}")
        elif warning := _PIPELINE_WARNING.match(text):
            level = (warning.group("level") or warning.group("level2")).lower()
            self.echo(f"{level}: {warning.group('event') or warning.group('message')}", final=False)
        elif _AIRFLOW_LOG_LINE.match(text):
            pass
        elif marked := parse_mark(text):
            meter = parse_meter(marked[1])
            if meter is not None:
                self.progress(meter)
            else:
                self.echo(marked[1])
        elif (meter := parse_meter(text)) is not None:
            self.progress(meter)

    def _returned(self, value: str) -> None:
        try:
            result = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            result = value  # a str is logged without quotes (a run id, a digest)
        summary = summarize(f"{self.dag_id}.{self.task.split('[')[0]}", result)
        if summary:
            self.echo(summary)

    def progress(self, meter: str) -> None:
        # A finished bar (loading weights, a download) gives way to the task's running time.
        self.meter = None if meter_percent(meter) == 100 else meter
        self.render()

    def echo(self, text: str, final: bool = True) -> None:
        self.status.line(f"  {self.label:<15} {text}")
        log.info("%s %s: %s", self.dag_id, self.label, text)
        self.summarized = self.summarized or final
        self._rendered, self._shown = float("-inf"), ""

    def render(self, force: bool = False) -> None:
        now = self._clock()
        if self.task is None or self.summarized or (not force and now - self._rendered < self.refresh):
            return
        elapsed = int(now - self._started)
        text = f"  {self.label:<15} {self.meter or f'running {elapsed // 60}:{elapsed % 60:02d}'}"
        if text != self._shown:
            self.status.show(text)
            self._shown = text
        self._rendered = now

    def close(self) -> None:
        self.status.clear()


def airflow(args: list[str], env: dict[str, str], log_path: Path, echo_task_output: bool = False) -> None:
    """Runs an ``airflow`` command with its full output in ``log_path``. With
    ``echo_task_output``, the tasks' progress and results are shown live
    (``TaskEcho``) and everything else stays in the file. Failures raise
    with the end of what the tasks printed (or of the log) and its path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=30)
    task_tail: deque[str] = deque(maxlen=30)  # lines that are not Airflow's own: the tasks' output, tracebacks
    dag_id = args[2] if len(args) > 2 and args[:2] == ["dags", "test"] else "airflow"
    echo = TaskEcho(dag_id, log_path) if echo_task_output else None
    segments = Segments()
    try:
        with open(log_path, "a", encoding="utf-8") as log, subprocess.Popen(
            [_bin("airflow"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as process:
            stdout = process.stdout.fileno()
            finished = False
            while not finished:
                pieces: list[tuple[str, str]] = []
                if select.select([stdout], [], [], 1.0)[0]:  # at most a second between status redraws
                    chunk = os.read(stdout, 65536)
                    finished = not chunk
                    pieces = list(segments.feed(chunk) if chunk else segments.close())
                for text, ending in pieces:
                    text = plain(text)
                    if ending == "\r" and parse_meter(text) is not None:
                        if echo is not None:  # progress redraws: shown, not logged
                            echo.feed(text)
                        continue
                    log.write(text + "\n")
                    if text.strip():
                        tail.append(text)
                        if not _AIRFLOW_LOG_LINE.match(text) and not text.startswith("[finsent "):
                            task_tail.append(text)
                    if echo is not None:
                        echo.feed(text)
                log.flush()
                if echo is not None:
                    echo.render()
    finally:
        if echo is not None:
            echo.close()
    if process.returncode != 0:
        raise RuntimeError(
            f"airflow {' '.join(args)} exited with {process.returncode}; full log: {log_path}\n"
            + "\n".join(task_tail or tail)
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


def dag_runs(dag_id: str, env: dict[str, str]) -> list[dict]:
    """The DAG's runs (``run_id``, ``state``, ``logical_date``) read from Airflow's
    metadata DB: an ``airflow dags list-runs`` costs 1.6 s of CPU, which a poll
    every few seconds takes from the tasks it waits for on a small machine."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text(
                "SELECT run_id, state, logical_date FROM dag_run WHERE dag_id = :dag_id ORDER BY logical_date"),
                {"dag_id": dag_id}).all()
    finally:
        engine.dispose()
    return [{"run_id": run_id, "state": state, "logical_date": str(logical_date)} for run_id, state, logical_date in rows]


def wait_for_runs(dag_id: str, env: dict[str, str], wanted, count: int, timeout: float) -> list[dict]:
    """Polls until ``count`` runs for which ``wanted(run)`` holds are finished, or ``timeout``
    seconds pass; returns those runs as last seen (a caller checks their number and states)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [run for run in dag_runs(dag_id, env) if wanted(run)]
        if len(runs) == count and all(run["state"] in ("success", "failed") for run in runs):
            return runs
        if time.monotonic() > deadline:
            return runs
        time.sleep(1)
