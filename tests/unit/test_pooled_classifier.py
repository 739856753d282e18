"""The mean-pooled classification head (finetune.pooling=mean): the score head on the mean hidden
state of the non-pad tokens, and its name as the rest of lmforge knows it."""
from __future__ import annotations

import torch

from tasks import models
from tasks.pooled_classifier import AUTO_MAP, MeanPooledLlamaForSequenceClassification


def tiny_classifier() -> MeanPooledLlamaForSequenceClassification:
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=32, pad_token_id=0, num_labels=3)
    return MeanPooledLlamaForSequenceClassification(config).eval()


def test_the_head_reads_the_mean_of_the_non_pad_hidden_states():
    model = tiny_classifier()
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.model(ids).last_hidden_state
    expected = torch.stack([model.score(hidden[0].mean(0)), model.score(hidden[1, 2:].mean(0))])
    assert logits.shape == (2, 3) and torch.allclose(logits, expected, atol=1e-6)


def test_the_loss_is_cross_entropy_of_the_pooled_logits():
    model = tiny_classifier()
    ids, labels = torch.tensor([[5, 6, 7], [0, 9, 10]]), torch.tensor([2, 0])
    out = model(input_ids=ids, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_exports_name_this_class_and_this_file():
    assert models.MEAN_POOLED == MeanPooledLlamaForSequenceClassification.__name__
    assert AUTO_MAP == {"AutoModelForSequenceClassification": f"pooled_classifier.{models.MEAN_POOLED}"}
