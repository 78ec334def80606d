"""The sentiment API: ``POST /v1/predict``, ``GET /healthz``, ``GET /readyz``."""

from __future__ import annotations

import logging
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field, StrictStr, field_validator

from pipeline.config import Settings
from serving.model import OnnxClassifier
from serving.registry import fetch_alias

log = logging.getLogger("finsent.serving")


class PredictRequest(BaseModel):
    texts: Annotated[list[StrictStr], Field(min_length=1, description="texts to classify")]

    @field_validator("texts")
    @classmethod
    def no_blank_texts(cls, texts: list[str]) -> list[str]:
        blank = [i for i, text in enumerate(texts) if not text.strip()]
        if blank:
            raise ValueError(f"texts[{blank[0]}] is empty; every text must contain non-whitespace characters")
        return texts


class SentimentOut(BaseModel):
    label: str
    scores: dict[str, float]


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[SentimentOut]


def load_model(settings: Settings, cache: Path) -> OnnxClassifier:
    cfg = settings.serving
    if cfg.model_dir is not None:
        return OnnxClassifier(cfg.model_dir)
    return OnnxClassifier(fetch_alias(settings.tracking_uri, settings.model_name, cfg.alias, cache))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.model = None
        with tempfile.TemporaryDirectory(prefix="finsent-serving-") as cache:
            try:
                app.state.model = load_model(settings, Path(cache))
                log.info("serving %s version %s", app.state.model.name, app.state.model.version)
            except Exception as err:  # keep the process up: /readyz reports not ready
                app.state.load_error = f"{type(err).__name__}: {err}"
                log.error("model load failed: %s", app.state.load_error)
            yield

    app = FastAPI(title="finsent sentiment API", version="0.1.0", lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> dict:
        model = request.app.state.model
        if model is None:
            raise HTTPException(503, detail=getattr(request.app.state, "load_error", "no model loaded"))
        return {"status": "ready", "model_name": model.name, "model_version": model.version}

    @app.post("/v1/predict", response_model=PredictResponse)
    def predict(body: PredictRequest, request: Request) -> PredictResponse:
        model: OnnxClassifier | None = request.app.state.model
        if model is None:
            raise HTTPException(503, detail="no model loaded yet")
        if len(body.texts) > settings.serving.max_batch:
            raise HTTPException(422, detail=f"{len(body.texts)} texts; at most {settings.serving.max_batch} per request")
        too_long = [i for i, t in enumerate(body.texts) if len(t) > settings.serving.max_text_chars]
        if too_long:
            raise HTTPException(422, detail=f"texts[{too_long[0]}] is longer than {settings.serving.max_text_chars} characters")
        predictions = [SentimentOut(label=p.label, scores=p.scores) for p in model.predict(body.texts)]
        return PredictResponse(model_name=model.name, model_version=model.version, predictions=predictions)

    return app
