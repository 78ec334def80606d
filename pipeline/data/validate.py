"""Great Expectations (GX Core 1.x) suites for the curated data.

Each expectation is either row-level (``meta={"level": "row"}``: rows that
fail it go to quarantine with the expectation as their reason; it fails the
batch only when its ``mostly`` share is exceeded) or batch-level (schema,
uniqueness, truncation and label shares: a failure fails the task with the
expectation's name and numbers)."""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.config import LABELS, IngestConfig
from pipeline.data.split import SPLITS

AGREEMENT_LEVELS = [50, 66, 75, 100]
LABELED_COLUMNS = ["id", "text", "label", "agreement", "source", "line"]
# U+FFFD (undecodable bytes), C0/C1 controls, private-use code points, and the
# classic UTF-8-read-as-latin-1 pairs ("Ã©", "â€™"): text a model should not see.
GARBLED = r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ue000-\uf8ff]|Ã[\x80-\xbf]|â€"
_ROW = {"level": "row"}


class DataValidationError(RuntimeError):
    """A batch failed an expectation; the message names it and its numbers."""


@dataclass
class ValidationReport:
    suite: str
    success: bool
    failures: list[str]
    statistics: dict
    row_failures: dict[Hashable, str] = field(default_factory=dict)
    docs_index: str | None = None

    def raise_for_failures(self) -> None:
        if not self.success:
            raise DataValidationError(f"suite {self.suite!r} failed: " + "; ".join(self.failures))


def truncated_share(token_counts: Sequence[int], max_tokens: int) -> float:
    return sum(n > max_tokens for n in token_counts) / max(len(token_counts), 1)


def _row(reason: str) -> dict:
    return {**_ROW, "reason": reason}


def _labeled_expectations(cfg: IngestConfig, max_tokens: int) -> list:
    import great_expectations as gx

    expectations = [
        gx.expectations.ExpectTableColumnsToMatchSet(
            column_set=[*LABELED_COLUMNS, "split", "n_tokens", *(f"is_{label}" for label in LABELS)], exact_match=True),
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=1),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="text", meta=_row("missing text")),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=cfg.min_chars, max_value=cfg.max_chars,
            meta=_row(f"text length outside [{cfg.min_chars}, {cfg.max_chars}] characters")),
        gx.expectations.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, meta=_row("no tokens")),
        gx.expectations.ExpectColumnValuesToNotMatchRegex(
            column="text", regex=GARBLED, mostly=1 - cfg.max_garbled_share,
            meta=_row("non-printable or garbled characters")),
        gx.expectations.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS), meta=_row("label not in the set")),
        gx.expectations.ExpectColumnValuesToBeInSet(column="agreement", value_set=AGREEMENT_LEVELS,
                                                    meta=_row("unknown agreement level")),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="id", meta=_row("missing id")),
        gx.expectations.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        # Unique over the union of the splits: no sentence is in two splits.
        gx.expectations.ExpectColumnValuesToBeUnique(column="text"),
        gx.expectations.ExpectColumnValuesToBeUnique(column="id"),
        # Longer sentences are cut at the model's max sequence length: allowed, within a share.
        gx.expectations.ExpectColumnValuesToBeBetween(
            column="n_tokens", max_value=max_tokens, mostly=1 - cfg.max_truncated_share),
    ]
    if cfg.label_reference:
        for label, share in cfg.label_reference.items():
            expectations.append(gx.expectations.ExpectColumnMeanToBeBetween(
                column=f"is_{label}", min_value=round(max(share - cfg.label_tolerance, 0.0), 4),
                max_value=round(min(share + cfg.label_tolerance, 1.0), 4)))
    return expectations


