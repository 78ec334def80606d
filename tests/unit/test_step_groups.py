"""A step that a task started ends whole, its children and theirs too, however
the task ends: SIGTERM (Airflow's cancel), SIGKILL, an exception such as
Airflow's execution_timeout, or a real Airflow task past its execution_timeout."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _step_script(tmp_path: Path, marker: str) -> Path:
    """A step that starts a child, which starts a grandchild, then waits; each is found by ``marker``."""
    path = tmp_path / f"step_{marker}.py"
    path.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        from pipeline.steps import end_group_on_sigterm
        end_group_on_sigterm()
        subprocess.Popen([sys.executable, "-c",
                          "import subprocess, time; subprocess.Popen(['sleep', '{marker}']); time.sleep({marker})"])
        print("children started", flush=True)
        time.sleep({marker})
    """))
    return path


def _task(step: Path, before: str = "") -> str:
    """A task process: runs the step through run_command, as a DAG task does."""
    return textwrap.dedent(f"""
        import sys
        from pipeline.steps import run_command
        {before}
        run_command([sys.executable, {str(step)!r}], "test-step", "the test step")
    """)


def _survivors(marker: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline and process.info["pid"] != os.getpid():
            found.append(f"{process.info['pid']}: {cmdline[:120]}")
    return found


def _wait_for_step(marker: str, count: int = 4, timeout: float = 60) -> None:
    """The task, the step, its child and the grandchild."""
    deadline = time.monotonic() + timeout
    while len(_survivors(marker)) < count:
        assert time.monotonic() < deadline, f"the step's processes did not start: {_survivors(marker)}"
        time.sleep(0.2)


def _gone(marker: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while _survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _survivors(marker)


def _marker() -> str:
    return str(random.randint(40_000, 49_999))


def _start_task(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _leave_no_process(task: subprocess.Popen, marker: str) -> None:
    try:
        assert _gone(marker) == []
    finally:
        for process in psutil.process_iter(["pid", "cmdline"]):
            if marker in " ".join(process.info["cmdline"] or []):
                process.kill()
        task.kill()
        task.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_step_ends_whole_when_its_task_is_signalled(tmp_path, signum):
    marker = _marker()
    task = _start_task(_task(_step_script(tmp_path, marker)))
    _wait_for_step(marker)
    # The step, its child and the grandchild: three processes outside the task's own group.
    assert all(os.getpgid(p.pid) != task.pid for p in psutil.Process(task.pid).children(recursive=True))
    os.kill(task.pid, signum)
    _leave_no_process(task, marker)


def test_a_step_ends_whole_when_its_task_times_out(tmp_path):
    marker = _marker()
    alarm = textwrap.dedent("""
        import signal
        def timed_out(signum, frame):
            raise TimeoutError("execution_timeout")
        signal.signal(signal.SIGALRM, timed_out)
        signal.alarm(3)
    """).replace("\n", "\n        ")
    task = _start_task(_task(_step_script(tmp_path, marker), before=alarm))
    output, _ = task.communicate(timeout=60)
    assert task.returncode != 0 and "TimeoutError: execution_timeout" in output
    _leave_no_process(task, marker)


def test_an_airflow_task_past_its_execution_timeout_leaves_no_process(tmp_path):
    from pipeline import services

    marker = _marker()
    step = _step_script(tmp_path, marker)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "timeout_probe.py").write_text(textwrap.dedent(f"""
        from datetime import timedelta
        import pendulum
        from airflow.sdk import dag, task

        @dag(dag_id="timeout_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
        def timeout_probe():
            @task(execution_timeout=timedelta(seconds=5))
            def long_step():
                import sys
                from pipeline.steps import run_command
                run_command([sys.executable, {str(step)!r}], "test-step", "the test step")

            long_step()

        timeout_probe()
    """))
    env = services.airflow_env(tmp_path / "airflow", dags)
    services.migrate_airflow_db(env, tmp_path / "db.log")
    done = subprocess.run([str(Path(sys.executable).parent / "airflow"), "dags", "test", "timeout_probe"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    output = done.stdout + done.stderr
    assert "AirflowTaskTimeout" in output, output[-3000:]
    assert _gone(marker) == [], output[-3000:]
