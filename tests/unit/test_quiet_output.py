"""`make demo`'s terminal: progress bars stay one line, each task gives one
summary line, library chatter goes to the log file only."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from pipeline import services, steps
from pipeline.logs import (
    ProgressThrottle, Segments, StatusLine, configure_logging, mark, parse_mark, parse_meter, summarize,
)


def _tqdm_output(total: int = 50, log_every: int = 10) -> str:
    """What an HF Trainer-like loop writes to a pipe: a bar, a nested evaluation bar, tqdm.write'd log dicts."""
    from tqdm.auto import tqdm

    out = io.StringIO()
    bar = tqdm(total=total, file=out, mininterval=0, dynamic_ncols=True)
    for step in range(total):
        bar.update(1)
        if step % log_every == 0:
            evaluation = tqdm(total=5, file=out, leave=False, mininterval=0, dynamic_ncols=True)
            for _ in range(5):
                evaluation.update(1)
            evaluation.close()
            bar.write(str({"loss": 1.0, "step": step}), file=out)
    bar.close()
    return out.getvalue()


def test_segments_split_on_carriage_returns_and_newlines_across_chunks():
    segments = Segments()
    data = "a\r\nb\rc\nd".encode() + "é".encode()
    pieces = [piece for i in range(len(data)) for piece in segments.feed(data[i:i + 1])] + list(segments.close())
    assert pieces == [("a", "\r"), ("", "\n"), ("b", "\r"), ("c", "\n"), ("dé", "")]


def test_tqdm_meters_are_recognised_and_log_lines_are_not():
    output = _tqdm_output()
    texts = [text for text, _ in Segments().feed(output)]
    meters = [text for text in texts if parse_meter(text)]
    assert len(meters) > 50
    assert parse_meter("Map: 100%|██████████| 7/7 [00:00<00:00, 1234.5 examples/s]")
    assert parse_meter(" 45%|####5     | 18/40 [00:10<00:12,  1.80s/it, loss=2.3]")
    assert parse_meter("Map: 7 examples [00:00, 506209.10 examples/s]")
    for line in ("{'loss': 1.0, 'step': 0}", "2026-12-06 02:02:17,975 WARNING torchao: Failed to load",
                 "[finsent demo   42s] airflow dags test train", "meeting at [12:30]"):
        assert parse_meter(line) is None


def test_progress_is_throttled_to_a_line_per_second_and_percent():
    lines, now = [], [0.0]
    throttle = ProgressThrottle("finetune", lines.append, clock=lambda: now[0])
    for step in range(1, 501):
        now[0] = step * 0.01  # 500 updates in 5 s
        throttle.update(f"{step * 100 // 500:3d}%|#| {step}/500 [00:0{int(now[0])}<00:00, 100.00it/s]")
    throttle.flush()
    assert 5 <= len(lines) <= 8
    assert all(parse_mark(line)[0] == "finetune" for line in lines)
    assert "500/500" in lines[-1]


def test_run_step_turns_a_progress_bar_into_few_lines_and_ends_with_a_summary(monkeypatch, capsys):
    script = textwrap.dedent(f"""
        import json, sys
        sys.stderr.write({_tqdm_output(total=300, log_every=100)!r})
        sys.stderr.flush()
        print(json.dumps({{"model_dir": "/m", "best_epoch": 3, "best_val_macro_f1": 0.81234,
                           "best_val_accuracy": 0.84, "epochs_run": 5, "trial": {{"trial": 0}}}}))
    """)
    real_popen = subprocess.Popen
    monkeypatch.setattr(steps.subprocess, "Popen",
                        lambda command, **kwargs: real_popen([sys.executable, "-c", script], **kwargs))
    result = steps.run_step("finetune", "--run-id", "r", "--model", "/m")
    assert result["best_epoch"] == 3
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) < 20  # the raw bar was well over 300 updates
    assert any("{'loss': 1.0, 'step': 100}" in line for line in lines)  # the step's own lines still come through
    assert lines[-1] == mark("finetune", "best val macro-F1 0.8123 (accuracy 0.8400) at epoch 3 of 5")
    assert json.loads(lines[-2]) == result


