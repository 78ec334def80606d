"""Sequence classification on the mean of the token vectors instead of [CLS],
for BERT and MPNet bases.

Sentence-transformers bases (the offline all-MiniLM-L6-v2 and all-mpnet-base-v2
among them) were trained to put a text's meaning in the mean of its token
vectors; their first-token vector and pooler were never trained for that.
transformers has no mean-pooling head for these encoders, hence these small
classes. Importing this module registers them with the Auto classes, so a saved
model loads with ``AutoModelForSequenceClassification``; a saved model also
carries this file and an ``auto_map``, so where the finsent package is not
installed ``from_pretrained(folder, trust_remote_code=True)`` loads it with
transformers alone (the registered MLflow model does that)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    MPNetConfig,
    MPNetModel,
    MPNetPreTrainedModel,
    PretrainedConfig,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class _MeanPoolClassifier:
    """Dropout and a linear layer on the mask-weighted mean of the token vectors;
    attribute names as in transformers' own heads (``dropout``, ``classifier``)."""

    def _init_head(self, config: PretrainedConfig) -> None:
        self.num_labels = config.num_labels
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(dropout if dropout is not None else config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def _classify(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None):
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


class MeanPoolBertConfig(BertConfig):
    model_type = "finsent_mean_pool_bert"


class MeanPoolBertForSequenceClassification(_MeanPoolClassifier, BertPreTrainedModel):
    config_class = MeanPoolBertConfig

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self._init_head(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        return self._classify(hidden, attention_mask, labels)


class MeanPoolMPNetConfig(MPNetConfig):
    model_type = "finsent_mean_pool_mpnet"


class MeanPoolMPNetForSequenceClassification(_MeanPoolClassifier, MPNetPreTrainedModel):
    config_class = MeanPoolMPNetConfig

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = MPNetModel(config, add_pooling_layer=False)
        self._init_head(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.mpnet(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._classify(hidden, attention_mask, labels)


# The base's model type -> its mean-pooling config and model.
MEAN_POOL_HEADS = {
    "bert": (MeanPoolBertConfig, MeanPoolBertForSequenceClassification),
    "mpnet": (MeanPoolMPNetConfig, MeanPoolMPNetForSequenceClassification),
}
MEAN_POOL_MODEL_TYPES = {config.model_type for config, _ in MEAN_POOL_HEADS.values()}

for _config, _model in MEAN_POOL_HEADS.values():
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModelForSequenceClassification")
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForSequenceClassification.register(_config, _model, exist_ok=True)
