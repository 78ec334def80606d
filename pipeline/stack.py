"""The scaled profile on one machine (``finsent stack up|down|status``, ``make
stack-up``/``stack-down``): the MLflow server on PostgreSQL, Airflow's API
server, scheduler, DAG processor and triggerer, and two Celery workers, one
for the default queue and one for the GPU queue. Each runs in a process group
of its own, recorded in ``<state_dir>/stack/stack.json``. PostgreSQL and Redis
are the machine's own, named by the scaled settings; they are checked, and
the databases created, but never started or stopped here."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import services
from pipeline.config import ScaledConfig, Settings

log = logging.getLogger(__name__)
AIRFLOW_COMPONENTS = ("scheduler", "dag-processor", "triggerer")
# Every process writes its task logs to one folder that the API server reads: no log server, which Airflow
# would bind to all interfaces.
LOCAL_LOGS = {"triggerer": ("--skip-serve-logs",)}
# Names each worker gives the task instances it runs (Airflow's "hostname"), read by
# airflow_local_settings.worker_hostname: on one machine the two workers are otherwise alike.
HOSTNAME_CALLABLE = "airflow_local_settings.worker_hostname"


class StackError(RuntimeError):
    """The stack cannot start: the profile, its services, or a stack already up."""


def stack_file(settings: Settings) -> Path:
    return settings.state_dir.resolve() / "stack" / "stack.json"


def require_services(scaled: ScaledConfig, timeout: float = 5.0) -> None:
    """PostgreSQL and Redis answer, or a StackError says which does not and where it was asked."""
    import redis
    import sqlalchemy

    problems = []
    engine = sqlalchemy.create_engine(scaled.database_url("postgres"), connect_args={"connect_timeout": int(timeout)})
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as error:
        problems.append(f"PostgreSQL at {_where(scaled.postgres_url)}: {str(error).splitlines()[0]}")
    finally:
        engine.dispose()
    try:
        redis.Redis.from_url(scaled.broker_url, socket_connect_timeout=timeout).ping()
    except redis.RedisError as error:
        problems.append(f"Redis at {_where(scaled.broker_url)}: {error}")
    if problems:
        raise StackError("the scaled profile needs its services: " + "; ".join(problems)
                         + " (FINSENT_SCALED__POSTGRES_URL, FINSENT_SCALED__BROKER_URL)")


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def ensure_databases(scaled: ScaledConfig) -> None:
    """Creates the Airflow, MLflow and monitor databases that do not exist yet."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(scaled.database_url("postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            existing = set(connection.execute(sqlalchemy.text("SELECT datname FROM pg_database")).scalars())
            for name in (scaled.airflow_database, scaled.mlflow_database, scaled.monitor_database):
                if name not in existing:
                    connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def _start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid it names one process,
    so a pid the system reused after a reboot or a crash is never signalled."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has ended: it only waits to be reaped


def _record(process: subprocess.Popen, log_path: Path) -> dict:
    return {"pid": process.pid, "start_time": _start_time(process.pid), "log": str(log_path)}


def _alive(entry: dict) -> bool:
    return entry["start_time"] is not None and _start_time(entry["pid"]) == entry["start_time"]


def _wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with code {process.returncode}; its log: {path}")
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{path} did not say {text!r} within {timeout:.0f}s")


def worker_command(name: str, queue: str, concurrency: int, pid_file: Path) -> list[str]:
    return [services._bin("airflow"), "celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
            "--celery-hostname", f"{name}@%h", "--pid", str(pid_file), "--skip-serve-logs"]


def _scaled(settings: Settings) -> ScaledConfig:
    if settings.scaled_profile is None:
        raise StackError("finsent stack runs the scaled profile: set FINSENT_PROFILE=scaled")
    return settings.scaled_profile


def _read(path: Path) -> dict:
    if not path.is_file():
        raise StackError(f"no stack is up for {path.parent.parent}: `finsent stack up` first")
    return json.loads(path.read_text())


def stack_env(settings: Settings, dags_folder: Path, base: dict | None = None) -> dict[str, str]:
    """The environment of ``airflow`` commands against the stack that is up (its database, broker and API server)."""
    record = _read(stack_file(settings))
    home = Path(record["airflow_home"])
    return services.airflow_env(home, dags_folder, dict(os.environ if base is None else base), _scaled(settings),
                                record["api_port"])


