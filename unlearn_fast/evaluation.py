"""Figures that show what was forgotten and what was kept.

- answer accuracy (prompt + response examples): the greedy completion of the prompt contains
  the expected response (case and surrounding punctuation ignored);
- classification accuracy (text + label examples);
- mean per-token loss of the targets, and perplexity of general text.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from .data import Example
from .encoding import Row, collate, encode, pad_token_id
from .models import output_head, output_states
from .ops import eul_loss_head
from .ops.loss_head import IGNORE_INDEX


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


@torch.no_grad()
def completions(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8,
                batch_size: int = 32) -> list[str]:
    """Greedy completions (the new text only)."""
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = pad_token_id(tokenizer)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[i:i + batch_size]), return_tensors="pt", padding=True).to(device)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad)
            if not model.config.is_encoder_decoder:
                generated = generated[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(generated, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def answer_hits(model: nn.Module, tokenizer, examples: Sequence[Example], max_new_tokens: int = 8) -> list[bool]:
    """For each prompt/response example: does the greedy completion contain the response?"""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    return [_normalise(e.response) in _normalise(t) for e, t in zip(examples, texts)]


@torch.no_grad()
def classification_hits(model: nn.Module, tokenizer, examples: Sequence[Example], labels: Sequence[int],
                        batch_size: int = 32) -> list[bool]:
    device = next(model.parameters()).device
    hits = []
    for i in range(0, len(examples), batch_size):
        texts = [e.text for e in examples[i:i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(device)
        pred = model(**enc).logits.argmax(-1).tolist()
        hits += [p == y for p, y in zip(pred, labels[i:i + batch_size])]
    return hits


@torch.no_grad()
def row_losses(model: nn.Module, task: str, rows: Sequence[Row], pad_id: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed target loss, target count) per row, teacher-forced, without full-vocab logits."""
    head = output_head(model, task)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
        states = output_states(model, task, batch)
        has_target = batch["targets"] != IGNORE_INDEX
        n = int(has_target.sum())
        res = eul_loss_head(states[has_target], None, head.weight, batch["targets"][has_target],
                            torch.zeros(n, device=device), torch.zeros(n, device=device), bias=head.bias,
                            logit_scale=head.logit_scale, logit_softcap=head.logit_softcap)
        per_pos = torch.zeros(has_target.shape, dtype=torch.float64)
        per_pos[has_target.cpu()] = res.ce.double().cpu()
        counts = has_target.sum(1).tolist()
        out += list(zip(per_pos.sum(1).tolist(), counts))
    return out


def mean_loss(model, task, rows, pad_id) -> float:
    """Mean per-token target loss over rows (nats)."""
    pairs = row_losses(model, task, rows, pad_id)
    total, count = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return total / max(count, 1)


def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 256) -> float:
    """Perplexity of a causal LM on plain texts: exp(mean next-token loss)."""
    rows = encode([Example(text=t) for t in texts], tokenizer, "causal", forget=False, name="general text",
                  max_length=max_length)
    return math.exp(mean_loss(model, "causal", rows, pad_token_id(tokenizer)))


def evaluate_sets(model: nn.Module, tokenizer, task: str, sets: dict[str, Sequence[Example]],
                  labels: Optional[dict[str, Sequence[int]]] = None, general_text: Optional[Sequence[str]] = None,
                  max_length: int = 256) -> dict[str, float]:
    """Accuracy and mean loss for each named set, plus general-text perplexity for causal LMs.

    Accuracy is answer accuracy for prompt/response sets, classification accuracy for labelled
    sets; sets of plain text get only their loss.
    """
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    pad = pad_token_id(tokenizer)
    for name, examples in sets.items():
        if not examples:
            continue
        if task == "classification" and labels and name in labels:
            hits = classification_hits(model, tokenizer, examples, labels[name])
            metrics[f"{name}_accuracy"] = sum(hits) / len(hits)
            continue
        if examples[0].prompt is not None:
            hits = answer_hits(model, tokenizer, examples)
            metrics[f"{name}_accuracy"] = sum(hits) / len(hits)
        rows = encode(examples, tokenizer, task, forget=False, name=name, model_config=model.config,
                      max_length=max_length)
        metrics[f"{name}_loss"] = mean_loss(model, task, rows, pad)
    if general_text and task == "causal":
        metrics["general_perplexity"] = perplexity(model, tokenizer, general_text, max_length)
    model.train(was_training)
    return metrics
