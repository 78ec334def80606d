"""The promotion rule: a candidate replaces the champion only if it is at
least as good on the same test split; the first one must clear a floor."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline.config import ReleaseConfig


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_macro_f1: float
    champion_macro_f1: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def decide_promotion(candidate: dict[str, float], champion: dict[str, float] | None, cfg: ReleaseConfig) -> GateDecision:
    score = candidate["macro_f1"]
    if champion is None:
        promote = score >= cfg.min_macro_f1
        verb = "clears" if promote else "is below"
        return GateDecision(promote, f"first model: macro-F1 {score:.4f} {verb} the floor {cfg.min_macro_f1:.4f}", score, None)
    best = champion["macro_f1"]
    promote = score >= best + cfg.min_improvement
    relation = "at least as good as" if promote else "worse than"
    reason = f"candidate macro-F1 {score:.4f} is {relation} champion {best:.4f} (+{cfg.min_improvement:.4f} required)"
    return GateDecision(promote, reason, score, best)
