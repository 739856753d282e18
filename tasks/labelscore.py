"""Label likelihood: how a language model scores the candidate labels of a classification record,
as the summed log-probability of " <label>" + EOS after the record's prompt.

    label_log_likelihoods(model, tokenizer, record, labels, task, max_length) -> [score per label]
        one record, its candidates as a right-padded batch: the prompt is computed once per label
        (and cut for each label's own length). The reference; training-time validation uses it.
    packed_label_log_likelihoods(model, tokenizer, records, labels, task, max_length) -> [[...]]
        many records: each record's prompt once, followed by all its candidates in one sequence
        whose attention mask lets a candidate see the prompt and itself only, at the positions it
        would have alone; records batched with right padding, so a score does not depend on the
        batch. The prompt is cut once, so that the longest candidate fits: every candidate is
        scored after the same prompt. What evaluation uses.
"""
from __future__ import annotations

import torch

from conf.schema import TaskConfig
from tasks.common import Progress
from tasks.taskdata import encode_example, encode_prompt, encode_target, render


@torch.no_grad()
def label_log_likelihoods(model, tokenizer, record: dict, labels: list[str], task: TaskConfig,
                          max_length: int) -> list[float]:
    """Summed log-probability of each candidate label (+EOS) after the record's prompt."""
    examples = [encode_example(tokenizer, {**record, "label": label}, task, max_length) for label in labels]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, : len(ids)], attention[row, : len(ids)] = torch.tensor(ids), 1
    log_probs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), dim=-1)
    return [sum(log_probs[row, i - 1, ids[i]].item() for i in range(start, len(ids)))
            for row, (ids, start) in enumerate(examples)]


def can_pack(model) -> bool:
    """Prefix tuning puts its virtual tokens in front of the attention mask: a custom mask cannot hold them."""
    return not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)


@torch.no_grad()
def packed_label_log_likelihoods(model, tokenizer, records: list[dict], labels: list[str], task: TaskConfig,
                                 max_length: int, progress: Progress | None = None,
                                 batch_size: int = 16) -> list[list[float]]:
    """Each record's summed log-probability of each candidate label (+EOS), all candidates of a record
    in one packed sequence."""
    targets = [encode_target(tokenizer, " " + label) for label in labels]
    longest = max(map(len, targets))
    prompts = [encode_prompt(tokenizer, render({**r, "label": labels[0]}, task)[:3], task.kind, max_length, longest)
               for r in records]
    # records of similar length share a pass (less padding); a score does not depend on its batch
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    scores: list[list[float]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, row in zip(chunk, score_packed(model, [prompts[i] for i in chunk], targets, tokenizer.pad_token_id)):
            scores[i] = row
        if progress is not None:
            progress.update(len(chunk))
    return scores


def score_packed(model, prompts: list[list[int]], targets: list[list[int]], pad_id: int) -> list[list[float]]:
    """One forward pass over rows of prompt + every target; per row, each target's summed log-probability."""
    length = max(len(p) for p in prompts) + sum(map(len, targets))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    positions = torch.zeros_like(input_ids)
    segments = torch.full_like(input_ids, -1)  # 0: the prompt, i + 1: target i, -1: padding
    for row, prompt in enumerate(prompts):
        ids = prompt + [t for target in targets for t in target]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        positions[row, : len(ids)] = torch.tensor(list(range(len(prompt))) + [len(prompt) + k for target in targets
                                                                             for k in range(len(target))])
        segments[row, : len(ids)] = torch.tensor([0] * len(prompt) + [i + 1 for i, target in enumerate(targets)
                                                                      for _ in target])
    mask = packed_attention_mask(segments, next(model.parameters()).dtype)
    # only the positions that predict a target token go through the output head and the softmax
    wanted = [scored_positions(len(prompt), targets) for prompt in prompts]
    kept = sorted({i for row in wanted for target in row for i in target})
    column = {position: k for k, position in enumerate(kept)}
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=torch.tensor(kept)).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return [[log_probs[row, [column[i] for i in where], target].sum().item() for where, target in zip(rows, targets)]
            for row, rows in enumerate(wanted)]


def packed_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, length, length) additive mask: a token sees earlier tokens of the prompt and of its own
    segment; no token sees padding, and padding sees itself (no row is empty)."""
    query, key = segments[:, :, None], segments[:, None, :]
    length = segments.size(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query)) | torch.eye(length, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def scored_positions(prompt_length: int, targets: list[list[int]]) -> list[list[int]]:
    """Where each target's tokens are predicted in one packed row: its first token at the prompt's last
    position, the others at the target's own previous token."""
    positions, start = [], prompt_length
    for target in targets:
        positions.append([prompt_length - 1] + list(range(start, start + len(target) - 1)))
        start += len(target)
    return positions
