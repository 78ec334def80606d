"""Load on the sentiment API with wrk, against a naive FastAPI + PyTorch server
in the same run: single Financial PhraseBank sentences, loopback, the demo's
champion. (a) finsent at 1 and 16 clients, (b) the naive server at 1 and 16,
(c) overload: 256 clients against a small queue. Results: bench/results/serve_load.jsonl.

    python bench/serve_load.py [--duration 60]      (after `make demo`; needs wrk: apt install wrk)"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds per wrk run")
    parser.add_argument("--state", type=Path, default=REPO / ".finsent", help="the demo's state folder")
    parser.add_argument("--fpb-dir", type=Path, default=REPO.parent / "shared/data/financial_phrasebank")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--overload-queue", type=int, default=16, help="max_queue_texts of the overload run")
    parser.add_argument("--runs", default="finsent,naive,overload", help="which of the runs to do")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/serve_load.jsonl")
    return parser.parse_args()


def wrk_script(sentences: list[str], path: Path) -> Path:
    """Each request one sentence, drawn in a shuffled order."""
    bodies = ",\n".join(json.dumps(json.dumps({"texts": [s]})) for s in sentences)
    path.write_text(
        f"local bodies = {{\n{bodies}\n}}\n"
        "local i = math.random(#bodies)\n"
        'local headers = {["Content-Type"] = "application/json"}\n'
        "request = function()\n  i = i % #bodies + 1\n"
        '  return wrk.format("POST", "/v1/predict", headers, bodies[i])\nend\n')
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * _UNITS[unit]


def run_wrk(url: str, script: Path, clients: int, duration: int) -> dict:
    threads = min(clients, 2)
    done = subprocess.run(["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{duration}s", "--latency",
                           "--timeout", "10s", "-s", str(script), url], capture_output=True, text=True, check=True)
    out = done.stdout
    figures = {"clients": clients, "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
               "requests": int(re.search(r"(\d+) requests in", out).group(1))}
    for percentile in ("50", "90", "99"):
        figures[f"p{percentile}_ms"] = _ms(re.search(rf"^\s+{percentile}%\s+(\S+)", out, re.M).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figures["socket_errors"] = sum(map(int, errors.groups())) if errors else 0
    return figures


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_profile(pid: int, before: dict[int, float], after: dict[int, float], children: float, wall: float) -> dict:
    """Where the two cores went during one wrk run: the server's event-loop
    thread, its other threads (the inference thread and ONNX Runtime's pool),
    and wrk itself, in CPU seconds and as a share of all cores."""
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    others = sorted((v for tid, v in used.items() if tid != pid), reverse=True)
    capacity = wall * (os.cpu_count() or 1)
    return {"wall_s": round(wall, 1), "event_loop_cpu_s": round(used.get(pid, 0.0), 1),
            "other_threads_cpu_s": [round(v, 1) for v in others if v >= 0.1],
            "wrk_cpu_s": round(children, 1),
            "share_of_cores": round((sum(used.values()) + children) / capacity, 3)}


def server_buckets(url: str, route: str, status: str) -> list[tuple[float, float]]:
    """The server's own latency histogram for one route and status: (upper bound s, cumulative count)."""
    import httpx

    buckets = []
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        match = re.match(r"finsent_request_seconds_bucket\{(.*)\} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if labels["route"] == route and labels["status"] == status:
                buckets.append((float(labels["le"]), float(match.group(2))))
    return buckets


def histogram_between(before: list, after: list) -> dict:
    """Count and p99 (as the bucket bound it falls under) of what was observed between two readings."""
    earlier = dict(before)
    counts = [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]
    if not counts or counts[-1][1] == 0:
        return {"count": 0}
    total = counts[-1][1]
    return {"count": int(total), "p99_ms_at_most": next(b for b, c in counts if c >= 0.99 * total) * 1000}


def main() -> None:
    args = parse_args()
    from mlflow import MlflowClient

    from pipeline import registry, services
    from pipeline.config import Settings
    from pipeline.data.sources import read_phrasebank

    raw, _ = read_phrasebank(args.fpb_dir)
    sentences = raw["text"].drop_duplicates().tolist()
    random.Random(0).shuffle(sentences)
    work = Path(tempfile.mkdtemp(prefix="finsent-serve-load-"))
    script = wrk_script(sentences[: args.sentences], work / "requests.lua")
    mlflow_process, tracking_uri = services.start_mlflow_server(args.state.resolve())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FINSENT_", "AIRFLOW"))}
    env = {**base, "FINSENT_TRACKING_URI": tracking_uri, "FINSENT_STATE_DIR": str(work / "state")}
    record: dict = {"bench": "serve_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "host": platform.node(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "duration_s": args.duration,
                    "command": f"python bench/serve_load.py --duration {args.duration} --runs {args.runs}"}
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        settings = Settings(tracking_uri=tracking_uri)
        champion = MlflowClient(tracking_uri).get_model_version_by_alias(settings.model_name, "champion")
        record["model_version"] = champion.version
        hf_dir = registry.download_hf_model(champion, work / "hf")

        def measure(name: str, command_env: dict | None, clients: list[int], command: list[str] | None = None) -> None:
            port = services.free_port()
            url = f"http://127.0.0.1:{port}"
            log = work / f"{name}.log"
            if command is None:
                process = services.start_serving({**env, **(command_env or {})}, port, log)
            else:
                process = services.start_process(command + [str(port)], log, env)
                services.wait_for_http(f"{url}/readyz", timeout=300, process=process)
            try:
                if command is None:
                    record.setdefault("variant", httpx_json(f"{url}/v1/model")["variant"])
                for count in clients:
                    before = server_buckets(url, "/v1/predict", "200") if command is None else []
                    threads_before, children_before = thread_cpu(process.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
                    started = time.perf_counter()
                    figures = run_wrk(url, script, count, args.duration)
                    children = resource.getrusage(resource.RUSAGE_CHILDREN)
                    figures["cpu"] = cpu_profile(process.pid, threads_before, thread_cpu(process.pid),
                                                 children.ru_utime + children.ru_stime
                                                 - children_before.ru_utime - children_before.ru_stime,
                                                 time.perf_counter() - started)
                    if command is None:
                        figures["server_200"] = histogram_between(before, server_buckets(url, "/v1/predict", "200"))
                    record[f"{name}_c{count}"] = figures
                    print(name, json.dumps(figures), flush=True)
            finally:
                services.stop_process(process)

        runs = args.runs.split(",")
        if "finsent" in runs:
            measure("finsent", None, [1, 16])
        if "naive" in runs:
            measure("naive", None, [1, 16], [sys.executable, str(REPO / "bench" / "naive_server.py"), str(hf_dir)])
        if "overload" in runs:
            measure("overload", {"FINSENT_SERVING__MAX_QUEUE_TEXTS": str(args.overload_queue)}, [256])
        for clients in (1, 16):
            if f"finsent_c{clients}" in record and f"naive_c{clients}" in record:
                record[f"ratio_c{clients}"] = round(record[f"finsent_c{clients}"]["requests_per_s"]
                                                    / record[f"naive_c{clients}"]["requests_per_s"], 2)
    finally:
        services.stop_process(mlflow_process)
    line = json.dumps(record)
    print(line)
    with open(args.out, "a") as handle:
        handle.write(line + "\n")


def httpx_json(url: str) -> dict:
    import httpx

    return httpx.get(url).json()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
