"""The one settings object. Every field can be set from the environment
with the prefix ``FINSENT_`` (nested fields with ``__``, e.g.
``FINSENT_TRAIN__EPOCHS=3``)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.recipes import load_recipe

ENV_PREFIX = "FINSENT_"
# Read by other tools, not by Settings: the docker compose file's image and data folder names.
NOT_SETTINGS = frozenset({"FINSENT_AIRFLOW_IMAGE", "FINSENT_AIRFLOW_GPU_IMAGE", "FINSENT_SERVING_IMAGE", "FINSENT_DATA_DIR",
                          "FINSENT_STEP_GROUP", "FINSENT_WORKER_NAME"})
# The last two: set by pipeline.steps for the steps it starts, and by `finsent stack up` for each worker.
LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
OFFLINE_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# Label shares of Financial PhraseBank 50Agree (12.5 % negative, 59.4 % neutral, 28.1 % positive).
REFERENCE_LABEL_SHARES = {"negative": 0.125, "neutral": 0.594, "positive": 0.281}


class IngestConfig(BaseModel):
    """Reading, cleaning, splitting and validating the data (the ingest DAG)."""

    model_config = ConfigDict(extra="forbid")

    text_column: str = Field("text", description="text column of CSV/JSONL/Parquet/hub labeled sources")
    label_column: str = Field("label", description="label column of CSV/JSONL/Parquet/hub labeled sources")
    train_fraction: float = Field(0.72, description="share of labeled rows in the train split")
    validation_fraction: float = Field(0.08, description="share in the validation split")
    test_fraction: float = Field(0.20, description="share in the test split; the three sum to 1")
    seed: int = Field(0, description="seed of the stratified split")
    split_method: Literal["hash", "stratified"] = Field(
        "hash", description="hash: stable per sentence, leakage-free as data grows; stratified: the canonical FPB split"
    )
    min_chars: int = Field(3, description="shorter labeled texts are quarantined")
    max_chars: int = Field(2000, description="longer labeled texts are quarantined")
    max_news_chars: int = Field(100_000, description="longer news stories are quarantined")
    min_clean_share: float = Field(0.95, description="a batch whose clean share is below this fails")
    id_column: str | None = Field(
        None, description="id column of CSV/JSONL/Parquet/hub sources (labeled: else a hash of the text; news: else 'id')")
    timestamp_column: str | None = Field("timestamp", description="timestamp column of news landing files")
    title_column: str | None = Field("title", description="headline column of news landing files")
    entity_column: str | None = Field(
        "entities", description="entities (tickers, companies, places) column of news landing files: a list, or one "
        "string with '|' or ';' between them")
    topics_column: str | None = Field("topics", description="topics column of news landing files, as entity_column")
    source_column: str | None = Field("source", description="source (publisher) column of news landing files")
    max_garbled_share: float = Field(0.01, description="a batch with more rows of non-printable/garbled characters fails")
    max_truncated_share: float = Field(
        0.02, description="a labeled batch with more sentences longer than the model's max length fails")
    label_reference: dict[str, float] = Field(
        default_factory=lambda: dict(REFERENCE_LABEL_SHARES),
        description="expected label shares (default: Financial PhraseBank 50Agree); {} turns the check off")
    label_tolerance: float = Field(0.10, description="allowed absolute deviation of each label's share")
    source_protocols: list[str] = Field(
        default_factory=lambda: ["s3", "s3a"], description="URL protocols a source may be read over besides local "
        "files (s3 and s3a need the s3 extra); any other (http, https, ftp, memory, ...) is refused unless listed")
    max_line_bytes: int = Field(
        1_000_000, ge=1, description="a JSONL line or CSV record larger than this is quarantined unread")
    max_json_depth: int = Field(
        64, ge=1, le=500, description="a JSONL line whose arrays/objects nest deeper than this is quarantined unparsed "
        "(at most 500: Python's JSON parser runs out of stack near 1000)")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "IngestConfig":
        total = self.train_fraction + self.validation_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6 or min(self.train_fraction, self.validation_fraction, self.test_fraction) <= 0:
            raise ValueError(
                f"train_fraction + validation_fraction + test_fraction must be positive and sum to 1, got "
                f"{self.train_fraction} + {self.validation_fraction} + {self.test_fraction} = {total:g}")
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


class TrainConfig(BaseModel):
    """The training recipe. Each field earned its place with a figure in
    ``bench/RESULTS.md``; ``recipes/`` holds named sets of them."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(OFFLINE_MINILM, description="hub id, local folder, or a base `finsent fetch-base` unpacked")
    max_length: int = Field(128, gt=8, description="tokens per sentence; longer ones are truncated")
    seed: int = Field(0, description="seed of initialisation, data order and masks")
    # Masked-LM adaptation
    mlm_steps: int = Field(40, ge=0, description="masked-LM adaptation steps on the corpus; 0 skips adaptation")
    mlm_block_size: int = Field(128, gt=8, description="tokens per packed masked-LM block")
    mlm_batch_size: int = Field(16, gt=0, description="blocks per masked-LM step")
    mlm_learning_rate: float = Field(5e-5, gt=0, description="masked-LM peak learning rate")
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="share of tokens predicted; of those 80% [MASK], 10% random, 10% kept")
    mlm_max_corpus_texts: int = Field(2000, ge=0, description="corpus texts read for adaptation")
    mlm_margin: float = Field(0.0, description="the adapted model is used only if its perplexity beats the base's by this share")
    mlm_head_steps: int | None = Field(
        None, ge=0, description="a base without a masked-LM head (the default MiniLM) has its new head trained alone "
        "this many steps before the base's perplexity is measured; unset: mlm_steps; 0: compare with the random head")
    checkpoint_steps: int = Field(20, ge=0, description="masked-LM checkpoint every N steps (fine-tuning: every epoch); 0: never")
    # Fine-tuning
    epochs: int = Field(5, gt=0, description="fine-tuning epochs; the best by validation macro-F1 is kept")
    batch_size: int = Field(32, gt=0, description="fine-tuning sentences per step")
    learning_rate: float = Field(1.5e-4, gt=0, description="the top layer's; lower layers decay by layer_lr_decay")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with a linear learning-rate warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and layer norms)")
    layer_lr_decay: float = Field(0.85, gt=0, le=1, description="layer-wise learning-rate decay; 1.0 is off")
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="classify the [CLS] vector or the mean of the token vectors (BERT and MPNet bases)")
    agreement_soft_labels: bool = Field(
        True, description="targets from annotator agreement (a 66% sentence gets 0.66 on its label); rows without "
        "agreement data keep hard labels")
    finetune_method: Literal["full", "lora"] = Field("full", description="lora: peft adapters merged into the base for export")
    lora_r: int | None = Field(None, gt=0, description="LoRA rank (finetune_method=lora only; unset: 8)")
    # Distillation: the teacher's probabilities become training targets
    teacher_model: str | None = Field(
        None, description="a fine-tuned classifier to distill (folder, hub id or models:/ URI); its labels must be the "
        "project's, in any order")
    distill_weight: float | None = Field(
        None, ge=0, le=1, description="share of the teacher's probabilities in each row's target (teacher_model only; "
        "unset: 0.5)")
    distill_corpus_texts: int = Field(
        0, ge=0, description="corpus sentences the teacher labels as extra training rows (teacher_model only)")
    # A sweep: the train DAG maps fine-tuning over this grid and registers the best by validation macro-F1
    sweep_learning_rates: list[float] = Field(
        default_factory=list, description="a sweep: fine-tune at each rate (x each seed); [] is learning_rate only")
    sweep_seeds: list[int] = Field(default_factory=list, description="a sweep's seeds; [] is seed only")
    # GPU nodes
    bf16: bool | None = Field(None, description="bf16 autocast; unset: on with CUDA")
    torch_compile: bool = Field(
        False, description="torch.compile the model (GPU: with the packed masked-LM step 1.86x the eager loop on an "
        "H100, bench/RESULTS.md)")

    @model_validator(mode="after")
    def _options_fit_together(self) -> "TrainConfig":
        if self.finetune_method != "lora" and self.lora_r is not None:
            raise ValueError("lora_r applies only with finetune_method=lora; set both or neither")
        if self.teacher_model is None and (self.distill_weight is not None or self.distill_corpus_texts > 0):
            raise ValueError("distill_weight and distill_corpus_texts need a teacher_model to distill from")
        if any(rate <= 0 for rate in self.sweep_learning_rates):
            raise ValueError(f"sweep_learning_rates must be positive, got {self.sweep_learning_rates}")
        return self

    @property
    def lora_rank(self) -> int:
        return 8 if self.lora_r is None else self.lora_r

    @property
    def teacher_share(self) -> float:
        return 0.5 if self.distill_weight is None else self.distill_weight


