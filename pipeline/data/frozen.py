"""The frozen evaluation set: the test split's digest is recorded in
``<project>/frozen_test.json`` the first time it is built; training refuses
to run when the current test split differs, until it is re-frozen on purpose
(``finsent freeze-test``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

FROZEN_FILE = "frozen_test.json"


class FrozenTestSetChanged(RuntimeError):
    """The test split is not the frozen one."""


def split_digest(frame: pd.DataFrame) -> str:
    """sha256 over the sorted (text, label) pairs: independent of row order and file format."""
    lines = sorted(f"{text}\t{label}" for text, label in zip(frame["text"], frame["label"]))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_frozen(project_dir: Path) -> dict | None:
    path = project_dir / FROZEN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def freeze_test_set(project_dir: Path, test: pd.DataFrame) -> dict:
    record = {"test_digest": split_digest(test), "rows": len(test)}
    (project_dir / FROZEN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def compare_to_frozen(project_dir: Path, test: pd.DataFrame) -> dict:
    """{'test_digest', 'rows', 'frozen_digest', 'changed'}; freezes when nothing is frozen yet."""
    frozen = read_frozen(project_dir) or freeze_test_set(project_dir, test)
    digest = split_digest(test)
    return {"test_digest": digest, "rows": len(test), "frozen_digest": frozen["test_digest"],
            "changed": digest != frozen["test_digest"]}


def require_frozen_test_set(project_dir: Path, test: pd.DataFrame) -> str:
    """The test digest, or FrozenTestSetChanged naming both digests and the way out."""
    state = compare_to_frozen(project_dir, test)
    if state["changed"]:
        frozen = read_frozen(project_dir)
        raise FrozenTestSetChanged(
            f"the test split changed: frozen {frozen['test_digest'][:12]} ({frozen['rows']} rows) "
            f"vs current {state['test_digest'][:12]} ({state['rows']} rows) in {project_dir / FROZEN_FILE}. "
            "Scores would not be comparable with earlier models. If the change is intended, run "
            "`finsent freeze-test` and commit the new frozen_test.json."
        )
    return state["test_digest"]