def test_failed_step_shows_the_end_of_its_output_and_where_its_log_is(tmp_path, monkeypatch):
    monkeypatch.setenv("FINSENT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FINSENT_PROJECT_DIR", str(tmp_path))
    # A step that fails after its logging is set up and it has logged.
    script = ("import logging, sys; from pipeline.logs import configure_cli_logging; "
              f"configure_cli_logging('finetune', {str(tmp_path / 'state')!r}); "
              "logging.getLogger('pipeline.train').warning('about to fail'); sys.exit('no training data')")
    real_popen = subprocess.Popen
    monkeypatch.setattr(steps.subprocess, "Popen",
                        lambda command, **kwargs: real_popen([sys.executable, "-c", script], **kwargs))
    log_file = tmp_path / "state" / "logs" / "finetune.log"
    with pytest.raises(steps.StepFailed, match=rf"(?s)exited with 1 \(full log: {log_file}\):.*no training data"):
        steps.run_step("finetune", "--run-id", "r")
    assert "about to fail" in log_file.read_text()


def test_summaries_of_the_demo_steps():
    assert summarize("mlm-adapt", {"perplexity_base": 25.31, "perplexity_adapted": 22.1, "used": "adapted",
                                   "steps": 40, "reason": "…"}) == \
        "masked-LM perplexity 25.31 -> 22.10 after 40 steps: adapted model kept"
    assert "fine-tuning the base" in summarize("mlm-adapt", {"perplexity_base": 5.0, "perplexity_adapted": 4.99,
                                                             "used": "base", "steps": 40})
    assert summarize("evaluate", {"metrics": {"accuracy": 0.844, "macro_f1": 0.826, "accuracy_allagree": 0.97}}) == \
        "test accuracy 0.8440, macro-F1 0.8260, AllAgree accuracy 0.9700"
    assert summarize("export-onnx", {"version": "1", "variants": ["fp32", "fp32-optimized"], "default_cpu": "fp32-optimized",
                                     "blessing": {"fp32": "blessed", "fp32-optimized": "blessed",
                                                  "int8": "not blessed: label flips 2.02 % > 1.00 %"}}) == \
        "version 1: blessed fp32, fp32-optimized; served on CPU: fp32-optimized; int8 not blessed: label flips 2.02 % > 1.00 %"
    assert "released before" in summarize("export-onnx", {"version": "1", "reused": True})
    assert summarize("release.infra_check", None) == "skipped: the gate rejected the candidate"
    assert summarize("ingest.ingest_labeled", {"rows_in": 4846, "clean": 4836, "quarantined": 4, "duplicates": 6,
                                               "splits": {"train": 3503, "validation": 391, "test": 942}}) == \
        "4,846 labeled rows in: 4,836 clean, 4 quarantined, 6 duplicates; train/validation/test 3,503/391/942"
    assert summarize("release.gate", {"promote": True, "candidate_version": "1", "reason": "first model"}) == \
        "promote version 1: first model"
    assert summarize("release.promote", {"promoted": True, "champion_version": "1"}) == "champion is now version 1"
    assert summarize("train.mlm_adapt", "/some/model") is None  # run_step already summarized it
    assert summarize("evaluate", {"metrics": "unexpected"}) is None