class VariantBudget(BaseModel):
    """How far one ONNX variant may stray from PyTorch on the frozen test split and still be blessed."""

    model_config = ConfigDict(extra="forbid")

    max_abs_diff: float | None = Field(None, description="largest |variant - PyTorch| logit difference; unset: no limit")
    max_flip_rate: float = Field(0.0, ge=0, le=1, description="share of test sentences whose label may differ")
    max_macro_f1_drop_pt: float = Field(0.0, ge=0, description="macro-F1 points the variant may lose")


def _default_budgets() -> dict[str, VariantBudget]:
    return {
        "fp32": VariantBudget(max_abs_diff=1e-4),
        "fp32-optimized": VariantBudget(max_abs_diff=1e-4),
        "int8": VariantBudget(max_flip_rate=0.01, max_macro_f1_drop_pt=0.5),
        "fp16": VariantBudget(max_abs_diff=0.05, max_flip_rate=0.01, max_macro_f1_drop_pt=0.5),
    }


class ReleaseConfig(BaseModel):
    """Export, blessing, the gate, the infra check and promotion (the release DAG)."""

    model_config = ConfigDict(extra="forbid")

    min_macro_f1: float = Field(0.6, description="absolute floor for the first champion")
    min_improvement: float = Field(
        0.0, ge=0, description="the candidate's macro-F1 must exceed the champion's by more than this (a tie is "
        "never promoted)")
    bootstrap_rounds: int = Field(2000, ge=100, description="paired bootstrap resamples of the test split")
    bootstrap_tolerance: float = Field(
        0.01, ge=0, description="the 95 % CI's lower bound of the macro-F1 improvement must be above -tolerance")
    slice_max_drop: float = Field(
        0.02, ge=0, description="accuracy an agreement slice (AllAgree, 75, 66, 50) may lose against the champion")
    behaviour_max_drop: float = Field(
        0.05, ge=0, description="pass rate a behavioural capability may lose against the champion")
    behavioural_dir: Path | None = Field(
        None, description="the behavioural suite's JSONL files; unset: tests/behavioural of the repository (an "
        "installed package, as in the docker images, needs it set)")
    budgets: dict[str, VariantBudget] = Field(
        default_factory=_default_budgets, description="blessing budget of each ONNX variant (fp32, fp32-optimized, "
        "int8, fp16) against PyTorch on the frozen test split")
    infra_requests: int = Field(200, ge=1, description="requests the infra check sends to the candidate's server")
    infra_p95_ms: float = Field(250.0, gt=0, description="p95 latency the infra check requires of one-text requests")


