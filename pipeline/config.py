"""The one settings object. Every field can be set from the environment
with the prefix ``FINSENT_`` (nested fields with ``__``, e.g.
``FINSENT_TRAIN__EPOCHS=3``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
OFFLINE_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# Label shares of Financial PhraseBank 50Agree (12.5 % negative, 59.4 % neutral, 28.1 % positive).
REFERENCE_LABEL_SHARES = {"negative": 0.125, "neutral": 0.594, "positive": 0.281}


class IngestConfig(BaseModel):
    text_column: str = Field("text", description="text column of CSV/JSONL/Parquet/hub labeled sources")
    label_column: str = Field("label", description="label column of CSV/JSONL/Parquet/hub labeled sources")
    train_fraction: float = 0.72
    validation_fraction: float = 0.08
    test_fraction: float = 0.20
    seed: int = 0
    split_method: Literal["hash", "stratified"] = Field(
        "hash", description="hash: stable per sentence, leakage-free as data grows; stratified: the canonical FPB split"
    )
    min_chars: int = 3
    max_chars: int = 2000
    max_news_chars: int = 100_000
    min_clean_share: float = Field(0.95, description="a batch whose clean share is below this fails")
    id_column: str | None = Field(
        None, description="id column of CSV/JSONL/Parquet/hub sources (labeled: else a hash of the text; news: else 'id')")
    timestamp_column: str | None = Field("timestamp", description="timestamp column of news landing files")
    entity_column: str | None = Field(None, description="ticker/entity column of news landing files")
    source_column: str | None = Field("source", description="source (publisher) column of news landing files")
    max_garbled_share: float = Field(0.01, description="a batch with more rows of non-printable/garbled characters fails")
    max_truncated_share: float = Field(
        0.02, description="a labeled batch with more sentences longer than the model's max length fails")
    label_reference: dict[str, float] = Field(
        default_factory=lambda: dict(REFERENCE_LABEL_SHARES),
        description="expected label shares (default: Financial PhraseBank 50Agree); {} turns the check off")
    label_tolerance: float = Field(0.10, description="allowed absolute deviation of each label's share")


class TrainConfig(BaseModel):
    base_model: str = Field(OFFLINE_MINILM, description="hub id or local folder")
    max_length: int = 128
    seed: int = 0
    # Masked-LM adaptation / pretraining
    mlm_steps: int = Field(40, description="0 skips masked-LM adaptation")
    mlm_from_scratch: bool = Field(False, description="pretrain a new BERT with a WordPiece vocab trained on the corpus")
    scratch_vocab_size: int = 8000
    scratch_hidden_size: int = 256
    scratch_layers: int = 4
    scratch_heads: int = 4
    mlm_objective: Literal["mlm", "mlm+nsp"] = Field("mlm", description="mlm+nsp: BERT's original next-sentence objective too")
    mlm_whole_word: bool = Field(False, description="mask whole words instead of WordPiece tokens")
    mlm_block_size: int = 128
    mlm_batch_size: int = 16
    mlm_learning_rate: float = 5e-5
    mlm_probability: float = Field(0.15, description="share of tokens selected; of those 80% [MASK], 10% random, 10% kept")
    mlm_max_corpus_texts: int = 2000
    mlm_margin: float = Field(0.0, description="adapted model is used only if its perplexity beats the base by this")
    mlm_head_steps: int | None = Field(
        None, ge=0, description="a base that ships without a masked-LM head (sentence-transformers models such as "
        "the default MiniLM) gets a new random one, whose perplexity says nothing of the base: the new head is "
        "first trained this many steps with the rest of the model frozen, and the base's perplexity measured with "
        "it. Unset: as many steps as mlm_steps; 0: compare against the random head",
    )
    mlm_head_learning_rate: float = Field(3e-3, gt=0, description="learning rate of that head-only training")
    mlm_float8: bool = Field(
        False, description="float8 matrix products in the encoder's linear layers while masked-LM training "
        "(torchao; CUDA compute capability 8.9+, e.g. H100; emulated and slow on a CPU)",
    )
    mlm_attention: Literal["auto", "sdpa", "replayed", "cudnn"] = Field(
        "auto", description="attention with dropout while masked-LM training: replayed (one op the compiler keeps "
        "whole, SDPA's fused kernel, backward replaying the forward), cudnn (on a GPU cuDNN's fused op with its own "
        "backward, no replay; not yet timed), sdpa (transformers' own), or auto: replayed where the model is "
        "compiled on a GPU (1.86x against 1.68x the eager baseline on an H100, bench/RESULTS.md)",
    )
    mlm_sparse_last_layer: bool = Field(
        True, description="BERT: the last encoder layer computes only the masked rows the loss reads (the same "
        "loss and gradients with less work)",
    )
    mlm_bf16_residual: bool = Field(
        False, description="under bf16 autocast, the residual stream between layers in bf16 instead of float32: "
        "layer norms still compute in float32, parameters and optimizer stay float32 (16 % fewer bytes in the "
        "compiled step's own kernels at bert-base; not yet timed on a GPU)",
    )
    mlm_dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="dropout probability of every dropout layer while masked-LM training "
        "(hidden, attention, embeddings); unset keeps the model's own (BERT: 0.1). 0 draws no random masks, so the "
        "compiled step's kernels do less and attention needs no replay (a different recipe: short pretraining runs "
        "often train without dropout). The saved model keeps its own dropout for fine-tuning",
    )
    checkpoint_steps: int = Field(20, description="save model, optimizer, scheduler, RNG and data position every N steps; 0: never")
    # Fine-tuning
    # Defaults: the best recipe of bench/accuracy.py on the canonical Financial PhraseBank split (bench/RESULTS.md).
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1.5e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    finetune_method: Literal["full", "lora"] = Field("full", description="lora: peft adapters, merged into the base for export")
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="loss weight per label (negative, neutral, positive), or balanced by inverse frequency")
    layer_lr_decay: float = Field(0.85, description="layer-wise learning-rate decay; 1.0 is off")
    early_stopping_patience: int = Field(0, description="epochs without a better validation macro-F1 before stopping; 0 is off")
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="classify the [CLS] vector, or the mean of the token vectors (how sentence-transformers "
        "bases such as all-MiniLM-L6-v2 were trained; BERT and MPNet bases)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="share of each hard target spread over all labels")
    rdrop_alpha: float = Field(
        0.0, ge=0.0, description="R-Drop: weight of the symmetric KL divergence between two dropout passes of each "
        "batch (doubles the fine-tuning compute); 0 is off")
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="validate, checkpoint and keep an exponential moving average of the weights "
        "with this decay per optimizer step (training follows the live weights); 0 is off")
    agreement_soft_labels: bool = Field(
        True, description="train on soft targets from annotator agreement: the label gets the row's agreement "
        "share (Financial PhraseBank levels 100/75/66/50), the rest is split evenly over the other labels; rows "
        "from sources without agreement data are recorded at 100 and keep hard labels")
    soup_size: int = Field(
        1, ge=1, description="fine-tune this many members from one initialisation (data order and dropout differ) "
        "and average their weights (see soup_method); 1 is off")
    soup_method: Literal["greedy", "uniform"] = Field(
        "greedy", description="greedy: members join by validation macro-F1 rank while it does not drop; uniform: all")
    self_training_texts: int = Field(
        0, ge=0, description="self-training: a first model labels corpus sentences, and a second trains from the base "
        "on the labels plus this many of the most confident (the teacher's probabilities as targets, label shares "
        "kept); about triples the fine-tuning time; 0 is off")
    self_training_candidates: int = Field(
        20000, ge=1, description="corpus sentences the first model scores (a seeded sample)")
    distill_teachers: int = Field(
        0, ge=0, description="ensemble distillation: this many teachers fine-tune with the recipe (other seeds), and "
        "the model trains from the base again on targets mixing each row's own with the teachers' mean "
        "probabilities (see distill_weight); costs N + 1 fine-tunings; 0 is off")
    distill_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the teachers' mean probabilities in each training row's target")
    teacher_model: str | None = Field(
        None, description="distillation from a fine-tuned classifier, typically a larger one (a folder, a hub id, or "
        "a registered model's models:/ URI): the model trains from the base on targets mixing each row's own with "
        "the teacher's probabilities (see distill_weight), plus distill_corpus_texts corpus sentences it labels; "
        "its labels must be the project's, in any order")
    distill_corpus_texts: int = Field(
        0, ge=0, description="with teacher_model: a seeded sample of this many corpus sentences joins the training "
        "set, the teacher's probabilities as targets (all of them, unfiltered: the unsure ones teach most)")
    train_sampling: Literal["group_by_length", "random", "sequential"] = Field(
        "group_by_length", description="group_by_length: length-bucketed shuffled batches, little padding")
    # A sweep: the train DAG maps fine-tuning over this grid and registers the best by validation macro-F1.
    sweep_learning_rates: list[float] = Field(default_factory=list)
    sweep_seeds: list[int] = Field(default_factory=list)
    # GPU nodes: None means on when CUDA is there.
    bf16: bool | None = None
    torch_compile: bool = False
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile's mode where torch_compile is on: reduce-overhead and max-autotune add "
        "CUDA graphs (fixed shapes pay: masked-LM blocks; fine-tuning's varying batch shapes record a graph each), "
        "max-autotune also searches kernels for minutes; not yet timed in the trainer on a GPU",
    )


class ReleaseConfig(BaseModel):
    min_macro_f1: float = Field(0.6, description="absolute floor for the first champion")
    min_improvement: float = Field(0.0, description="candidate must beat champion macro-F1 by at least this")
    parity_max_abs_diff: float = 1e-4
    parity_max_flips: int = 0


class ServingConfig(BaseModel):
    alias: str = "champion"
    model_dir: Path | None = Field(None, description="serve a local ONNX folder instead of the registry")
    max_batch: int = 256
    max_text_chars: int = 10_000


class OrchestrationConfig(BaseModel):
    gpu_pool: str = Field("gpu", description="Airflow pool for training tasks; give it as many slots as GPUs")
    gpu_queue: str = Field("gpu", description="Celery queue of the GPU workers (CeleryExecutor only)")
    gpu_pool_slots: int = Field(1, description="slots of the GPU pool: the number of GPUs (1 on a CPU-only machine)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINSENT_", env_nested_delimiter="__", extra="ignore")

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
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment: str = "finsent"
    model_name: str = "finsent-sentiment"

    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    release: ReleaseConfig = ReleaseConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    serving: ServingConfig = ServingConfig()

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
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    def resolved(self) -> dict:
        return json.loads(self.model_dump_json())

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:12]


def get_settings() -> Settings:
    return Settings()
