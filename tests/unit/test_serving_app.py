"""The sentiment API on the tiny exported model, through a real uvicorn server
on a loopback port: cross-request batching, limits and bad input, metrics,
explanations, readiness, the full queue, and a drained shutdown."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import hypothesis
import numpy as np
import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient

from pipeline import services
from pipeline.config import ServingConfig, Settings
from serving.app import create_app
from serving.model import OnnxClassifier, softmax

WORDS = ("profit rose sales fell the company said quarterly net income was up down sharply compared with a year "
         "earlier shares of oil prices in Finland grew by percent").split()


@contextmanager
def running(app):
    """The app under uvicorn on a free loopback port, in a thread of this process."""
    port = services.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _settings(tiny_onnx: Path, **serving) -> Settings:
    return Settings(serving=ServingConfig(model_dir=tiny_onnx, **{"max_batch": 8, **serving}))


@pytest.fixture(scope="module")
def server(tiny_onnx):
    with running(create_app(_settings(tiny_onnx))) as url:
        yield url


def test_predict_returns_label_scores_net_and_model(server):
    body = httpx.post(f"{server}/v1/predict", json={"texts": ["Profit rose .", "Sales fell ."]}).json()
    assert body["model_name"] == "finsent-test" and body["model_version"] == "7"
    assert body["model_variant"] == "fp32" and body["model_alias"] is None
    assert len(body["predictions"]) == 2
    for prediction in body["predictions"]:
        scores = prediction["scores"]
        assert set(scores) == {"negative", "neutral", "positive"}
        assert prediction["label"] == max(scores, key=scores.get)
        assert prediction["net"] == pytest.approx(scores["positive"] - scores["negative"], abs=1e-6)
    one = httpx.post(f"{server}/v1/predict", json={"text": "Profit rose ."}).json()
    assert one["predictions"][0]["scores"] == pytest.approx(body["predictions"][0]["scores"], abs=1e-6)


def test_concurrent_requests_are_batched_and_each_gets_its_own_result(server, tiny_onnx):
    rng = random.Random(0)
    requests = [[" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(rng.randint(1, 3))]
                for _ in range(60)]
    before = _metric(server, "finsent_batch_texts_count")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda texts: httpx.post(f"{server}/v1/predict", json={"texts": texts}, timeout=60),
                                requests))
    assert [a.status_code for a in answers] == [200] * len(requests)
    model = OnnxClassifier(tiny_onnx)
    for texts, answer in zip(requests, answers):
        alone = softmax(np.concatenate([model.logits([text]) for text in texts]))  # each text unbatched
        got = np.array([[p["scores"][label] for label in model.labels] for p in answer.json()["predictions"]])
        np.testing.assert_allclose(got, alone, atol=1e-5)
    batches = _metric(server, "finsent_batch_texts_count") - before
    assert batches < len(requests), "no two requests shared a batch"


def test_a_batch_runs_in_length_order_in_groups_that_pad_little(tiny_onnx):
    from serving.model import PAD_SLACK

    model = OnnxClassifier(tiny_onnx)
    rng = random.Random(1)
    ids = model.encode([" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in range(50)])
    runs: list[list[int]] = []
    run_encoded = model.run_encoded
    model.run_encoded = lambda group: runs.append([len(t) for t in group]) or run_encoded(group)
    logits = model.run_sorted(ids)
    np.testing.assert_allclose(logits, np.concatenate([run_encoded([t]) for t in ids]), atol=1e-5)
    assert sum(map(len, runs)) == len(ids) and 1 < len(runs) < len(ids)
    for group in runs:
        assert len(group) <= model.batch_size
        assert len(group) == 1 or max(group) * len(group) <= (1 + PAD_SLACK) * sum(group)


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + (labels or " ")) or line.startswith(name + "{" + labels.strip("{}") + "}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_show_requests_batches_queue_and_the_model(server):
    httpx.post(f"{server}/v1/predict", json={"text": "Profit rose ."})
    text = httpx.get(f"{server}/metrics").text
    for name in ("finsent_requests_total", "finsent_request_seconds_bucket", "finsent_queue_texts",
                 "finsent_batch_texts_bucket", "finsent_batch_padded_tokens_bucket", "finsent_queue_seconds_bucket",
                 "finsent_inference_seconds_bucket", "finsent_model_load_failures_total",
                 "finsent_predicted_texts_total"):
        assert name in text, name
    assert 'finsent_model_info{alias="None",name="finsent-test",variant="fp32",version="7"} 1.0' in text
    assert _metric(server, "finsent_requests_total", '{route="/v1/predict",status="200"}') >= 1


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"texts": []}, 422, "at least 1"),
        ({}, 422, "give 'text'"),
        ({"text": "a", "texts": ["b"]}, 422, "not both"),
        ({"texts": ["fine", 3]}, 422, "valid string"),
        ({"texts": ["fine", "  "]}, 422, "texts[1] is empty"),
        ({"texts": "not a list"}, 422, "valid list"),
        ({"texts": ["a"] * 9}, 422, "at most 8"),
        ({"texts": ["a" * 201]}, 422, "longer than 200 characters"),
        ({"texts": ["fine"], "extra": 1}, 422, "extra"),
        ({"texts": ["up " * 66], "explain": True}, 422, "short texts only"),
    ],
)
def test_bad_requests_get_a_4xx_saying_what_is_wrong(tiny_onnx, payload, status, fragment):
    with TestClient(create_app(_settings(tiny_onnx, max_text_chars=200))) as client:
        response = client.post("/v1/predict", json=payload)
    assert response.status_code == status and fragment in response.text, response.text


@pytest.mark.parametrize(
    ("body", "headers", "status", "fragment"),
    [
        (b'{"texts": ["\\ud800 lone"]}', {}, 422, "lone surrogate"),
        (b'{"texts": ["ok"', {}, 422, "JSON"),
        (b'{"texts": ["\xff\xfe bad bytes"]}', {}, 400, "parsing the body"),
        (b"texts=ok", {"content-type": "application/x-www-form-urlencoded"}, 422, "must be a JSON object"),
        (json.dumps({"texts": ["x" * 3000]}).encode(), {}, 413, "at most 2048"),
    ],
)
def test_broken_bodies_get_a_4xx_and_never_an_internal_detail(tiny_onnx, body, headers, status, fragment):
    with TestClient(create_app(_settings(tiny_onnx, max_body_bytes=2048))) as client:
        response = client.post("/v1/predict", content=body, headers={"content-type": "application/json", **headers})
    assert response.status_code == status and fragment in response.text, response.text
    assert "Traceback" not in response.text and str(tiny_onnx) not in response.text


def test_a_chunked_body_over_the_limit_gets_413(tiny_onnx):
    def chunks():
        for _ in range(10):
            yield b"x" * 500

    with running(create_app(_settings(tiny_onnx, max_body_bytes=2048))) as url:
        response = httpx.post(f"{url}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "more than 2048 bytes" in response.text
        assert httpx.post(f"{url}/v1/predict", json={"text": "Profit rose ."}).status_code == 200


def test_explain_names_the_words_that_moved_the_label(server):
    text = "Operating profit rose sharply compared with a year earlier ."
    prediction = httpx.post(f"{server}/v1/predict", json={"text": text, "explain": True}).json()["predictions"][0]
    words = prediction["explanation"]
    assert 1 <= len(words) <= 8 and all(w["token"] in text for w in words)
    sizes = [abs(w["weight"]) for w in words]
    assert sizes == sorted(sizes, reverse=True)
    plain = httpx.post(f"{server}/v1/predict", json={"text": text}).json()["predictions"][0]
    assert plain["explanation"] is None and plain["scores"] == pytest.approx(prediction["scores"], abs=1e-6)


def test_health_readiness_and_model(server, tiny_onnx):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "7"
    model = httpx.get(f"{server}/v1/model").json()
    assert model["version"] == "7" and model["variant"] == "fp32" and model["loaded_at"]
    assert set(model["sha256"]) == {"model.onnx", "tokenizer.json"}
    assert httpx.post(f"{server}/v1/admin/reload").status_code == 404  # no token configured: the endpoint is off


def test_not_ready_when_the_model_cannot_load_says_why_in_one_word(tmp_path):
    settings = Settings(serving=ServingConfig(model_dir=tmp_path / "missing"))
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready", "reason": "model_files_unreadable"}
        refused = client.post("/v1/predict", json={"texts": ["x"]})
        assert refused.status_code == 503 and str(tmp_path) not in refused.text
        assert "finsent_model_load_failures_total 1.0" in client.get("/metrics").text


def test_a_full_queue_answers_503_with_retry_after_at_once(tiny_onnx):
    # The first request fills the whole queue while its batch waits 5 s for company; every other
    # request is refused while it still waits, so "at once" needs no clock here.
    app = create_app(_settings(tiny_onnx, max_batch=4, max_queue_texts=4, max_wait_ms=5000))
    with running(app) as url, ThreadPoolExecutor(12) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/predict", json={"texts": ["Profit rose ."] * 4}, timeout=30)
        while _metric(url, "finsent_queue_texts") < 4:
            assert not first.done(), first.result().text
            time.sleep(0.02)
        others = list(pool.map(lambda _: httpx.post(f"{url}/v1/predict", json={"text": "Sales fell ."}, timeout=30),
                               range(10)))
        assert not first.done(), "the refusals waited for the queue to drain"
        assert [r.status_code for r in others] == [503] * 10
        assert all(r.headers["retry-after"] == "1" and "capacity" in r.text for r in others)
        assert first.result().status_code == 200
        assert _metric(url, "finsent_rejected_total", '{reason="queue_full"}') == 10


def test_sigterm_drains_queued_requests_then_exits(tiny_onnx, tmp_path):
    port = services.free_port()
    env = {**os.environ, "FINSENT_SERVING__MODEL_DIR": str(tiny_onnx), "FINSENT_SERVING__MAX_WAIT_MS": "1500",
           "FINSENT_STATE_DIR": str(tmp_path / "state")}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port)], env=env,
                               stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        services.wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, process=process)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/predict",
                                  json={"texts": ["Profit rose ."] * 3}, timeout=30)
            time.sleep(0.5)  # queued: its batch waits 1.5 s
            process.send_signal(signal.SIGTERM)
            assert pending.result().status_code == 200
        # uvicorn exits by re-raising the signal once it has drained.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Finished server process" in (tmp_path / "serve.log").read_text()
    finally:
        services.stop_process(process)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


@pytest.fixture(scope="module")
def api_schema(tiny_onnx, tmp_path_factory):
    state = tmp_path_factory.mktemp("schema-state")
    app = create_app(Settings(state_dir=state, serving=ServingConfig(model_dir=tiny_onnx, max_batch=8,
                                                                     max_text_chars=500, max_body_bytes=20_000)))
    with running(app) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


OPERATIONS = ["GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/model", "POST /v1/predict", "GET /v1/index",
              "POST /v1/admin/reload"]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_the_openapi_spec_holds_no_5xx_and_no_schema_violation(api_schema, operation):
    # schemathesis's pytest loader does not run under this pytest; its Python API does.
    from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)

    found = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in api_schema.get_all_operations())}
    assert set(found) == set(OPERATIONS), sorted(found)

    @hypothesis.given(case=found[operation].as_strategy())
    @hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
    def holds(case):
        response = case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                                  content_type_conformance, response_schema_conformance])
        assert "Traceback" not in response.text

    holds()