class ServingConfig(BaseModel):
    """The sentiment API (`finsent serve`)."""

    model_config = ConfigDict(extra="forbid")

    alias: str = Field("champion", description="the registry alias the API serves")
    model_dir: Path | None = Field(None, description="serve a local ONNX folder instead of the registry")
    max_batch: int = Field(256, ge=1, description="texts per request; more get a 422")
    max_text_chars: int = Field(10_000, ge=1, description="characters per text; more get a 422")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body size; a larger body gets a 413")
    max_batch_tokens: int = Field(
        2048, ge=64, description="padded tokens per inference batch: requests waiting together are run as one batch "
        "up to this size (bench/serve_load.py measures it)")
    max_queue_texts: int = Field(
        512, ge=1, description="texts waiting for a batch; when full, requests get a 503 with Retry-After at once")
    max_wait_ms: float = Field(
        0.0, ge=0, description="how long a batch waits for more requests once one arrived; 0: it leaves as soon as "
        "the inference thread is free")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads; unset: the host's cores")
    reload_interval_s: float = Field(
        30.0, ge=0, description="how often the server asks the registry where its alias points, loading a new "
        "version in the background; 0: never")
    admin_token: SecretStr | None = Field(
        None, description="bearer token for POST /v1/admin/reload; unset: that endpoint is off")
    canary_share: float = Field(
        0.0, ge=0, le=1, description="share of predict requests answered by the @candidate version (0: off)")
    drain_timeout_s: float = Field(
        10.0, ge=0, description="on SIGTERM: how long queued and running requests get to finish")
    explain_max_tokens: int = Field(
        64, ge=4, description="explain=true takes texts of at most this many tokens (it runs one pass per word)")
    variant: str | None = Field(
        None, description="the blessed ONNX variant to load (fp32, fp32-optimized, int8, fp16); unset: the fastest "
        "blessed CPU variant on CPU, fp32-optimized (else fp32) when a GPU provider is asked for")
    providers: list[str] = Field(
        ["CPUExecutionProvider"], description="ONNX Runtime execution providers, in order of preference, e.g. "
        '["CUDAExecutionProvider","CPUExecutionProvider"] on a GPU node (the monitor uses them too)')
    allow_provider_fallback: bool = Field(
        False, description="when a GPU provider was asked for and ONNX Runtime fell back to CPU: run on CPU with a "
        "warning instead of refusing to load")


