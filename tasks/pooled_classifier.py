"""A Llama sequence classifier that reads the mean of the last hidden states over the prompt's tokens
(`finetune.pooling=mean`) instead of the last token's. On a small model pretrained on a novel, the
last position has learned to predict the next word, not to summarise the sentence; the mean keeps
what every position knows (benchmarks/reference_classifier.py --pooling mean; docs/quality.md, "Mean pooling in the
pipeline").

This file needs only torch and transformers: it is copied into every exported directory of such a
model, whose config.json maps AutoModelForSequenceClassification to it, so Hugging Face users load
it with `AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`.
"""
from __future__ import annotations

import torch
from transformers import LlamaForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutputWithPast


class MeanPooledLlamaForSequenceClassification(LlamaForSequenceClassification):
    """LlamaForSequenceClassification with the score head on the mean hidden state of the non-pad
    tokens (the pad id, else the attention mask, says which they are)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, **kwargs):
        outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        pad_id = self.config.pad_token_id
        if input_ids is not None and pad_id is not None:
            mask = (input_ids != pad_id).to(hidden.dtype)
        elif attention_mask is not None:
            mask = attention_mask[:, -hidden.shape[1]:].to(hidden.dtype)
        else:
            mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


AUTO_MAP = {"AutoModelForSequenceClassification": f"{__name__.rsplit('.', 1)[-1]}.{MeanPooledLlamaForSequenceClassification.__name__}"}
"""config.json's auto_map of an exported mean-pooled classifier: this file, copied beside it."""
