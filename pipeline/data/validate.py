"""Great Expectations (GX Core 1.x) suites for the curated data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import LABELS, IngestConfig
from pipeline.data.split import SPLITS

AGREEMENT_LEVELS = [50, 66, 75, 100]


class DataValidationError(RuntimeError):
    """A batch failed an expectation; the message names it and its numbers."""


@dataclass
class ValidationReport:
    suite: str
    success: bool
    failures: list[str]
    statistics: dict
    docs_index: str | None = None

    def raise_for_failures(self) -> None:
        if not self.success:
            raise DataValidationError(f"suite {self.suite!r} failed: " + "; ".join(self.failures))


def _labeled_expectations(cfg: IngestConfig) -> list:
    import great_expectations as gx

    return [
        gx.expectations.ExpectTableColumnsToMatchSet(column_set=["text", "label", "agreement", "split"], exact_match=True),
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=1),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="text"),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_chars, max_value=cfg.max_chars),
        gx.expectations.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS)),
        gx.expectations.ExpectColumnValuesToBeInSet(column="agreement", value_set=AGREEMENT_LEVELS),
        gx.expectations.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        # Unique over the union of the splits: no sentence is in two splits.
        gx.expectations.ExpectColumnValuesToBeUnique(column="text"),
    ]


def _corpus_expectations(id_column: str) -> list:
    import great_expectations as gx

    return [
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=1),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="text"),
        gx.expectations.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
        gx.expectations.ExpectColumnValuesToBeUnique(column=id_column),
    ]


def _describe_failure(result) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
    details = result.result or {}
    numbers = {k: details[k] for k in ("element_count", "unexpected_count", "unexpected_percent", "observed_value") if k in details}
    sample = details.get("partial_unexpected_list")
    text = f"{config.type}({kwargs}) {numbers}"
    return text + (f" e.g. {sample[:3]!r}" if sample else "")


def run_suite(frame: pd.DataFrame, suite_name: str, expectations: list, docs_dir: Path | None = None) -> ValidationReport:
    """Validates ``frame``; with ``docs_dir``, also builds GX Data Docs (HTML) there."""
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
    checkpoint = context.checkpoints.add(gx.Checkpoint(name=suite_name, validation_definitions=[definition], actions=actions))
    result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))
    failures = [_describe_failure(r) for r in result.results if not r.success]
    docs_index = str(docs_dir.resolve() / "index.html") if docs_dir is not None else None
    return ValidationReport(suite=suite_name, success=result.success, failures=failures,
                            statistics=dict(result.statistics), docs_index=docs_index)


def validate_labeled(splits: dict[str, pd.DataFrame], cfg: IngestConfig, docs_dir: Path | None = None) -> ValidationReport:
    union = pd.concat([frame.assign(split=name) for name, frame in splits.items()], ignore_index=True)
    return run_suite(union, "labeled_text", _labeled_expectations(cfg), docs_dir)


def validate_corpus(corpus: pd.DataFrame, id_column: str = "doc_id", docs_dir: Path | None = None) -> ValidationReport:
    return run_suite(corpus, "unlabeled_corpus", _corpus_expectations(id_column), docs_dir)
