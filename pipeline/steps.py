"""Running a ``finsent`` step in a subprocess: how DAG tasks launch heavy
work (CUDA must not start in a forked worker; the same command runs under
torchrun, in a container or in a pod)."""

from __future__ import annotations

import json
import subprocess
import sys
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


def run_step(*args: str) -> dict:
    """Streams the step's output through and returns the JSON object on its
    last line. Its progress bars (tqdm meters, ``\\r``-updated) come through
    as at most one ``[finsent <step>] <meter>`` line a second and percent;
    after the result, one ``[finsent <step>] <summary>`` line (what
    ``services.airflow`` shows on the demo's terminal)."""
    step = args[0] if args else ""
    command = [sys.executable, "-m", "pipeline.cli", *args]
    tail: deque[str] = deque(maxlen=40)

    def write(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    progress = ProgressThrottle(step, write)
    segments = Segments()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            for text, _ in segments.feed(chunk):
                _forward(text, progress, write, tail)
        for text, _ in segments.close():
            _forward(text, progress, write, tail)
    progress.flush()
    if process.returncode != 0:
        raise StepFailed(f"finsent {' '.join(args)} exited with {process.returncode}{_step_log(step)}:\n"
                         + "\n".join(list(tail)[-15:]))
    try:
        result = json.loads(tail[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise StepFailed(f"finsent {' '.join(args)} printed no JSON result line") from err
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