class MonitorConfig(BaseModel):
    """The daily sentiment index, its alerts and drift checks (the monitor DAG, `finsent monitor`)."""

    model_config = ConfigDict(extra="forbid")

    start_date: date = Field(
        date(1987, 2, 26), description="first day the monitor DAG schedules (it catches up from here): your feed's start")
    end_date: date | None = Field(None, description="last day the monitor DAG schedules; unset: no end")
    min_stories: int = Field(5, ge=1, description="a day (overall, or of one entity or topic) with fewer stories is "
                             "low coverage: shown, never alerted on nor used as a baseline")
    baseline_days: int = Field(30, ge=2, description="z-scores compare with this many trailing days that have stories")
    min_baseline_days: int = Field(5, ge=2, description="fewer baseline days than this: no z-score")
    decay_halflife_days: float = Field(7.0, gt=0, description="half-life of the decayed average of net sentiment")
    alert_zscore: float = Field(3.0, gt=0, description="|z-score| at or above which a day raises an alert")
    alert_min_stories: int = Field(10, ge=1, description="fewest stories of an alerted day (overall, entity or topic)")
    reprint_days: int = Field(3, ge=0, description="a story that repeats one of the previous N days' is a reprint")
    near_duplicate_jaccard: float = Field(
        0.8, gt=0, le=1, description="word-shingle Jaccard similarity (MinHash) at which two stories are the same")
    drift_window_days: int = Field(7, ge=1, description="drift compares the trailing N days' texts with the reference")
    drift_texts_per_day: int = Field(100, ge=1, description="texts of a day kept for drift checks (one sentence of each of up to N stories)")
    drift_window_texts: int = Field(200, ge=10, description="texts per drift window (sampled from the trailing days)")
    drift_reference_texts: int = Field(1000, ge=10, description="reference texts from the champion's training data")
    drift_calibration_windows: int = Field(200, ge=20, description="in-distribution windows that set the thresholds")
    shadow_sample: int = Field(20, ge=0, description="disagreements between champion and candidate kept for analysts")
    threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads of the monitor's scoring and embeddings; unset: the "
        "host's cores. Airflow runs several days' tasks at once: the embedded deployment sets the cores divided by "
        "its parallelism (4 tasks of 1 thread score 1.83x faster than 4 of 2 threads on 2 cores)")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the index/alerts tables; unset: SQLite <state_dir>/monitor.db "
        "(scaled out: postgresql+psycopg://...)")


