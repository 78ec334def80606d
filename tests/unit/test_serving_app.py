import pytest
from fastapi.testclient import TestClient

from pipeline.config import ServingConfig, Settings
from serving.app import create_app


@pytest.fixture(scope="module")
def client(tiny_onnx):
    settings = Settings(serving=ServingConfig(model_dir=tiny_onnx, max_batch=8))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_predict_returns_label_scores_and_model(client):
    response = client.post("/v1/predict", json={"texts": ["Profit rose .", "Sales fell ."]})
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == "finsent-test" and body["model_version"] == "7"
    assert len(body["predictions"]) == 2
    for prediction in body["predictions"]:
        assert set(prediction["scores"]) == {"negative", "neutral", "positive"}
        assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"texts": []}, "at least 1"),
        ({}, "texts"),
        ({"texts": ["fine", 3]}, "valid string"),
        ({"texts": ["fine", "  "]}, "texts[1] is empty"),
        ({"texts": "not a list"}, "valid list"),
        ({"texts": ["a"] * 9}, "at most 8"),
    ],
)
def test_bad_requests_get_422_saying_what_is_wrong(client, payload, fragment):
    response = client.post("/v1/predict", json=payload)
    assert response.status_code == 422
    assert fragment in response.text


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "7"


def test_not_ready_when_the_model_cannot_load(tmp_path):
    settings = Settings(serving=ServingConfig(model_dir=tmp_path / "missing"))
    with TestClient(create_app(settings)) as test_client:
        assert test_client.get("/healthz").status_code == 200
        ready = test_client.get("/readyz")
        assert ready.status_code == 503 and "serving.json" in ready.json()["detail"]
        assert test_client.post("/v1/predict", json={"texts": ["x"]}).status_code == 503
