"""DAG files import cleanly and cheaply: no network, no database, no torch
at parse time; the library never imports Airflow."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(path for path in (REPO / "dags").glob("*.py") if path.name != "assets.py")
EXPECTED_TASKS = {
    "ingest": ["ingest_corpus", "ingest_labeled", "ingest_news", "version_data"],
    "train": ["check_cache", "evaluate", "finetune", "mlm_adapt", "pick_best", "register", "start_run", "sweep_trials"],
    "release": ["export_onnx", "gate", "infra_check", "promote"],
    "release_override": ["override"],
    "monitor": ["build_index", "detect_drift", "score_news", "trigger_retraining"],
}
HEAVY = ["torch", "transformers", "mlflow", "onnxruntime", "great_expectations", "dvc", "pipeline.train", "sklearn"]

PROBE = """
import importlib.util, json, os, socket, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # the DAG folder, as Airflow puts it on sys.path
def refuse(*args, **kwargs):
    raise RuntimeError("network access while parsing a DAG file")
socket.socket.connect = refuse
socket.create_connection = refuse
from airflow.sdk.definitions._internal.contextmanager import DagContext
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["dag_under_test"] = module
DagContext.current_autoregister_module_name = "dag_under_test"  # as the DAG processor does
spec.loader.exec_module(module)
found = {dag.dag_id: sorted(dag.task_ids) for dag, _ in DagContext.autoregistered_dags}
placement = {t.task_id: [t.pool, t.queue] for dag, _ in DagContext.autoregistered_dags for t in dag.tasks}
heavy = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
runs = {dag.dag_id: dag.max_active_runs for dag, _ in DagContext.autoregistered_dags}
timeouts = {t.task_id: t.execution_timeout and t.execution_timeout.total_seconds()
            for dag, _ in DagContext.autoregistered_dags for t in dag.tasks}
