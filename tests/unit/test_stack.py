"""The scaled profile's settings and ``finsent stack``'s refusals and
bookkeeping, without the services (``tests/scaled`` runs the real stack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pipeline import services, stack
from pipeline.config import ScaledConfig, Settings


def test_the_scaled_profile_puts_airflow_on_postgres_and_celery(tmp_path):
    scaled = ScaledConfig(postgres_url="postgresql+psycopg://airflow@db:5432", broker_url="redis://broker:6379/3")
    options = services.airflow_settings(tmp_path / "home", tmp_path / "dags", scaled)
    assert options["core"]["executor"] == "CeleryExecutor"
    assert options["database"]["sql_alchemy_conn"] == "postgresql+psycopg://airflow@db:5432/finsent_airflow"
    assert options["database"]["sql_alchemy_conn_async"] == "postgresql+psycopg_async://airflow@db:5432/finsent_airflow"
    assert options["celery"]["broker_url"] == "redis://broker:6379/3"
    assert options["celery"]["result_backend"] == "db+postgresql+psycopg://airflow@db:5432/finsent_airflow"
    assert options["operators"]["default_queue"] == "default"
    embedded = services.airflow_settings(tmp_path / "home", tmp_path / "dags")
    assert embedded["core"]["executor"] == "LocalExecutor" and embedded["database"]["sql_alchemy_conn"].startswith("sqlite")


def test_the_scaled_profile_puts_mlflow_and_the_monitor_on_postgres(tmp_path):
    settings = Settings(profile="scaled", state_dir=tmp_path)
    assert settings.monitor_database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/finsent_monitor"
    command = services.mlflow_server_command(tmp_path, 5000, settings.scaled_profile)
    assert command[command.index("--backend-store-uri") + 1] == "postgresql+psycopg://postgres@127.0.0.1:5432/finsent_mlflow"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    embedded = Settings(state_dir=tmp_path)
    assert embedded.scaled_profile is None and embedded.monitor_database_url.startswith("sqlite:///")


def _finsent(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_stack_up_refuses_the_embedded_profile_and_names_a_missing_service(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("FINSENT_")}
    env = {**base, "FINSENT_STATE_DIR": str(tmp_path)}
    done = _finsent("stack", "up", env=env)
    assert done.returncode == 1 and "set FINSENT_PROFILE=scaled" in done.stderr, done.stderr
    # Nothing listens on these ports: both services are named, with where they were asked.
    postgres, redis = services.free_port(), services.free_port()
    env.update({"FINSENT_PROFILE": "scaled", "FINSENT_SCALED__POSTGRES_URL": f"postgresql+psycopg://postgres@127.0.0.1:{postgres}",
                "FINSENT_SCALED__BROKER_URL": f"redis://127.0.0.1:{redis}/0"})
    done = _finsent("stack", "up", env=env)
    assert done.returncode == 1, done.stderr
    assert f"PostgreSQL at 127.0.0.1:{postgres}" in done.stderr and f"Redis at 127.0.0.1:{redis}" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "stack" / "stack.json").exists()


def test_stack_down_signals_only_the_processes_it_started(tmp_path):
    first = subprocess.Popen(["sleep", "60"], start_new_session=True)
    second = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        path = tmp_path / "stack" / "stack.json"
        path.parent.mkdir()
        processes = {
            "ours": {"pid": first.pid, "start_time": stack._start_time(first.pid), "log": ""},
            # The same pid with another start time: a process that reused the pid of one that ended.
            "reused": {"pid": second.pid, "start_time": stack._start_time(second.pid) - 1, "log": ""},
        }
        path.write_text(json.dumps({"airflow_home": str(tmp_path / "airflow"), "processes": processes}))
        settings = Settings(profile="scaled", state_dir=tmp_path)
        status = stack.stack_status(settings)
        assert status["processes"]["ours"]["running"] and not status["processes"]["reused"]["running"]
        assert stack.stack_down(settings, timeout=5)["stopped"] == ["ours", "reused"]
        assert first.wait(timeout=10) == -15  # SIGTERM
        time.sleep(0.2)
        assert second.poll() is None  # never signalled
        assert not path.exists() and stack.stack_status(settings) == {"up": False}
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_stack_down_ends_processes_that_left_the_group(tmp_path):
    """A step runs in a session of its own: the group signal misses it, the stack's AIRFLOW_HOME finds it."""
    home = str(tmp_path / "airflow")
    leader = subprocess.Popen(["sleep", "60"], start_new_session=True, env={**os.environ, "AIRFLOW_HOME": home})
    escaped = subprocess.Popen(["sleep", "60"], start_new_session=True, env={**os.environ, "AIRFLOW_HOME": home})
    try:
        path = tmp_path / "stack" / "stack.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"airflow_home": home, "processes": {
            "leader": {"pid": leader.pid, "start_time": stack._start_time(leader.pid), "log": ""}}}))
        result = stack.stack_down(Settings(profile="scaled", state_dir=tmp_path), timeout=5)
        assert result["leftovers"] == [escaped.pid]
        assert escaped.wait(timeout=10) == -9 and leader.wait(timeout=10) == -15
    finally:
        for process in (leader, escaped):
            process.kill()
            process.wait()


@pytest.mark.parametrize("action", ["status", "down"])
def test_stack_status_and_down_without_a_stack(tmp_path, action):
    settings = Settings(profile="scaled", state_dir=tmp_path)
    result = stack.stack_status(settings) if action == "status" else stack.stack_down(settings)
    assert result in ({"up": False}, {"stopped": [], "leftovers": []})
