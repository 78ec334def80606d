"""BERT sequence classification on the mean of the token vectors instead of [CLS].

Sentence-transformers bases (the offline all-MiniLM-L6-v2 among them) were trained
to put a text's meaning in the mean of its token vectors; their [CLS] vector and
pooler were never trained for that. transformers has no mean-pooling head for
BERT, hence this small class. Importing this module registers it with the Auto
classes, so a saved model loads with ``AutoModelForSequenceClassification``; a
saved model also carries this file and an ``auto_map``, so where the finsent
package is not installed ``from_pretrained(folder, trust_remote_code=True)``
loads it with transformers alone (the registered MLflow model does that)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MEAN_POOL_MODEL_TYPE = "finsent_mean_pool_bert"


class MeanPoolBertConfig(BertConfig):
    model_type = MEAN_POOL_MODEL_TYPE


class MeanPoolBertForSequenceClassification(BertPreTrainedModel):
    config_class = MeanPoolBertConfig

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


MeanPoolBertConfig.register_for_auto_class()
MeanPoolBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
AutoConfig.register(MEAN_POOL_MODEL_TYPE, MeanPoolBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPoolBertConfig, MeanPoolBertForSequenceClassification, exist_ok=True)
