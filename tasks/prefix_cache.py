"""PEFT prefix tuning of a sequence classifier under transformers 5. A standalone file (torch and
transformers only): MLflow ships it with a registered prefix-tuned model (pipelines/prefix_pyfunc.py).
"""
from __future__ import annotations


def accept_prefix_cache(model):
    """PEFT's prefix tuning for sequence classification hands its trained KV cache over only where
    the model's forward names a `past_key_values` argument, which transformers 5 calls `cache`: the
    instance gets a forward with that name (the same call otherwise)."""
    inner = model.forward

    def forward(input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return inner(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                     **kwargs)

    model.forward = forward
    return model
