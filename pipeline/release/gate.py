"""The promotion rule. A candidate replaces the champion only if it is better:
its macro-F1 on the frozen test split beats the champion's (a tie, and in
particular the same predictions, is never promoted), the paired bootstrap's 95 %
interval of the improvement does not reach below -tolerance, no agreement slice
loses more than its budget, and no behavioural capability regresses. The first
champion must clear an absolute floor."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.config import ReleaseConfig


@dataclass
class Evaluation:
    """A version's predictions on the frozen test split and its behavioural suite results."""

    version: str
    labels: list[str]
    predicted: np.ndarray
    slices: dict[str, dict[str, float]]
    behaviour: dict
    macro_f1: float


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate_macro_f1: float
    champion_macro_f1: float | None
    checks: list[dict] = field(default_factory=list)
    improvement_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _macro_f1_rows(y: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 of each row of a (rounds, n) resample, as sklearn's (zero_division=0)."""
    scores = np.zeros(y.shape[0])
    for c in range(classes):
        truth, guess = y == c, predicted == c
        tp = (truth & guess).sum(axis=1)
        denominator = truth.sum(axis=1) + guess.sum(axis=1)
        scores += np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
    return scores / classes


def paired_bootstrap(y: np.ndarray, candidate: np.ndarray, champion: np.ndarray, classes: int,
                     rounds: int, seed: int = 0) -> tuple[float, float, float]:
    """Macro-F1 improvement (candidate - champion) and its 95 % percentile interval,
    both models scored on the same resampled sentences in each round."""
    rows = np.random.default_rng(seed).integers(0, len(y), size=(rounds, len(y)))
    delta = _macro_f1_rows(y[rows], candidate[rows], classes) - _macro_f1_rows(y[rows], champion[rows], classes)
    point = float(_macro_f1_rows(y[None], candidate[None], classes)[0] - _macro_f1_rows(y[None], champion[None], classes)[0])
    low, high = np.percentile(delta, [2.5, 97.5])
    return point, float(low), float(high)


def _check(checks: list[dict], name: str, passed: bool, detail: str) -> None:
    checks.append({"check": name, "passed": bool(passed), "detail": detail})


def decide_promotion(y: np.ndarray, candidate: Evaluation, champion: Evaluation | None, cfg: ReleaseConfig) -> GateDecision:
    checks: list[dict] = []
    if champion is None:
        _check(checks, "floor", candidate.macro_f1 >= cfg.min_macro_f1,
               f"first model: macro-F1 {candidate.macro_f1:.4f} against the floor {cfg.min_macro_f1:.4f}")
        return _decision(candidate, None, checks, None)
    if candidate.labels != champion.labels:
        _check(checks, "labels", False, f"label set {candidate.labels} differs from the champion's {champion.labels}")
        return _decision(candidate, champion, checks, None)
    if np.array_equal(candidate.predicted, champion.predicted):
        _check(checks, "improvement", False, "the candidate predicts the champion's label for every test sentence: "
               "an identical model is not promoted")
        return _decision(candidate, champion, checks, None)
    point, low, high = paired_bootstrap(y, candidate.predicted, champion.predicted, len(candidate.labels),
                                        cfg.bootstrap_rounds)
    _check(checks, "improvement", point > cfg.min_improvement,
           f"macro-F1 {candidate.macro_f1:.4f} vs champion {champion.macro_f1:.4f}: {point:+.4f} "
           f"(must be > {cfg.min_improvement:+.4f}; a tie is not promoted)")
    _check(checks, "bootstrap", low > -cfg.bootstrap_tolerance,
           f"95 % CI of the improvement [{low:+.4f}, {high:+.4f}] ({cfg.bootstrap_rounds} paired resamples); "
           f"lower bound must be above {-cfg.bootstrap_tolerance:+.4f}")
    for name, scores in champion.slices.items():
        mine = candidate.slices.get(name)
        if mine is None:
            continue
        drop = scores["accuracy"] - mine["accuracy"]
        _check(checks, f"slice:{name}", drop <= cfg.slice_max_drop,
               f"{name} accuracy {mine['accuracy']:.4f} vs {scores['accuracy']:.4f} (n={int(mine['n'])}; "
               f"may drop {cfg.slice_max_drop:.3f})")
    for name, theirs in champion.behaviour["capabilities"].items():
        mine = candidate.behaviour["capabilities"].get(name)
        if mine is None:
            continue
        drop = theirs["pass_rate"] - mine["pass_rate"]
        _check(checks, f"behaviour:{name}", drop <= cfg.behaviour_max_drop,
               f"{name} passes {mine['passed']}/{mine['n']} vs champion {theirs['passed']}/{theirs['n']} "
               f"(may drop {cfg.behaviour_max_drop:.2f})")
    return _decision(candidate, champion, checks, (low, high))


def _decision(candidate: Evaluation, champion: Evaluation | None, checks: list[dict],
              interval: tuple[float, float] | None) -> GateDecision:
    failed = [c for c in checks if not c["passed"]]
    against = f"against champion v{champion.version}" if champion else "as the first champion"
    if failed:
        reason = f"rejected {against}: " + "; ".join(f"{c['check']}: {c['detail']}" for c in failed)
    else:
        reason = f"promote {against}: " + "; ".join(c["detail"] for c in checks[:2])
    return GateDecision(
        promote=not failed, reason=reason, candidate_macro_f1=candidate.macro_f1,
        champion_macro_f1=champion.macro_f1 if champion else None, checks=checks, improvement_ci=interval,
    )
