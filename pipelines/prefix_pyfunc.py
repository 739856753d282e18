"""A prefix-tuned result as an MLflow pyfunc model (models from code: this file is copied into the MLflow
model, with tasks/prefix_cache.py, and needs only torch, transformers and peft to load). MLflow's
transformers flavor has no form for it: there are no merged weights to save, and its PEFT support
expects a base model on the Hugging Face Hub. The MLflow model carries the pretrained model, the
adapter and objective.json as artifacts; `predict` takes prompts (strings, or a DataFrame's first
column) and returns a DataFrame of `label` and `score` for a classification head, else the greedy
continuations (`params={"max_new_tokens": N}`).

Saved by pipelines/tracking_models.py (save_prefix_model); never imported by lmforge itself.
"""
from __future__ import annotations

import json

import mlflow.pyfunc
from mlflow.models import set_model


class PrefixTunedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from prefix_cache import accept_prefix_cache

        meta = json.loads(open(context.artifacts["objective"]).read())
        base_dir = context.artifacts["base"]
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.labels = meta.get("labels") if meta["objective"] == "classifier" else None
        if self.labels:
            base = accept_prefix_cache(AutoModelForSequenceClassification.from_pretrained(
                base_dir, dtype=torch.float32, num_labels=len(self.labels), pad_token_id=meta["pad_token_id"],
                id2label=dict(enumerate(self.labels)), label2id={l: i for i, l in enumerate(self.labels)}))
        else:
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        prompts = list(model_input.iloc[:, 0]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        outputs = []
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([self.tokenizer.encode(prompt, add_special_tokens=False)])
                if self.labels:
                    probs = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.softmax(-1)[0]
                    outputs.append({"label": self.labels[int(probs.argmax())], "score": float(probs.max())})
                else:
                    new = int((params or {}).get("max_new_tokens", 32))
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                              do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                    outputs.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return pd.DataFrame(outputs) if self.labels else outputs


set_model(PrefixTunedModel())
