"""Running a ``finsent`` step in a subprocess: how DAG tasks launch heavy
work (CUDA must not start in a forked worker; the same command runs under
torchrun, in a container or in a pod).

A step runs in a process group of its own, which ends whole however its task
ends: a timeout or any exception in the task (Airflow's execution_timeout
raises one), a SIGTERM to the task (Airflow's cancel, whose ``on_kill`` a
TaskFlow task cannot override), or the task's death by SIGKILL (the step's
leader gets SIGTERM from the kernel, PR_SET_PDEATHSIG). On SIGTERM the step
ends its own group too (``end_group_on_sigterm``): DataLoader workers, torchrun
ranks and compile workers go with it."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque

from pipeline.logs import ProgressThrottle, Segments, log_file_for, mark, parse_meter, plain, summarize


class StepFailed(RuntimeError):
    pass


def _step_log(step: str) -> str:
    """`` (full log: <path>)``: where ``finsent <step>`` wrote its full log, if it wrote one."""
    try:
        from pipeline.config import Settings

        path = log_file_for(Settings().state_dir, step).resolve()
    except Exception:  # the settings are the step's to report on
        return ""
    return f" (full log: {path})" if path.is_file() else ""


_PR_SET_PDEATHSIG = 1
GRACE_S = 10.0
# Set for the step's process: it leads a group of its own and ends it on SIGTERM.
STEP_GROUP_ENV = "FINSENT_STEP_GROUP"
try:  # loaded here: the forked child must not load a library before exec
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:
    _LIBC = None


def _signal_on_parent_death(parent: int) -> None:
    """In the step's process, between fork and exec."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the task died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def end_group(process: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the step's process group, SIGKILL to what is left of it after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def end_group_on_sigterm() -> None:
    """In a step started by ``run_step`` (the leader of its group): a SIGTERM
    ends the whole group, children first, then this process."""
    if not os.environ.get(STEP_GROUP_ENV) or os.getpgid(0) != os.getpid():
        return

    def end(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal reaches this process too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(0, signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, end)


@contextlib.contextmanager
def _ends_with_the_task(process: subprocess.Popen):
    """While the step runs: a SIGTERM to this process ends the step's group and
    then does what it did before (Airflow calls the task's ``on_kill``); any
    exception ends the group before it propagates."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException:
        end_group(process)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        # The leader has exited; anything it left in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def run_step(*args: str) -> dict:
    """Streams the step's output through and returns the JSON object on its
    last line. Its progress bars (tqdm meters, ``\\r``-updated) come through
    as at most one ``[finsent <step>] <meter>`` line a second and percent;
    after the result, one ``[finsent <step>] <summary>`` line (what
    ``services.airflow`` shows on the demo's terminal)."""
    return run_command([sys.executable, "-m", "pipeline.cli", *args], args[0] if args else "", f"finsent {' '.join(args)}")


def run_command(command: list[str], step: str, label: str) -> dict:
    """``run_step`` for any command that prints a JSON object last; ``label`` names it in errors."""
    tail: deque[str] = deque(maxlen=40)

    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    progress = ProgressThrottle(step, write)
    segments = Segments()
    parent = os.getpid()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                          env={**os.environ, STEP_GROUP_ENV: "1"}, preexec_fn=lambda: _signal_on_parent_death(parent),
                          ) as process, _ends_with_the_task(process):
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            for text, _ in segments.feed(chunk):
                _forward(text, progress, write, tail)
        for text, _ in segments.close():
            _forward(text, progress, write, tail)
        process.wait()
    progress.flush()
    if process.returncode != 0:
        raise StepFailed(f"{label} exited with {process.returncode}{_step_log(step)}:\n"
                         + "\n".join(list(tail)[-15:]))
    try:
        result = json.loads(tail[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise StepFailed(f"{label} printed no JSON result line") from err
    summary = summarize(step, result)
    if summary:
        write(mark(step, summary))
    return result


def _forward(text: str, progress: ProgressThrottle, write, tail: deque[str]) -> None:
    meter = parse_meter(text)
    if meter is not None:
        progress.update(meter)
        return
    text = plain(text)
    if text.strip():
        progress.flush()
        write(text)
        tail.append(text)
