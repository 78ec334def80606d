"""Running a ``finsent`` step in a subprocess: how DAG tasks launch heavy
work (CUDA must not start in a forked worker; the same command runs under
torchrun, in a container or in a pod)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque


class StepFailed(RuntimeError):
    pass


def run_step(*args: str) -> dict:
    """Streams the step's output through and returns the JSON object on its last line."""
    command = [sys.executable, "-m", "pipeline.cli", *args]
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                tail.append(line.rstrip("\n"))
    if process.returncode != 0:
        raise StepFailed(f"finsent {' '.join(args)} exited with {process.returncode}:\n" + "\n".join(list(tail)[-15:]))
    try:
        return json.loads(tail[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise StepFailed(f"finsent {' '.join(args)} printed no JSON result line") from err