class OrchestrationConfig(BaseModel):
    """Where Airflow runs the training tasks."""

    model_config = ConfigDict(extra="forbid")

    gpu_pool: str = Field("gpu", description="Airflow pool for training tasks; give it as many slots as GPUs")
    gpu_queue: str = Field("gpu", description="Celery queue of the GPU workers (CeleryExecutor only)")
    gpu_pool_slots: int = Field(1, description="slots of the GPU pool: the number of GPUs (1 on a CPU-only machine)")
    step_timeout_minutes: float = Field(
        360, gt=0, description="execution_timeout of the long tasks (masked-LM adaptation, fine-tuning, evaluation, "
        "export, a monitor day's scoring): past it the task fails and its step's process group ends")


class ScaledConfig(BaseModel):
    """The scaled profile (``FINSENT_PROFILE=scaled``): Airflow's metadata DB, MLflow's backend store and the
    monitor's tables on PostgreSQL, the CeleryExecutor with Redis as broker, a worker for the default queue and
    one for the GPU queue. ``finsent stack up`` starts it on one machine."""

    model_config = ConfigDict(extra="forbid")

    postgres_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432", description="the PostgreSQL server (SQLAlchemy URL without a "
        "database); the databases below are created on it when missing")
    airflow_database: str = Field("finsent_airflow", description="Airflow's metadata DB, and Celery's result backend")
    mlflow_database: str = Field("finsent_mlflow", description="MLflow's backend store")
    monitor_database: str = Field("finsent_monitor", description="the monitor's index and alert tables, unless "
                                  "monitor.database_url names another")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery's broker")
    artifacts_destination: str | None = Field(
        None, description="MLflow's artifact store: s3://bucket/prefix (the s3 extra; credentials from AWS_* "
        "variables) or a folder every node mounts; unset: <state_dir>/mlflow/artifacts")
    worker_concurrency: int = Field(2, ge=1, description="tasks a default-queue worker runs at once (a GPU worker "
                                    "runs orchestration.gpu_pool_slots)")

    def database_url(self, database: str) -> str:
        return f"{self.postgres_url.rstrip('/')}/{database}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINSENT_", env_nested_delimiter="__", extra="forbid")

    profile: Literal["embedded", "scaled"] = Field(
        "embedded", description="embedded: SQLite, LocalExecutor, one machine (`make demo`); scaled: PostgreSQL, "
        "CeleryExecutor with a GPU queue, MLflow on PostgreSQL (the scaled section; `make stack-up`)")
    project_dir: Path = Field(Path("."), description="the DVC repository that holds data/ and data.dvc")
    state_dir: Path = Field(Path(".finsent"), description="services' state, run outputs, DVC remote")
    keep_checkpoints: bool = Field(
        False, description="keep a run's training checkpoints once its model is registered; they serve only a "
        "retried step, and a fine-tuning one holds the optimizer's state besides the weights (about 3× the model)")
    labeled_source: str | None = Field(
        None, description="labeled data URI: a Financial PhraseBank folder, hf://<dataset id>, or CSV/JSONL/Parquet "
        "files (path, folder or fsspec URL); unset: fpb_dir"
    )
    fpb_dir: Path | None = Field(None, description="Financial PhraseBank folder; unset: the hub dataset")
    reuters_dir: Path | None = Field(None, description="Reuters-21578 SGML folder; unset: no corpus")
    landing_dir: Path | None = Field(None, description="daily landing zone <landing_dir>/YYYY-MM-DD/*; unset: <state_dir>/landing")
    dvc_remote: str | None = Field(None, description="DVC remote URL; unset: <state_dir>/dvc-remote")
    bases_dir: Path = Field(
        Path.home() / ".cache" / "finsent" / "bases", description="pretrained bases unpacked by `finsent fetch-base`")
    recipe: str | None = Field(
        None, description="a training recipe: a name in recipes/ (demo, fpb-minilm, fpb-distilled, gpu-bert-base) or a "
        "YAML file; its fields replace TrainConfig's defaults, FINSENT_TRAIN__* variables still override them")
    recipes_dir: Path | None = Field(
        None, description="where named recipes are looked up; unset: recipes/ of the repository (an installed "
        "package, as in the docker images, needs it set)")
    tracking_uri: str = Field("http://127.0.0.1:5000", description="MLflow tracking server")
    experiment: str = Field("finsent", description="MLflow experiment of the training runs")
    model_name: str = Field("finsent-sentiment", description="the registered model")

    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    release: ReleaseConfig = ReleaseConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    serving: ServingConfig = ServingConfig()
    monitor: MonitorConfig = MonitorConfig()
    scaled: ScaledConfig = ScaledConfig()
    alert_webhook: str | None = Field(
        None, description="URL that each monitor alert is POSTed to as JSON (retried; a failure never fails the day)")

    @model_validator(mode="after")
    def _apply_recipe(self) -> "Settings":
        if self.recipe is not None:
            recipe = load_recipe(self.recipe, self.recipes_dir)
            explicit = self.train.model_dump(include=self.train.model_fields_set)
            try:
                self.train = TrainConfig.model_validate({**recipe.train, **explicit})
            except ValidationError as error:
                raise ValueError(f"recipe {recipe.path}: {settings_error_message(error)}") from None
        return self

    @property
    def scaled_profile(self) -> ScaledConfig | None:
        """The scaled section when the scaled profile is on; None on the embedded default."""
        return self.scaled if self.profile == "scaled" else None

    @property
    def data_dir(self) -> Path:
        return self.project_dir / "data"

    @property
    def labeled_dir(self) -> Path:
        return self.data_dir / "curated" / "labeled"

    @property
    def corpus_path(self) -> Path:
        return self.data_dir / "curated" / "corpus" / "reuters.parquet"

    @property
    def landing_zone(self) -> Path:
        return self.landing_dir or self.state_dir / "landing"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def data_docs_dir(self) -> Path:
        return self.state_dir / "data-docs"

    @property
    def monitor_dir(self) -> Path:
        return self.data_dir / "monitor"

    @property
    def monitor_database_url(self) -> str:
        if self.monitor.database_url:
            return self.monitor.database_url
        if self.profile == "scaled":
            return self.scaled.database_url(self.scaled.monitor_database)
        return f"sqlite:///{(self.state_dir / 'monitor.db').resolve()}"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def resolved(self) -> dict:
        return json.loads(self.model_dump_json())

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:12]


def settings_error_message(error: ValidationError) -> str:
    """One line per problem, named as the setting is spelled (``train.lora_r``), without pydantic's links."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def unknown_environment_keys(environ: Mapping[str, str]) -> list[str]:
    """``FINSENT_*`` variables that name no setting (a typo, or an option that was removed):
    pydantic-settings would skip them silently."""
    known = {name.upper() for name in Settings.model_fields}
    return sorted(key for key in environ if key.startswith(ENV_PREFIX) and
                  key.removeprefix(ENV_PREFIX).split("__")[0] not in known and key not in NOT_SETTINGS)


def settings_with_recipe(recipe: str | None) -> Settings:
    """The process's settings, with ``recipe`` (e.g. a DAG run's param) in place of
    ``FINSENT_RECIPE``; FINSENT_TRAIN__* variables still override its fields."""
    if recipe is None:
        return get_settings()
    _refuse_unknown_environment_keys()
    return Settings(recipe=recipe)


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    _refuse_unknown_environment_keys()
    return Settings()


def _refuse_unknown_environment_keys() -> None:
    if unknown := unknown_environment_keys(os.environ):
        raise ValueError(f"unknown finsent settings in the environment: {', '.join(unknown)} "
                         "(docs/configuration.md lists them all)")
