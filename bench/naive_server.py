"""The server a user would otherwise write: FastAPI + PyTorch, the Hugging Face
model run once per request in uvicorn's thread pool, no batching, no ONNX.
The baseline of bench/serve_load.py. Usage: python bench/naive_server.py MODEL_DIR PORT"""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class PredictRequest(BaseModel):
    texts: list[str]


def create_app(model_dir: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The demo's champion is mean-pooled: its class ships with it (auto_map).
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    @app.post("/v1/predict")
    def predict(body: PredictRequest) -> dict:
        batch = tokenizer(body.texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**batch).logits, dim=-1).tolist()
        return {"predictions": [{"label": labels[max(range(len(p)), key=p.__getitem__)],
                                 "scores": dict(zip(labels, p))} for p in probs]}

    return app


if __name__ == "__main__":
    uvicorn.run(create_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
