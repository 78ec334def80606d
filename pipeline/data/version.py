"""Data versioning with DVC: ``data/`` is tracked by ``data.dvc`` and pushed
to the configured remote (a local folder by default, S3 when configured)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


def _dvc(project_dir: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project_dir, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {project_dir}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def ensure_dvc_repo(project_dir: Path, remote_url: str) -> None:
    if not (project_dir / ".dvc").is_dir():
        scm = [] if (project_dir / ".git").exists() else ["--no-scm"]
        _dvc(project_dir, "init", "--quiet", *scm)
    # --local keeps the machine-specific remote out of the committed .dvc/config.
    _dvc(project_dir, "remote", "add", "--local", "--default", "--force", "storage", remote_url)


def read_digest(project_dir: Path, target: str = "data") -> str:
    """The DVC digest (md5 of the directory listing) recorded in ``<target>.dvc``."""
    pointer = project_dir / f"{target}.dvc"
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} not found: run ingest first")
    meta = yaml.safe_load(pointer.read_text())
    return meta["outs"][0]["md5"]


def version_data(project_dir: Path, remote_url: str, target: str = "data") -> str:
    """``dvc add`` + ``dvc push``; returns the digest that downstream runs log.
    ``dvc add`` rewrites ``<target>.dvc`` before anything is pushed, so when
    either step fails the previous file is put back (or the new one removed):
    a ``.dvc`` file never names data the remote lacks."""
    project_dir = project_dir.resolve()
    ensure_dvc_repo(project_dir, remote_url)
    pointer = project_dir / f"{target}.dvc"
    previous = pointer.read_bytes() if pointer.is_file() else None
    try:
        _dvc(project_dir, "add", "--quiet", target)
        _dvc(project_dir, "push", pointer.name)  # not --quiet: that would drop the reason from a failure's message
    except RuntimeError as err:
        if previous is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_bytes(previous)
        kept = "left as it was" if previous is not None else "not written"
        raise RuntimeError(f"versioning {target}/ to the DVC remote {remote_url} failed; {pointer.name} was {kept}. "
                           f"{err}") from err
    return read_digest(project_dir, target)
