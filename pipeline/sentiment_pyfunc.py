"""MLflow "model from code" for the registered classifier: this file is
stored with the model, so loading it needs mlflow, torch and transformers,
not the finsent package."""

from __future__ import annotations

import mlflow
import pandas as pd


def _texts(model_input) -> list[str]:
    """A DataFrame's ``text`` column (or its only column), a dict of ``text``, one string, or any sequence of strings."""
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return model_input[column].astype(str).tolist()
    if isinstance(model_input, dict):
        model_input = model_input["text"]
    if isinstance(model_input, str):
        return [model_input]
    return [str(t) for t in model_input]


class SentimentClassifier(mlflow.pyfunc.PythonModel):
    """Returns one row per text: ``label`` and the softmax score of each label."""

    def load_context(self, context):
        import json

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = context.artifacts["hf_model"]
        # The folder is the project's own fine-tuned model; a mean-pooling head ships its code in it. Both loads
        # read its config: untrusted, transformers would ask on the terminal (and wait) before going on.
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
        with open(context.artifacts["label_map"]) as handle:
            meta = json.load(handle)
        self.labels = meta["labels"]
        self.max_length = meta["max_length"]

    def predict(self, context, model_input, params=None):
        import torch

        texts = _texts(model_input)
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), 64):
                batch = self.tokenizer(
                    texts[start : start + 64], truncation=True, max_length=self.max_length,
                    padding=True, return_tensors="pt",
                )
                probs = torch.softmax(self.model(**batch).logits.float(), dim=-1).numpy()
                for row in probs:
                    rows.append({"label": self.labels[int(row.argmax())], **dict(zip(self.labels, map(float, row)))})
        return pd.DataFrame(rows, columns=["label", *self.labels])


mlflow.models.set_model(SentimentClassifier())
