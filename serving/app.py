"""The sentiment API.

``POST /v1/predict`` scores one text or a list through the cross-request
batcher; ``GET /v1/model`` says what is loaded; ``GET /healthz`` (alive, never
behind inference), ``GET /readyz`` (loaded and warm, else a reason code),
``GET /metrics`` (Prometheus); ``GET /v1/index`` reads the monitor's series;
``POST /v1/admin/reload`` (bearer token) asks the registry now. The served
alias is polled in the background: a new version is loaded, verified and
warmed beside the old one and swapped in; a failed load keeps the old one."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from pipeline.config import Settings
from serving.batcher import Batcher, QueueFull, ShuttingDown
from serving.errors import ModelLoadError
from serving.explain import occluded_inputs, top_words
from serving.metrics import ServingMetrics
from serving.model import MANIFEST, OnnxClassifier, softmax
from serving.registry import load_version, resolve_alias, variant_checksums

log = logging.getLogger("finsent.serving")

ROUTES = ("/v1/predict", "/v1/model", "/v1/index", "/v1/admin/reload", "/healthz", "/readyz", "/metrics")
EXPLAIN_MAX_TEXTS = 8


def _check_texts(texts: list[str]) -> list[str]:
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"texts[{i}] is empty; every text must contain non-whitespace characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"texts[{i}] is not valid Unicode (a lone surrogate escape such as \\ud800)") from None
    return texts


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = Field(None, description="one text to classify")
    texts: list[StrictStr] | None = Field(None, min_length=1, description="texts to classify")
    explain: bool = Field(False, description="add each text's most influential words (occlusion; short texts only)")

    @model_validator(mode="after")
    def one_text_or_a_list(self) -> "PredictRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError("give 'text' (one string) or 'texts' (a list of strings), not both nor neither")
        _check_texts(self.inputs)
        return self

    @property
    def inputs(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class WordWeight(BaseModel):
    token: str
    weight: float


class SentimentOut(BaseModel):
    label: str
    scores: dict[str, float]
    net: float | None = Field(None, description="P(positive) - P(negative)")
    explanation: list[WordWeight] | None = None


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    model_variant: str
    model_alias: str | None
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


@dataclass(frozen=True)
class Served:
    """A loaded, verified and warmed model and what the API says about it."""

    model: OnnxClassifier
    alias: str | None
    sha256: dict[str, str]
    blessing: str | None
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def describe(self) -> dict:
        model = self.model
        return {"name": model.name, "version": model.version, "alias": self.alias, "variant": model.variant,
                "providers": model.providers, "sha256": self.sha256, "blessing": self.blessing,
                "loaded_at": self.loaded_at}


def reason_code(err: BaseException) -> str:
    """A short, stable word for a failed load; the detail goes to the log only."""
    if isinstance(err, ModelLoadError):
        return "model_refused"
    if isinstance(err, LookupError):
        return "no_blessed_model"
    if isinstance(err, OSError):
        return "model_files_unreadable"
    if type(err).__module__.startswith("mlflow"):
        return "registry_error"
    return "load_failed"


def _warm(model: OnnxClassifier) -> None:
    """Runs the shapes the first requests will have, so none of them pays for it."""
    for texts in (["warm up"], ["The company said profit rose 5 % in the quarter ."] * 8):
        model.run_encoded(model.encode(texts))


def _load(settings: Settings, alias: str | None, cache: Path) -> Served:
    cfg = settings.serving
    options = {"providers": cfg.providers, "allow_provider_fallback": cfg.allow_provider_fallback,
               "threads": cfg.threads}
    if cfg.model_dir is not None:
        model = OnnxClassifier(cfg.model_dir, **options)
        recorded = json.loads((model.model_dir / MANIFEST).read_text()).get("sha256", {})
        served = Served(model, None, recorded, None)
    else:
        version = resolve_alias(settings.tracking_uri, settings.model_name, alias)
        model = load_version(settings.tracking_uri, version, cache / alias, variant=cfg.variant, **options)
        served = Served(model, alias, variant_checksums(version, model.variant),
                        version.tags.get(f"blessing/{model.variant}"))
    _warm(model)
    return served


class Models:
    """What is served now: the champion (the configured alias) and, with a
    canary share, the candidate; each swapped whole, never edited."""

    def __init__(self, settings: Settings, cache: Path, metrics: ServingMetrics):
        self.settings, self.cache, self.metrics = settings, cache, metrics
        self.main: Served | None = None
        self.canary: Served | None = None
        self.load_error: str | None = None
        self.last_reload: dict = {}
        self._lock = asyncio.Lock()

    def _announce(self, served: Served) -> None:
        info = {k: str(v) for k, v in served.describe().items() if k in ("name", "version", "alias", "variant")}
        self.metrics.model.info(info)
        log.info("serving %s version %s (%s on %s)", served.model.name, served.model.version, served.model.variant,
                 ", ".join(served.model.providers))

    async def load_initial(self) -> None:
        try:
            self.main = await asyncio.to_thread(_load, self.settings, self.settings.serving.alias, self.cache)
            self._announce(self.main)
        except Exception as err:  # keep the process up: /readyz says why in one word
            self.load_error = reason_code(err)
            self.metrics.load_failures.inc()
            log.error("model load failed (%s): %s: %s", self.load_error, type(err).__name__, err)
        if self.settings.serving.canary_share > 0:
            await self._load_canary()

    async def _load_canary(self) -> None:
        try:
            self.canary = await asyncio.to_thread(_load, self.settings, "candidate", self.cache)
        except Exception as err:
            self.canary = None
            self.metrics.load_failures.inc()
            log.warning("no canary: the candidate did not load (%s): %s", reason_code(err), err)

    async def reload(self, trigger: str) -> dict:
        """Loads the alias's version if it moved; the old model serves until the new one is warm."""
        if self.settings.serving.model_dir is not None:
            return {"status": "unchanged", "reason": "serving a local folder, not the registry"}
        async with self._lock:
            alias = self.settings.serving.alias
            try:
                version = await asyncio.to_thread(resolve_alias, self.settings.tracking_uri, self.settings.model_name,
                                                  alias)
                current = self.main.model.version if self.main else None
                if version.version == current:
                    result = {"status": "unchanged", "version": current}
                else:
                    served = await asyncio.to_thread(_load, self.settings, alias, self.cache)
                    self.main, self.load_error = served, None
                    self._announce(served)
                    result = {"status": "reloaded", "version": served.model.version, "previous": current}
            except Exception as err:
                self.metrics.load_failures.inc()
                result = {"status": "failed", "reason": reason_code(err),
                          "version": self.main.model.version if self.main else None}
                log.error("reload (%s) failed, %s: %s: %s", trigger,
                          "the old model keeps serving" if self.main else "nothing is served", type(err).__name__, err)
            self.last_reload = {**result, "trigger": trigger,
                                "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            if self.settings.serving.canary_share > 0:
                await self._follow_candidate()
            return result

    async def _follow_candidate(self) -> None:
        """The canary follows @candidate too; when it cannot load, the canary stops (all traffic to the champion)."""
        try:
            version = await asyncio.to_thread(resolve_alias, self.settings.tracking_uri, self.settings.model_name,
                                              "candidate")
        except Exception as err:
            log.warning("canary: @candidate unresolved (%s): %s", reason_code(err), err)
            self.canary = None
            return
        if self.canary is None or self.canary.model.version != version.version:
            await self._load_canary()

    def pick(self) -> tuple[Served, str]:
        share = self.settings.serving.canary_share
        if self.canary is not None and share > 0 and random.random() < share:
            return self.canary, "candidate"
        return self.main, "champion"  # type: ignore[return-value]


def _problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _invalid(loc: list, message: str) -> JSONResponse:
    """A 422 shaped like FastAPI's own (the spec's HTTPValidationError)."""
    return JSONResponse({"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}, status_code=422)


class Guard:
    """Pure ASGI, ahead of FastAPI: refuses a body over the limit with a 413
    (by its Content-Length, or by counting a chunked one) and records each
    request's route, status and latency."""

    def __init__(self, app, metrics: ServingMetrics, max_body_bytes: int, queue_full: Callable[[], bool]):
        self.app, self.metrics, self.max_body, self.queue_full = app, metrics, max_body_bytes, queue_full

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if route == "/v1/predict" and self.queue_full():
                # Refused before the body is read or validated: under overload a refusal must cost
                # next to nothing, or the refusals take the CPU the accepted requests need.
                self.metrics.rejected.labels("queue_full").inc()
                await _problem(503, "the server is at capacity: try again shortly", {"Retry-After": "1"})(
                    scope, receive, recording_send)
                return
            refusal, receive = await self._limit(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, recording_send)
            else:
                await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route, str(status)).observe(time.perf_counter() - started)

    async def _limit(self, scope, receive):
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return _problem(400, "Content-Length is not a number"), receive
            if int(length) > self.max_body:
                return _problem(413, f"the body has {int(length)} bytes; at most {self.max_body}"), receive
            return None, receive
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None, receive
        chunks, size = [], 0
        while True:  # a chunked body: read it here, within the limit, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                return _problem(413, f"the body has more than {self.max_body} bytes"), receive
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


async def _unless_disconnected(request: Request, work: asyncio.Future):
    """``work``'s result, or None when the client went away first (``work`` is
    then cancelled, so its queued texts are dropped before inference)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watcher.cancel()
        return work.result()
    work.cancel()
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    cfg = settings.serving
    metrics = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with tempfile.TemporaryDirectory(prefix="finsent-serving-") as cache:
            models = app.state.models = Models(settings, Path(cache), metrics)
            batcher = app.state.batcher = Batcher(cfg.max_batch_tokens, cfg.max_queue_texts, cfg.max_wait_ms / 1000,
                                                  on_batch=metrics.observe_batch)
            batcher.start()
            await models.load_initial()
            poller = None
            if cfg.reload_interval_s > 0 and cfg.model_dir is None:
                async def poll() -> None:
                    while True:
                        await asyncio.sleep(cfg.reload_interval_s)
                        await models.reload("poll")

                poller = asyncio.create_task(poll(), name="finsent-reload")
            try:
                yield
            finally:
                if poller is not None:
                    poller.cancel()
                await batcher.close()  # what is queued still runs
                store = getattr(app.state, "index_store", None)
                if store is not None:
                    store.close()

    app = FastAPI(title="finsent sentiment API", version="0.2.0", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input: a lone surrogate in it cannot even be encoded.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in err.errors()]
        for error in errors:
            if error["loc"] == ["body"] and error["type"] in ("model_attributes_type", "dict_type"):
                error["msg"] = 'the body must be a JSON object such as {"texts": ["..."]} or {"text": "..."}'
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready: the reason in one word"}})
    async def readyz(request: Request):
        models: Models = request.app.state.models
        if models.main is None:
            return JSONResponse({"status": "not ready", "reason": models.load_error or "loading"}, status_code=503)
        model = models.main.model
        body = {"status": "ready", "model_name": model.name, "model_version": model.version,
                "variant": model.variant, "providers": model.providers}
        if models.last_reload.get("status") == "failed":
            body["last_reload"] = {k: models.last_reload[k] for k in ("status", "reason", "at")}
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics(request: Request) -> Response:
        metrics.queue_depth.set(request.app.state.batcher.queued_texts)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", responses={503: {"description": "no model loaded"}})
    async def model_info(request: Request) -> dict:
        models: Models = request.app.state.models
        if models.main is None:
            raise HTTPException(503, detail=f"no model loaded ({models.load_error or 'loading'})")
        return {**models.main.describe(), "canary": models.canary.describe() if models.canary else None,
                "canary_share": cfg.canary_share, "last_reload": models.last_reload or None}

    @app.post("/v1/admin/reload", responses={401: {"description": "no or a wrong bearer token"},
                                              404: {"description": "off: no admin token is configured"}})
    async def admin_reload(request: Request, authorization: Annotated[str | None, Header()] = None) -> dict:
        if cfg.admin_token is None:
            raise HTTPException(404, detail="Not Found")
        given = (authorization or "").removeprefix("Bearer ").encode()
        if not authorization or not hmac.compare_digest(given, cfg.admin_token.get_secret_value().encode()):
            raise HTTPException(401, detail="a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return await request.app.state.models.reload("admin")

    @app.post("/v1/predict", response_model=PredictResponse, responses={
        400: {"description": "a body that cannot be read"}, 413: {"description": "body too large"},
        503: {"description": "queue full (see Retry-After), shutting down, or no model"}})
    async def predict(body: PredictRequest, request: Request):
        models: Models = request.app.state.models
        if models.main is None:
            return _problem(503, f"no model loaded ({models.load_error or 'loading'})", {"Retry-After": "5"})
        texts = body.inputs
        if len(texts) > cfg.max_batch:
            return _invalid(["body", "texts"], f"{len(texts)} texts; at most {cfg.max_batch} per request")
        too_long = next((i for i, t in enumerate(texts) if len(t) > cfg.max_text_chars), None)
        if too_long is not None:
            return _invalid(["body", "texts", too_long], f"texts[{too_long}] is longer than {cfg.max_text_chars} characters")
        if body.explain and len(texts) > EXPLAIN_MAX_TEXTS:
            return _invalid(["body", "explain"], f"explain=true takes at most {EXPLAIN_MAX_TEXTS} texts")
        served, role = models.pick()
        model = served.model
        if sum(map(len, texts)) > 4096:  # a long request is tokenized off the event loop
            encodings = await asyncio.to_thread(model.tokenizer.encode_batch, texts)
        else:
            encodings = model.tokenizer.encode_batch(texts)
        ids = [encoding.ids for encoding in encodings]
        spans: list = []
        if body.explain:
            too_long = next((i for i, e in enumerate(encodings)
                             if e.overflowing or len(e.ids) > cfg.explain_max_tokens), None)
            if too_long is not None:
                return _invalid(["body", "texts", too_long], f"texts[{too_long}] has more than "
                                f"{cfg.explain_max_tokens} tokens: explain=true takes short texts only")
            for encoding in encodings:
                text_spans, occluded = occluded_inputs(encoding)
                spans.append((len(ids), text_spans))
                ids += occluded
        try:
            logits = await _unless_disconnected(
                request, asyncio.ensure_future(request.app.state.batcher.submit(model, ids)))
        except QueueFull:
            metrics.rejected.labels("queue_full").inc()
            return _problem(503, "the server is at capacity: try again shortly", {"Retry-After": "1"})
        except ShuttingDown:
            return _problem(503, "the server is shutting down", {"Retry-After": "1"})
        if logits is None:
            metrics.rejected.labels("client_gone").inc()
            return Response(status_code=499)
        probs = softmax(logits)
        metrics.predictions.labels(model.version, role).inc(len(texts))
        labels = model.labels
        net = (probs[:, labels.index("positive")] - probs[:, labels.index("negative")]
               if {"positive", "negative"} <= set(labels) else None)
        predictions = []
        for i, text in enumerate(texts):
            row = probs[i]
            explanation = None
            if body.explain:
                start, text_spans = spans[i]
                occluded = probs[start : start + len(text_spans)]
                explanation = top_words(text, text_spans, row, occluded, int(row.argmax()))
            predictions.append(SentimentOut(label=labels[int(row.argmax())], scores=dict(zip(labels, map(float, row))),
                                            net=None if net is None else float(net[i]), explanation=explanation))
        return PredictResponse(model_name=model.name, model_version=model.version, model_variant=model.variant,
                               model_alias=served.alias, predictions=predictions)

    @app.get("/v1/index", response_model=IndexResponse)
    def sentiment_index(
        request: Request,
        first: Annotated[date, Query(alias="from", description="first day, YYYY-MM-DD")],
        last: Annotated[date, Query(alias="to", description="last day, included")],
        entity: Annotated[str | None, Query(max_length=256, description="one entity, e.g. usa")] = None,
        topic: Annotated[str | None, Query(max_length=256, description="one topic, e.g. earn")] = None,
    ):
        """The daily sentiment index the monitor wrote: overall, or of one entity or topic."""
        if last < first:
            return _invalid(["query", "to"], f"'to' ({last}) is before 'from' ({first})")
        if (last - first).days >= MAX_INDEX_DAYS:
            return _invalid(["query", "to"], f"at most {MAX_INDEX_DAYS} days per request")
        if entity is not None and topic is not None:
            return _invalid(["query"], "give 'entity' or 'topic', not both")
        dimension, key = ("entity", entity) if entity is not None else ("topic", topic) if topic is not None else ("overall", "all")
        from pipeline.monitor.store import MonitorStore

        store = getattr(request.app.state, "index_store", None)
        if store is None:
            store = request.app.state.index_store = MonitorStore(settings.monitor_database_url)
        rows = store.read("index", first, last, dimension=dimension, key=key)
        records = rows.astype(object).where(rows.notna(), None).to_dict("records")
        return IndexResponse(dimension=dimension, key=key, rows=[IndexRow(**r) for r in records])

    def queue_full() -> bool:
        batcher = getattr(app.state, "batcher", None)
        return batcher is not None and batcher.queued_texts >= cfg.max_queue_texts

    app.add_middleware(Guard, metrics=metrics, max_body_bytes=cfg.max_body_bytes, queue_full=queue_full)
    return app
