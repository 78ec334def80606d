"""Starting and stopping the embedded services (MLflow server, Airflow home,
serving app) on this machine: 127.0.0.1, free ports, own process groups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


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


def airflow_env(airflow_home: Path, dags_folder: Path, base: dict | None = None) -> dict[str, str]:
    """An embedded Airflow 3: SQLite metadata DB, LocalExecutor, small parallelism."""
    airflow_home = airflow_home.resolve()
    airflow_home.mkdir(parents=True, exist_ok=True)
    env = dict(base if base is not None else os.environ)
    env.update({
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder.resolve()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def airflow(args: list[str], env: dict[str, str], log_path: Path | None = None) -> subprocess.CompletedProcess:
    """Runs an ``airflow`` command; output goes to ``log_path`` (or through) and failures raise."""
    if log_path is None:
        done = subprocess.run([_bin("airflow"), *args], env=env)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            done = subprocess.run([_bin("airflow"), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        where = f"; see {log_path}" if log_path else ""
        raise RuntimeError(f"airflow {' '.join(args)} exited with {done.returncode}{where}")
    return done


def start_serving(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    process = start_process(
        [sys.executable, "-m", "pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(port)], log_path, env
    )
    wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, process=process)
    return process