print(json.dumps({"dags": found, "heavy": heavy, "placement": placement, "max_active_runs": runs, "timeouts": timeouts}))
"""


def _probe(path: Path, tmp_path: Path, **extra_env: str) -> dict:
    env = {
        "PATH": "/usr/bin:/bin",
        "AIRFLOW_HOME": str(tmp_path),
        # Any database access would fail: the folder does not exist.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/missing/dir/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **extra_env,
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), json.dumps(HEAVY)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_dag_file_imports_without_db_network_or_heavy_modules(path, tmp_path):
    result = _probe(path, tmp_path)
    assert result["heavy"] == [], f"{path.name} imports {result['heavy']} at parse time"
    assert list(result["dags"]) == [path.stem], "dag_id must be the file name, one DAG per file"
    assert result["dags"][path.stem] == EXPECTED_TASKS[path.stem]


@pytest.mark.parametrize("dag_id", ["release", "release_override"])
def test_one_release_at_a_time(dag_id, tmp_path):
    assert _probe(REPO / "dags" / f"{dag_id}.py", tmp_path)["max_active_runs"] == {dag_id: 1}


def test_training_tasks_go_to_the_configured_gpu_pool_and_queue(tmp_path):
    placement = _probe(REPO / "dags" / "train.py", tmp_path, FINSENT_ORCHESTRATION__GPU_POOL="h100",
                       FINSENT_ORCHESTRATION__GPU_QUEUE="cuda")["placement"]
    heavy_steps = {"mlm_adapt", "finetune", "evaluate"}
    assert {task: placement[task] for task in heavy_steps} == dict.fromkeys(heavy_steps, ["h100", "cuda"])
    assert all(placement[task][0] != "h100" for task in set(placement) - heavy_steps)


def test_every_asset_is_defined_once_in_assets_py():
    defined = []
    for path in (REPO / "dags").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Asset":
                defined.append(path.name)
    assert defined and set(defined) == {"assets.py"}, f"Assets defined outside dags/assets.py: {defined}"


def _with_the_train_dag(tmp_path, statement: str) -> str:
    """The last line ``statement`` prints about ``dag`` (the train DAG), loaded in a fresh process
    whose Airflow metadata DB does not exist."""
    code = (
        "import json, sys; sys.path.insert(0, 'dags')\n"
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('train_dag', 'dags/train.py')\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"dag = module.train_dag()\n{statement}"
    )
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/missing/dir/airflow.db"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_train_dag_takes_recipe_and_no_cache_params(tmp_path):
    assert _with_the_train_dag(tmp_path, "print(dag.params['recipe'], dag.params['no_cache'])") == "None False"


def test_a_cached_run_skips_every_task_after_start_run(tmp_path):
    printed = _with_the_train_dag(tmp_path, "check = dag.get_task('check_cache')\n"
                                  "print(json.dumps([check.task_type, sorted(check.get_flat_relative_ids(upstream=False))]))")
    task_type, downstream = json.loads(printed)
    assert task_type == "_ShortCircuitDecoratedOperator"
    assert downstream == sorted(set(EXPECTED_TASKS["train"]) - {"start_run", "check_cache"})


def test_drift_emitted_by_the_monitor_schedules_training(tmp_path):
    code = (
        "import json, sys; sys.path.insert(0, 'dags')\n"
        "import importlib.util\n"
        "def load(name):\n"
        "    spec = importlib.util.spec_from_file_location(name + '_dag', f'dags/{name}.py')\n"
        "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "    return getattr(module, name + '_dag')()\n"
        "monitor, train = load('monitor'), load('train')\n"
        "trigger = monitor.get_task('trigger_retraining')\n"
        "print(json.dumps({'catchup': monitor.catchup, 'schedule': monitor.schedule,\n"
        "    'start': monitor.start_date.date().isoformat(), 'end': monitor.end_date.date().isoformat(),\n"
        "    'outlets': [a.name for a in trigger.outlets],\n"
        "    'depends_on_past': monitor.get_task('build_index').depends_on_past,\n"
        "    'train_on': sorted(a.name for a in train.timetable.asset_condition.objects)}))"
    )
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/missing/dir/airflow.db",
           "FINSENT_MONITOR__START_DATE": "1987-03-01", "FINSENT_MONITOR__END_DATE": "1987-03-31"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"catchup": True, "schedule": "@daily", "start": "1987-03-01", "end": "1987-03-31",
                     "outlets": ["finsent-drift"], "depends_on_past": True,
                     "train_on": ["finsent-curated-labeled", "finsent-drift"]}


@pytest.mark.parametrize("package", ["pipeline", "serving"])
def test_library_never_imports_airflow(package):
    offenders = []
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "airflow"]
    assert offenders == []


def test_serving_never_imports_training_code():
    for path in (REPO / "serving").rglob("*.py"):
        source = path.read_text()
        assert "pipeline.train" not in source and "pipeline.release" not in source, path.name


@pytest.mark.parametrize("folder", ["mlflow", "docker"])
def test_no_package_shadowing(folder):
    assert not (REPO / folder / "__init__.py").exists()


@pytest.mark.parametrize("argv, preloaded", [(["airflow", "scheduler"], True), (["airflow", "celery", "worker"], True),
                                             (["airflow", "dags", "list"], False), (["airflow", "api-server"], False)])
def test_only_processes_that_fork_tasks_preload_the_pipeline(argv, preloaded, tmp_path):
    from pipeline.services import airflow_env

    env = airflow_env(tmp_path / "home", REPO / "dags", {"PATH": "/usr/bin:/bin"})
    probe = (f"import sys; sys.argv = {argv!r}; import airflow_local_settings; "
             "print('pipeline.monitor.jobs' in sys.modules and 'great_expectations' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(preloaded)]


def test_long_tasks_have_the_configured_execution_timeout(tmp_path):
    long_tasks = {"train": ["evaluate", "finetune", "mlm_adapt"], "release": ["export_onnx"], "monitor": ["score_news"]}
    for dag_id, task_ids in long_tasks.items():
        timeouts = _probe(REPO / "dags" / f"{dag_id}.py", tmp_path, FINSENT_ORCHESTRATION__STEP_TIMEOUT_MINUTES="90")["timeouts"]
        assert {task_id: timeouts[task_id] for task_id in task_ids} == {task_id: 5400.0 for task_id in task_ids}
