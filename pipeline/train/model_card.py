"""The model card: a Markdown page logged with the run and the registered
model that says what the model is, what it was trained on under which
licence, how well it does, and what it must not be used for."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import LABELS, Settings
from pipeline.data.sources import HUB_PHRASEBANK, PHRASEBANK_LEVELS
from pipeline.train.evaluate import AGREEMENT_LEVELS, slice_name
from pipeline.bases import BASE_LICENCES

FPB_LICENCE = (
    "Financial PhraseBank (Malo et al., 2014), licensed under Creative Commons Attribution-NonCommercial-ShareAlike 3.0 "
    "(CC BY-NC-SA 3.0). This model is derived from it: non-commercial use only, with attribution, and derivatives "
    "shared under the same licence."
)
FPB_CITATION = (
    "P. Malo, A. Sinha, P. Korhonen, J. Wallenius and P. Takala (2014). Good debt or bad debt: Detecting semantic "
    "orientations in economic texts. Journal of the Association for Information Science and Technology 65(4), 782-796."
)
REUTERS_LICENCE = (
    "Reuters-21578, Distribution 1.0 (Reuters Ltd. and Carnegie Group; prepared by D. D. Lewis): freely available "
    "for research use only, not commercially; copyright stays with Reuters. Used as unlabeled text (masked-LM "
    "adaptation, or sentences a teacher model labeled for distillation)."
)
UNKNOWN_LICENCE = "licence not recorded by the pipeline: check the source's terms before any use"

INTENDED_USE = [
    "Sentiment (negative / neutral / positive) of single English sentences from financial news and company "
    "announcements, from an investor's point of view.",
    "Monitoring and research: aggregate trends over many sentences, with a person reviewing decisions.",
]
LIMITATIONS = [
    "Trained on short sentences (typically under 40 words); paragraphs and documents are truncated at the maximum "
    "sequence length and lose context.",
    "The labeled data are news about Finnish companies listed on OMX Helsinki, and the unlabeled corpus (when "
    "masked-LM adaptation or distillation used it) is 1987 Reuters newswire: vocabulary, companies "
    "and market conventions of other regions and later years are under-represented.",
    "Not investment advice: the label says how a sentence reads, not what a security will do.",
    "Scores are softmax outputs, not calibrated probabilities unless the expected calibration error above is small; "
    "see the reliability diagram before thresholding on them.",
    "Annotators disagreed on part of the data (the 50-74 % agreement sentences): accuracy there is lower than on "
    "AllAgree, and such sentences are ambiguous for people too.",
]


HEADS = {
    "cls": "the [CLS] vector through the pooler",
    "mean": "the mean of the token vectors; the head's code ships with the model, so outside finsent load it with "
    "`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`",
}
TARGETS = {
    False: "hard labels",
    True: "soft targets from annotator agreement (the label gets the sentence's agreement share)",
}


@dataclass(frozen=True)
class ModelCardInputs:
    model_name: str
    run_id: str
    base_model: str
    mlm_decision: str
    data_digest: str
    test_digest: str
    git_commit: str
    config_hash: str
    train_config: dict
    test_metrics: dict[str, float]
    labeled_source: str
    phrasebank: bool
    corpus_source: str | None = None
    finetune: dict = field(default_factory=dict)
    behaviour: dict[str, float] = field(default_factory=dict)


def labeled_source(settings: Settings) -> tuple[str, bool]:
    """Where the labeled data came from, and whether it is Financial PhraseBank."""
    if settings.labeled_source is None:
        if settings.fpb_dir is not None and settings.fpb_dir.is_dir():
            return str(settings.fpb_dir), True
        return f"hf://{HUB_PHRASEBANK}", True
    source = settings.labeled_source
    folder = Path(source)
    is_fpb = "phrasebank" in source.lower() or (folder.is_dir() and (folder / PHRASEBANK_LEVELS[50]).is_file())
    return source, is_fpb


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_section(metrics: dict[str, float]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    keys = ["accuracy", "macro_f1", "roc_auc_ovr", "ece", *(f"f1_{name}" for name in LABELS)]
    lines += [f"| {key} | {_fmt(metrics[key])} |" for key in keys if key in metrics]
    slices = [slice_name(level) for level in AGREEMENT_LEVELS if f"accuracy_{slice_name(level)}" in metrics]
    if slices:
        lines += ["", "Agreement slices (sentences whose annotator agreement is at least the level):", "",
                  "| slice | sentences | accuracy | macro-F1 |", "|---|---|---|---|"]
        for name in slices:
            count = metrics.get(f"n_{name}")
            lines.append(
                f"| {name} | {'' if count is None else int(count)} | {_fmt(metrics[f'accuracy_{name}'])} "
                f"| {_fmt(metrics.get(f'macro_f1_{name}', float('nan')))} |"
            )
    if "ece" in metrics:
        lines += ["", f"Expected calibration error (15 equal-width bins, top label): {metrics['ece']:.4f}."]
    return lines


def _behaviour_section(rates: dict[str, float]) -> list[str]:
    if not rates:
        return []
    return ["## Behavioural suite", "",
            "Pass rates per capability of the CheckList-style suite in tests/behavioural (minimum functionality, "
            "invariance and directional cases); the release gate rejects a candidate that regresses on any.", "",
            "| capability | pass rate |", "|---|---|",
            *(f"| {name} | {100 * rate:.1f} % |" for name, rate in sorted(rates.items())), ""]


def render_model_card(card: ModelCardInputs) -> str:
    cfg = card.train_config
    base_licence = BASE_LICENCES.get(card.base_model)
    licences = [
        f"- Base model: {base_licence or UNKNOWN_LICENCE}",
        f"- Labeled data ({card.labeled_source}): {FPB_LICENCE if card.phrasebank else UNKNOWN_LICENCE}",
    ]
    if card.corpus_source:
        licences.append(f"- Unlabeled corpus ({card.corpus_source}): {REUTERS_LICENCE}")
    teacher_share = 0.5 if cfg.get("distill_weight") is None else cfg["distill_weight"]
    tuning = ", ".join(f"{k}: {_fmt(v)}" for k, v in card.finetune.items())
    lines = [
        f"# Model card: {card.model_name}",
        "",
        "## Model",
        "",
        f"- Task: sentence-level sentiment, labels {', '.join(LABELS)}",
        f"- Base model: `{card.base_model}`",
        f"- Masked-LM adaptation: {card.mlm_decision}",
        f"- Fine-tuning: {cfg.get('finetune_method', 'full')}" + (f" ({tuning})" if tuning else ""),
        f"- Classification head: {HEADS.get(cfg.get('pooling', 'cls'), HEADS['cls'])}",
        f"- Training targets: {TARGETS[bool(cfg.get('agreement_soft_labels'))]}",
        *([f"- Distillation: trained on targets mixing each sentence's own ({1 - teacher_share:.2g}) with the "
           f"probabilities of the fine-tuned teacher `{cfg['teacher_model']}` ({teacher_share:.2g}), plus "
           f"{cfg.get('distill_corpus_texts', 0)} unlabeled corpus sentences with the teacher's probabilities as targets"]
          if cfg.get("teacher_model") else []),
        f"- Maximum sequence length: {cfg.get('max_length')} tokens",
        f"- MLflow run: `{card.run_id}`; git commit: `{card.git_commit}`; config hash: `{card.config_hash}`",
        "",
        "## Data",
        "",
        f"- Data digest (DVC): `{card.data_digest}`",
        f"- Frozen test split digest: `{card.test_digest}`",
        "",
        "### Licences and attribution",
        "",
        *licences,
        "",
    ]
    if card.phrasebank:
        lines += [f"Cite: {FPB_CITATION}", ""]
    lines += [
        "## Training configuration",
        "",
        "```json",
        json.dumps(cfg, indent=2, sort_keys=True),
        "```",
        "",
        "## Test metrics",
        "",
        *_metrics_section(card.test_metrics),
        "",
        *_behaviour_section(card.behaviour),
        "## Intended use",
        "",
        *(f"- {line}" for line in INTENDED_USE),
        "",
        "## Limitations",
        "",
        *(f"- {line}" for line in LIMITATIONS),
        "",
    ]
    return "\n".join(lines)


def write_model_card(card: ModelCardInputs, path: Path) -> Path:
    path.write_text(render_model_card(card), encoding="utf-8")
    return path


def card_summary(markdown: str, limit: int = 4000) -> str:
    """The card's sections, in order, that fit ``limit`` characters together
    (the registry's description field is bounded; long ones such as the
    training configuration are left out first); the full card is an artifact."""
    sections = markdown.split("\n## ")
    summary = sections[0]
    note = "\n\n(Full model card: artifact `model_card.md` of the run and of the logged model.)"
    for section in sections[1:]:
        candidate = f"{summary}\n## {section}"
        if len(candidate) + len(note) <= limit:
            summary = candidate
    return summary.rstrip() + note
