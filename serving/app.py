"""The sentiment API: ``POST /v1/predict``, ``GET /healthz``, ``GET /readyz``."""

from __future__ import annotations

import logging
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from datetime import date

from fastapi import FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field, StrictStr, field_validator

from pipeline.config import Settings
from serving.model import OnnxClassifier
from serving.registry import load_alias

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
    model_variant: str
    predictions: list[SentimentOut]


class IndexRow(BaseModel):
    day: date
    stories: int
    net_mean: float | None
    positive_share: float | None
    negative_share: float | None
    neutral_share: float | None
    decayed_net: float | None
    zscore: float | None
    baseline_days: int
    low_coverage: bool
    model_version: str | None
    onnx_sha256: str | None


class IndexResponse(BaseModel):
    dimension: str
    key: str
    rows: list[IndexRow]


MAX_INDEX_DAYS = 3660


def load_model(settings: Settings, cache: Path) -> OnnxClassifier:
    cfg = settings.serving
    options = {"providers": cfg.providers, "allow_provider_fallback": cfg.allow_provider_fallback}
    if cfg.model_dir is not None:
        return OnnxClassifier(cfg.model_dir, **options)
    return load_alias(settings.tracking_uri, settings.model_name, cfg.alias, cache, variant=cfg.variant, **options)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.model = None
        with tempfile.TemporaryDirectory(prefix="finsent-serving-") as cache:
            try:
                app.state.model = load_model(settings, Path(cache))
                log.info("serving %s version %s (%s on %s)", app.state.model.name, app.state.model.version,
                         app.state.model.variant, ", ".join(app.state.model.providers))
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
        return {"status": "ready", "model_name": model.name, "model_version": model.version, "variant": model.variant,
                "providers": model.providers}

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
        return PredictResponse(model_name=model.name, model_version=model.version, model_variant=model.variant,
                               predictions=predictions)

    @app.get("/v1/index", response_model=IndexResponse)
    def sentiment_index(
        request: Request,
        first: Annotated[date, Query(alias="from", description="first day, YYYY-MM-DD")],
        last: Annotated[date, Query(alias="to", description="last day, included")],
        entity: Annotated[str | None, Query(max_length=256, description="one entity, e.g. usa")] = None,
        topic: Annotated[str | None, Query(max_length=256, description="one topic, e.g. earn")] = None,
    ) -> IndexResponse:
        """The daily sentiment index the monitor wrote: overall, or of one entity or topic."""
        if last < first:
            raise HTTPException(422, detail=f"'to' ({last}) is before 'from' ({first})")
        if (last - first).days >= MAX_INDEX_DAYS:
            raise HTTPException(422, detail=f"at most {MAX_INDEX_DAYS} days per request")
        if entity is not None and topic is not None:
            raise HTTPException(422, detail="give 'entity' or 'topic', not both")
        dimension, key = ("entity", entity) if entity is not None else ("topic", topic) if topic is not None else ("overall", "all")
        from pipeline.monitor.store import MonitorStore

        store = getattr(request.app.state, "index_store", None)
        if store is None:
            store = request.app.state.index_store = MonitorStore(settings.monitor_database_url)
        rows = store.read("index", first, last, dimension=dimension, key=key)
        records = rows.astype(object).where(rows.notna(), None).to_dict("records")
        return IndexResponse(dimension=dimension, key=key, rows=[IndexRow(**r) for r in records])

    return app
