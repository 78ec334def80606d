"""MLflow "model from code" for the registered classifier: this file is
stored with the model, so loading it needs mlflow, torch and transformers,
not the finsent package."""

from __future__ import annotations

import mlflow
import pandas as pd


class SentimentClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import json

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = context.artifacts["hf_model"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        with open(context.artifacts["label_map"]) as handle:
            meta = json.load(handle)
        self.labels = meta["labels"]
        self.max_length = meta["max_length"]

    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text"].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
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