class _Starter:
    """Starts the stack's processes, each recorded in ``stack.json`` as soon as it runs: a failed start
    is still stopped by ``stack_down``."""

    def __init__(self, path: Path, record: dict, logs: Path):
        self.path, self.record, self.logs = path, record, logs

    def __call__(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log_path = self.logs / f"stack-{name}.log"
        process = services.start_process(args, log_path, env)
        self.record["processes"][name] = _record(process, log_path)
        self.path.write_text(json.dumps(self.record, indent=2))
        return process


def _start_worker(start: _Starter, env: dict[str, str], name: str, queue: str, concurrency: int) -> None:
    worker_env = {**env, "FINSENT_WORKER_NAME": name, "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE}
    process = start(f"worker-{name}", worker_command(name, queue, concurrency, start.path.parent / f"worker-{name}.pid"),
                    worker_env)
    _wait_for_line(Path(start.record["processes"][f"worker-{name}"]["log"]), " ready.", process, timeout=180)


def add_worker(settings: Settings, dags_folder: Path, name: str, queue: str, concurrency: int = 1) -> dict:
    """One more Celery worker in the stack that is up, e.g. a second GPU worker, or one that replaces a
    worker that died; ``stack_down`` stops it with the rest."""
    path = stack_file(settings)
    record = _read(path)
    if name in {key.removeprefix("worker-") for key in record["processes"]} and _alive(record["processes"][f"worker-{name}"]):
        raise StackError(f"worker {name} is running: give the new one another name")
    env = stack_env(settings, dags_folder)
    _start_worker(_Starter(path, record, settings.state_dir.resolve() / "logs"), env, name, queue, concurrency)
    return record["processes"][f"worker-{name}"]


def stack_up(settings: Settings, dags_folder: Path) -> dict:
    """Starts the scaled profile's processes and returns what ``stack.json`` records."""
    scaled = _scaled(settings)
    path = stack_file(settings)
    if path.is_file() and any(_alive(entry) for entry in json.loads(path.read_text())["processes"].values()):
        raise StackError(f"the stack of {path.parent} is up: `finsent stack down` first")
    require_services(scaled)
    ensure_databases(scaled)
    state = settings.state_dir.resolve()
    logs, home = state / "logs", state / "airflow"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"airflow_home": str(home), "tracking_uri": settings.tracking_uri, "processes": {}}
    start = _Starter(path, record, logs)
    try:
        tracking = urlsplit(settings.tracking_uri)
        api_port = services.free_port()
        record.update(api_port=api_port, api_url=f"http://127.0.0.1:{api_port}")
        env = services.airflow_env(home, dags_folder, dict(os.environ), scaled, api_port)
        if tracking.hostname in ("127.0.0.1", "localhost") and tracking.port:
            command = services.mlflow_server_command(state, tracking.port, scaled)
            process = start("mlflow", command, {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
            services.wait_for_http(f"{settings.tracking_uri}/health", timeout=180, process=process)
        services.migrate_airflow_db(env, logs / "airflow-db.log")
        services.create_gpu_pool(env, logs / "airflow-cli.log", settings.orchestration)
        process = start("api-server", [services._bin("airflow"), "api-server", "--host", "127.0.0.1", "--port",
                                       str(api_port)], env)
        services.wait_for_http(f"{record['api_url']}/api/v2/monitor/health", timeout=180, process=process)
        for component in AIRFLOW_COMPONENTS:
            start(component, [services._bin("airflow"), component, *LOCAL_LOGS.get(component, ())], env)
        _start_worker(start, env, "default", "default", scaled.worker_concurrency)
        orchestration = settings.orchestration
        _start_worker(start, env, "gpu", orchestration.gpu_queue, orchestration.gpu_pool_slots)
    except BaseException:
        stack_down(settings)
        raise
    log.info("stack up: Airflow %s, MLflow %s, Airflow home %s", record["api_url"], settings.tracking_uri, home)
    return record


def _stop_group(entry: dict, timeout: float) -> None:
    if not _alive(entry):
        return
    try:
        os.killpg(entry["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(entry) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(entry):
        try:
            os.killpg(entry["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def _marked_processes(airflow_home: str) -> list[int]:
    """Processes that carry the stack's AIRFLOW_HOME in their environment (every process it started, and their
    children): what a group signal could miss, e.g. a step that started a session of its own."""
    marker = f"AIRFLOW_HOME={airflow_home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stack_down(settings: Settings, timeout: float = 30.0) -> dict:
    """Stops the stack's process groups, newest first (SIGTERM, SIGKILL after ``timeout``), then any process
    still marked as the stack's. Returns what was stopped."""
    path = stack_file(settings)
    if not path.is_file():
        return {"stopped": [], "leftovers": []}
    record = json.loads(path.read_text())
    names = list(record["processes"])
    for name in reversed(names):
        _stop_group(record["processes"][name], timeout)
    leftovers = _marked_processes(record["airflow_home"])
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    path.unlink()
    if leftovers:
        log.warning("stack down: killed %d processes left outside the stack's groups", len(leftovers))
    return {"stopped": names, "leftovers": leftovers}


def stack_status(settings: Settings) -> dict:
    path = stack_file(settings)
    if not path.is_file():
        return {"up": False}
    record = json.loads(path.read_text())
    processes = {name: {**entry, "running": _alive(entry)} for name, entry in record["processes"].items()}
    return {**record, "processes": processes, "up": all(entry["running"] for entry in processes.values())}