def _corpus_expectations(id_column: str, max_chars: int, max_garbled_share: float) -> list:
    import great_expectations as gx

    return [
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=1),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="text", meta=_row("missing text")),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=1, max_value=max_chars, meta=_row(f"text length outside [1, {max_chars}] characters")),
        gx.expectations.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=1, meta=_row("no tokens")),
        gx.expectations.ExpectColumnValuesToNotMatchRegex(
            column="text", regex=GARBLED, mostly=1 - max_garbled_share, meta=_row("non-printable or garbled characters")),
        gx.expectations.ExpectColumnValuesToNotBeNull(column=id_column, meta=_row("missing id")),
        gx.expectations.ExpectColumnValuesToBeUnique(column=id_column),
    ]


def _plain(value):
    """numpy scalars as Python numbers, floats rounded: readable in a task log."""
    value = value.item() if hasattr(value, "item") else value
    return round(value, 4) if isinstance(value, float) else value


def _describe_failure(result) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
    details = result.result or {}
    numbers = {k: _plain(details[k]) for k in ("element_count", "unexpected_count", "unexpected_percent", "observed_value")
               if k in details}
    sample = details.get("partial_unexpected_list")
    text = f"{config.type}({kwargs}) {numbers}"
    return text + (f" e.g. {sample[:3]!r}" if sample else "")


def _fails_batch(result) -> bool:
    """Row-level expectations fail the batch only past an explicit ``mostly``."""
    config = result.expectation_config
    if result.success or (config.meta or {}).get("level") != "row":
        return not result.success
    return config.kwargs.get("mostly") is not None and config.kwargs["mostly"] < 1


def run_suite(frame: pd.DataFrame, suite_name: str, expectations: list, docs_dir: Path | None = None) -> ValidationReport:
    """Validates ``frame``; with ``docs_dir``, also builds GX Data Docs (HTML) there.
    Row-level failures are returned by ``frame``'s index, one reason per row."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(name=f"{suite_name}_source")
        .add_dataframe_asset(name=suite_name)
        .add_batch_definition_whole_dataframe(name="whole")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite_name, data=batch_definition, suite=suite))
    actions = []
    if docs_dir is not None:
        docs_dir = docs_dir / suite_name
        context.add_data_docs_site(site_name="finsent", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["finsent"]))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=suite_name, validation_definitions=[definition], actions=actions,
        # COMPLETE lists every unexpected row's index, which row-level quarantine needs.
        result_format={"result_format": "COMPLETE"},
    ))
    result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))

    row_failures: dict[Hashable, str] = {}
    for outcome in result.results:
        meta = outcome.expectation_config.meta or {}
        if meta.get("level") == "row":
            reason = f"{meta['reason']} ({outcome.expectation_config.type})"
            for index in (outcome.result or {}).get("unexpected_index_list") or []:
                row_failures.setdefault(index, reason)
    failures = [_describe_failure(r) for r in result.results if _fails_batch(r)]
    docs_index = str(docs_dir.resolve() / "index.html") if docs_dir is not None else None
    return ValidationReport(suite=suite_name, success=not failures, failures=failures,
                            statistics=dict(result.statistics), row_failures=row_failures, docs_index=docs_index)


def labeled_frame(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The union of the splits with a ``split`` column and one 0/1 column per
    label, whose means are the label shares the suite bounds."""
    union = pd.concat([frame.assign(split=name) for name, frame in splits.items()], ignore_index=True)
    return union.assign(**{f"is_{label}": (union["label"] == label).astype("int64") for label in LABELS})


def validate_labeled(frame: pd.DataFrame, cfg: IngestConfig, max_tokens: int, docs_dir: Path | None = None) -> ValidationReport:
    """``frame``: :func:`labeled_frame` with an ``n_tokens`` column."""
    return run_suite(frame, "labeled_text", _labeled_expectations(cfg, max_tokens), docs_dir)


def validate_corpus(corpus: pd.DataFrame, cfg: IngestConfig, id_column: str = "doc_id",
                    docs_dir: Path | None = None) -> ValidationReport:
    """``corpus`` with an ``n_tokens`` column."""
    return run_suite(corpus, "unlabeled_corpus", _corpus_expectations(id_column, cfg.max_news_chars, cfg.max_garbled_share),
                     docs_dir)