AIRFLOW_STDOUT = """\
2026-12-06T02:01:36.491492Z [warning  ] Could not import graphviz. Rendering graph to the graphical format will not be possible.
You might need to install the graphviz package and necessary system packages.
Run `pip install graphviz` to attempt to install it. [py.warnings] category=UserWarning lineno=57
[]    [great_expectations.datasource.fluent.config] loc=config.py:191
2026-12-06T02:01:37.147153Z [info     ] [DAG TEST] starting task_id=ingest_labeled map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1501
2026-12-06T02:01:48.060721Z [info     ] Skipping registering function get_context because it does not have a class [great_expectations._docs_decorators] loc=_docs_decorators.py:115
2026-12-06T02:01:49.718947Z [info     ] Done. Returned value was: {'rows_in': 4846, 'clean': 4836, 'quarantined': 4, 'duplicates': 6, 'splits': {'train': 3503, 'validation': 391, 'test': 942}, 'file_errors': []} [airflow.task.operators.airflow.providers.standard.decorators.python._PythonDecoratedOperator] loc=python.py:233
2026-12-06T02:01:49.719380Z [info     ] Pushing xcom                   [task] loc=task_runner.py:2280
2026-12-06T02:01:49.720000Z [warning  ] the test split differs from the frozen one (1303b5beb6d0)  [pipeline.data.ingest] loc=ingest.py:81
2026-12-06T02:01:49.726103Z [info     ] [DAG TEST] end task task_id=ingest_labeled map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1563
2026-12-06T02:01:57.049484Z [info     ] [DAG TEST] starting task_id=version_data map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1501
2026-12-06T02:01:59.075230Z [info     ] Done. Returned value was: c6f8fc73d5815975098124ba1f6bde9e.dir [airflow.task.operators.airflow.providers.standard.decorators.python._PythonDecoratedOperator] loc=python.py:233
2026-12-06T02:01:59.075230Z [info     ] [DAG TEST] end task task_id=version_data map_index=-1 [airflow.sdk.definitions.dag] loc=dag.py:1563
2026-12-06T02:02:12.471993Z [info     ] [DAG TEST] starting task_id=finetune map_index=0 [airflow.sdk.definitions.dag] loc=dag.py:1501
2026-12-06 02:02:17,975 WARNING torchao: Failed to load /x/_C_mxfp8.so
W1206 02:02:19.017000 8566 .venv/lib/python3.11/site-packages/torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass
[finsent finetune]   2%|2         | 10/550 [00:05<04:30,  2.00it/s]
{'loss': 1.02, 'grad_norm': 3.1, 'learning_rate': 0.0001, 'epoch': 0.2}
[finsent finetune]  50%|#####     | 275/550 [02:20<02:20,  1.96it/s]
{"model_dir": "/m", "best_epoch": 4, "best_val_macro_f1": 0.83, "epochs_run": 5}
[finsent finetune] best val macro-F1 0.8300 (accuracy 0.8500) at epoch 4 of 5
2026-12-06T02:05:12.406642Z [info     ] Done. Returned value was: {'model_dir': '/m', 'best_epoch': 4, 'best_val_macro_f1': 0.83, 'epochs_run': 5} [airflow.task.operators.airflow.providers.standard.decorators.python._PythonDecoratedOperator] loc=python.py:233
2026-12-06T02:05:12.453520Z [info     ] [DAG TEST] end task task_id=finetune map_index=0 [airflow.sdk.definitions.dag] loc=dag.py:1563
"""


def test_airflow_echo_shows_summaries_and_one_status_line(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "airflow"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.write({AIRFLOW_STDOUT!r})\n"
                    "sys.stdout.write('Map:  50%|#####     | 1/2 [00:00<00:00, 10.0 examples/s]\\r')\n")
    fake.chmod(0o755)
    monkeypatch.setattr(services, "_bin", lambda name: str(fake))
    log_path = tmp_path / "logs" / "airflow-dags-test-train.log"
    services.airflow(["dags", "test", "ingest"], {"PATH": "/usr/bin:/bin"}, log_path, echo_task_output=True)
    out = capsys.readouterr().out
    lines = [line.split("\r")[-1].rstrip() for line in out.split("\n")]
    assert lines == [
        "  ingest_labeled  4,846 labeled rows in: 4,836 clean, 4 quarantined, 6 duplicates; train/validation/test 3,503/391/942",
        "  ingest_labeled  warning: the test split differs from the frozen one (1303b5beb6d0)",
        "  version_data    data/ versioned with DVC (c6f8fc73d581)",
        "  finetune        best val macro-F1 0.8300 (accuracy 0.8500) at epoch 4 of 5",
        "",
    ]
    assert out.count("running 0:00\r") == 3  # a status line per task, replaced by its summary
    logged = log_path.read_text()
    assert "Skipping registering function" in logged and "torchao" in logged and "\r" not in logged
    assert "[finsent finetune]  50%" in logged and "Map:  50%" not in logged  # the step's throttled lines only


