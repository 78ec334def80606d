"""The behavioural suite (CheckList style): minimum functionality (MFT: an
expected label), invariance (INV: a variant keeps the text's label) and
directional cases (DIR: a variant moves net sentiment up or down), one JSONL
file per capability. Pass rates per capability feed the gate and the model card."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.release import ReleaseError

TESTS = ("MFT", "INV", "DIR")
SUITE_DIR = Path(__file__).resolve().parents[2] / "tests" / "behavioural"


class SuiteError(ReleaseError):
    """A suite file that cannot be read as cases."""


@dataclass(frozen=True)
class Case:
    id: str
    capability: str
    test: str
    text: str
    expected: str | None = None
    variant: str | None = None
    direction: str | None = None


def _case(raw: dict, where: str, labels: Sequence[str]) -> Case:
    required = {"MFT": ("expected",), "INV": ("variant",), "DIR": ("variant", "direction")}
    test = raw.get("test")
    if test not in TESTS:
        raise SuiteError(f"{where}: 'test' must be one of {', '.join(TESTS)}, got {test!r}")
    missing = [key for key in ("id", "capability", "text", *required[test]) if not raw.get(key)]
    if missing:
        raise SuiteError(f"{where}: a {test} case needs {', '.join(missing)}")
    if test == "MFT" and raw["expected"] not in labels:
        raise SuiteError(f"{where}: expected {raw['expected']!r} is not a label ({', '.join(labels)})")
    if test == "DIR" and raw["direction"] not in ("up", "down"):
        raise SuiteError(f"{where}: direction must be 'up' or 'down', got {raw['direction']!r}")
    return Case(**{key: raw.get(key) for key in Case.__dataclass_fields__})


def load_suite(folder: Path | None, labels: Sequence[str]) -> list[Case]:
    folder = Path(folder or SUITE_DIR)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise SuiteError(f"no behavioural suite (*.jsonl) in {folder}")
    cases: list[Case] = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise SuiteError(f"{where}: not JSON ({err.msg})") from None
            cases.append(_case(raw, where, labels))
    ids = [case.id for case in cases]
    if len(set(ids)) != len(ids):
        raise SuiteError(f"{folder}: case ids repeat: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    return cases


def run_suite(cases: Sequence[Case], probabilities: Callable[[list[str]], np.ndarray], labels: Sequence[str]) -> dict:
    """Scores every text once; returns per-case outcomes and pass rates per capability."""
    texts = sorted({c.text for c in cases} | {c.variant for c in cases if c.variant})
    probs = dict(zip(texts, probabilities(texts)))
    positive, negative = labels.index("positive"), labels.index("negative")

    def label(text: str) -> str:
        return labels[int(probs[text].argmax())]

    def net(text: str) -> float:
        return float(probs[text][positive] - probs[text][negative])

    outcomes = {}
    for case in cases:
        if case.test == "MFT":
            passed = label(case.text) == case.expected
        elif case.test == "INV":
            passed = label(case.variant) == label(case.text)
        else:
            moved = net(case.variant) - net(case.text)
            passed = moved > 0 if case.direction == "up" else moved < 0
        outcomes[case.id] = passed
    capabilities: dict[str, dict] = {}
    for case in cases:
        entry = capabilities.setdefault(case.capability, {"passed": 0, "n": 0, "failed": []})
        entry["n"] += 1
        if outcomes[case.id]:
            entry["passed"] += 1
        else:
            entry["failed"].append(case.id)
    for entry in capabilities.values():
        entry["pass_rate"] = entry["passed"] / entry["n"]
    return {"n": len(cases), "pass_rate": sum(outcomes.values()) / max(len(cases), 1), "capabilities": capabilities}