def test_failing_airflow_command_raises_with_the_tasks_output_and_log_path(tmp_path, monkeypatch):
    fake = tmp_path / "airflow"
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    "print('2026-12-06T02:02:20.893318Z [error    ] Task failed with exception     [task] loc=x.py:1')\n"
                    "print('Traceback (most recent call last):')\n"
                    "print('pipeline.steps.StepFailed: finsent mlm-adapt exited with 1')\n"
                    "print('2026-12-06T02:02:28.016571Z [warning  ] No tasks to run. [airflow] loc=dag.py:1')\n"
                    "sys.exit('DagRun failed')\n")
    fake.chmod(0o755)
    monkeypatch.setattr(services, "_bin", lambda name: str(fake))
    log_path = tmp_path / "dags-test.log"
    with pytest.raises(RuntimeError, match=r"(?s)full log: .*dags-test\.log.*StepFailed: finsent mlm-adapt") as failure:
        services.airflow(["dags", "test", "train"], {"PATH": "/usr/bin:/bin"}, log_path, echo_task_output=True)
    assert "No tasks to run" not in str(failure.value)


def test_the_running_task_shows_its_latest_bar_in_place():
    stream, now = io.StringIO(), [0.0]
    echo = services.TaskEcho("train", Path("/logs/train.log"), StatusLine(stream, width=80), refresh=1.0,
                             clock=lambda: now[0])
    echo.feed("2026-12-06T02:02:12.471993Z [info     ] [DAG TEST] starting task_id=mlm_adapt map_index=-1 [x] loc=d:1")
    for step in range(1, 41):
        now[0] = step * 0.5
        echo.feed(mark("mlm-adapt", f"{step * 100 // 40:3d}%|#| {step}/40 [00:{step:02d}<00:10,  2.00it/s]"))
    echo.feed(mark("mlm-adapt", "masked-LM perplexity 25.31 -> 22.10 after 40 steps: adapted model kept"))
    now[0] += 10
    echo.render()
    echo.feed("2026-12-06T02:02:32.471993Z [info     ] [DAG TEST] end task task_id=mlm_adapt map_index=-1 [x] loc=d:1")
    shown = stream.getvalue()
    assert shown.count("\n") == 1 and shown.count("\r") >= 20
    assert "38/40" in shown and "40/40" not in shown  # a finished bar gives way to the running time
    assert shown.split("\r")[-1].startswith("  mlm_adapt       masked-LM perplexity 25.31 -> 22.10")
    assert shown.endswith("kept\n")


def test_status_line_stays_one_line():
    stream = io.StringIO()
    status = StatusLine(stream, width=40)
    for i in range(100):
        status.show(f"finetune {i}%|" + "#" * 60)
    status.line("finetune done")
    assert stream.getvalue().count("\n") == 1
    assert all(len(part.rstrip("\n")) <= 40 for part in stream.getvalue().split("\r"))


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def test_library_chatter_goes_to_the_file_only(tmp_path, restore_logging):
    terminal = io.StringIO()
    log_file = configure_logging(tmp_path / "logs" / "step.log", stream=terminal)
    logging.getLogger("onnxscript.rewriter").info("applied 12 rewrite rules")
    # A library's logger that nothing else in the test run configures (torch.onnx's own is set by the export tests).
    logging.getLogger("an_exporter_library.passes").info("Obtain model graph")
    logging.getLogger("pipeline.train.jobs").info("masked-LM adaptation done")
    logging.getLogger("mlflow.tracking").warning("a real problem")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Could not import graphviz", UserWarning)
    shown, logged = terminal.getvalue(), log_file.read_text()
    assert "masked-LM adaptation done" in shown and "a real problem" in shown
    assert "rewrite rules" not in shown and "Obtain model graph" not in shown and "graphviz" not in shown
    for text in ("rewrite rules", "Obtain model graph", "masked-LM adaptation done", "a real problem", "graphviz"):
        assert text in logged


def test_demo_uses_the_demo_recipe_unless_one_is_chosen():
    from pipeline.demo import demo_env, hint

    assert demo_env("http://x", {})["FINSENT_RECIPE"] == "demo"
    assert demo_env("http://x", {"FINSENT_RECIPE": "fpb-minilm"})["FINSENT_RECIPE"] == "fpb-minilm"
    assert len(hint(Path("/s")).splitlines()) <= 6
