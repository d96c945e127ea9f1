"""Tokenisation of examples into training rows, and batching.

A row is one forward pass: model inputs plus, per output position, a target id (or
``IGNORE_INDEX``) and whether the KL term applies there. The objective turns a row's role
(retained or forgotten) into coefficients: α / λ on retained rows, −1 / −γ on forgotten ones.

Which positions carry which term:
- causal LM, ``text``: every next-token position (task loss / LM loss over the whole text).
- causal LM, ``prompt`` + ``response``: targets on the response tokens; the KL term on every
  position for retained rows, on the response positions only for forgotten rows (pushing the
  shared prompt prefix away from the teacher would damage retained prompts).
- seq2seq (T5): the decoder is teacher-forced on the response. A plain ``text`` example, and the
  LM term of a forgotten example, use the paper's masked-word view: "Predict the masked word: …"
  with one word replaced by a sentinel, the target being that word.
- classification: one output position, the label (no LM term: there is no LM head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import DataError
from ..model.family import context_length
from ..ops.loss_head import IGNORE_INDEX
from .data import Example

MASKED_WORD_PREFIX = "Predict the masked word: "


@dataclass
class Row:
    input_ids: list[int]
    targets: list[int]
    kl_mask: list[bool]
    forget: bool
    decoder_input_ids: Optional[list[int]] = None
    truncated: bool = False  # the example had more tokens than the max length (not part of the row's data)


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _join(prompt: str, response: str) -> tuple[str, str]:
    """Put one space between prompt and response unless either side already has one."""
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        response = " " + response
    return prompt, response


def _causal(example: Example, tokenizer, forget: bool, max_length: int) -> Row:
    if example.text is not None:
        full = _ids(tokenizer, example.text)
        first_target = 1
    else:
        prompt, response = _join(example.prompt, example.response)
        p = _ids(tokenizer, prompt)
        full = p + _ids(tokenizer, response, special=False)
        first_target = len(p)
    ids = full[:max_length]
    n = len(ids)
    if first_target >= n and len(full) > n:
        raise ValueError(f"the prompt alone fills the max length of {max_length} tokens")
    if n < 2 or first_target >= n:
        raise ValueError("no target tokens")
    targets = [ids[t + 1] if t + 1 >= first_target else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
    if forget:
        kl_mask = [tgt != IGNORE_INDEX for tgt in targets]
    else:
        kl_mask = [t < n - 1 for t in range(n)]
    return Row(ids, targets, kl_mask, forget, truncated=len(full) > n)


def _masked_word(text: str, tokenizer) -> tuple[str, str]:
    """Mask the longest word (a deterministic stand-in for the entity the text is about)."""
    words = list(re.finditer(r"[^\W\d_]+", text))
    if not words:
        raise ValueError("no word to mask")
    word = max(words, key=lambda m: (len(m.group()), -m.start()))
    sentinel = "<extra_id_0>" if "<extra_id_0>" in tokenizer.get_vocab() else tokenizer.mask_token
    if sentinel is None:
        raise ValueError("the tokenizer has no sentinel or mask token")
    masked = text[: word.start()] + sentinel + text[word.end():]
    return MASKED_WORD_PREFIX + masked, f"{sentinel} {word.group()}"


def _seq2seq_row(source: str, target: str, tokenizer, model_config, forget: bool, kl: bool, ce: bool,
                 max_length: int) -> Row:
    full_inputs, full_labels = _ids(tokenizer, source), _ids(tokenizer, target)
    inputs, labels = full_inputs[:max_length], full_labels[:max_length]
    if not inputs or not labels:
        raise ValueError("no tokens")
    start = model_config.decoder_start_token_id
    start = model_config.pad_token_id if start is None else start
    targets = labels if ce else [IGNORE_INDEX] * len(labels)
    return Row(inputs, targets, [kl] * len(labels), forget, [start] + labels[:-1],
               truncated=len(full_inputs) > max_length or len(full_labels) > max_length)


def _seq2seq(example: Example, tokenizer, model_config, forget: bool, max_length: int) -> list[Row]:
    if example.text is not None:
        source, target = _masked_word(example.text, tokenizer)
        return [_seq2seq_row(source, target, tokenizer, model_config, forget, True, True, max_length)]
    rows = [_seq2seq_row(example.prompt, example.response, tokenizer, model_config, forget, True,
                         not forget, max_length)]
    if forget:  # the LM term of a forgotten example is the masked-word loss on its whole text
        source, target = _masked_word(" ".join(_join(example.prompt, example.response)), tokenizer)
        rows.append(_seq2seq_row(source, target, tokenizer, model_config, forget, False, True, max_length))
    return rows


def _classification(example: Example, label: Optional[int], tokenizer, forget: bool, max_length: int) -> Row:
    text = example.text if example.text is not None else f"{example.prompt} {example.response}"
    full = _ids(tokenizer, text)
    ids = full[:max_length]
    if not ids:
        raise ValueError("no tokens")
    # a forgotten row keeps its label: there is no LM term (γ = 0), but the sharpening guard uses it
    target = IGNORE_INDEX if label is None else label
    return Row(ids, [target], [True], forget, truncated=len(full) > max_length)


def encode(examples: Sequence[Example], tokenizer, task: str, *, forget: bool, name: str,
           model_config=None, labels: Optional[Sequence[int]] = None, max_length: int = 256) -> list[Row]:
    """Rows for every example of one set; a row that tokenises to nothing is a DataError.

    Rows are cut at ``max_length`` tokens, itself capped at the model's context as ``model_config``
    and the tokenizer tell it (:func:`fit_max_length`); a cut row has ``truncated`` set.
    """
    max_length = fit_max_length(max_length, model_config, tokenizer)
    rows: list[Row] = []
    for i, example in enumerate(examples):
        try:
            if task == "causal":
                rows.append(_causal(example, tokenizer, forget, max_length))
            elif task == "seq2seq":
                rows.extend(_seq2seq(example, tokenizer, model_config, forget, max_length))
            else:
                rows.append(_classification(example, None if labels is None else labels[i], tokenizer,
                                            forget, max_length))
        except ValueError as err:
            raise DataError(f"{name}: row {i + 1} tokenises to nothing usable ({err}): "
                            f"{str(example.to_dict())[:80]}") from None
    return rows


def fit_max_length(max_length: int, model_config=None, tokenizer=None) -> int:
    """``max_length`` capped at the model's context (:func:`unlearn_fast.model.family.context_length`).

    Every path that encodes rows for a model goes through here (training, evaluation, baselines):
    a row longer than the position table would fail deep in the forward pass with an IndexError.
    """
    if max_length < 1:
        raise DataError(f"max length must be at least 1 token, got {max_length}")
    limit = context_length(model_config, tokenizer)
    return max_length if limit is None else min(max_length, limit)


def truncation_note(sets: dict[str, Sequence[Row]], max_length: int, model_config=None,
                    tokenizer=None) -> Optional[str]:
    """One line saying how many rows of each named set were cut, and at what length (None: none was).

    ``max_length`` is the length asked for; the line says when the model's context cut it shorter.
    """
    counts = {name: sum(r.truncated for r in rows) for name, rows in sets.items()}
    if not any(counts.values()):
        return None
    used = fit_max_length(max_length, model_config, tokenizer)
    why = f"the model's context; max length {max_length} is longer" if used < max_length else "the max length"
    shown = ", ".join(f"{n} of {len(sets[name])} {name} rows" for name, n in counts.items() if n)
    return f"truncated to {used} tokens ({why}): {shown}"


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors: inputs, attention masks, targets, KL mask, forget flags."""
    def pad(seqs, value):
        width = max(len(s) for s in seqs)
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs])

    batch = {
        "input_ids": pad([r.input_ids for r in rows], pad_id),
        "attention_mask": pad([[1] * len(r.input_ids) for r in rows], 0),
        "targets": pad([r.targets for r in rows], IGNORE_INDEX),
        "kl_mask": pad([r.kl_mask for r in rows], False).bool(),
        "forget": torch.tensor([r.forget for r in rows], dtype=torch.bool),
    }
    if rows[0].decoder_input_ids is not None:
        batch["decoder_input_ids"] = pad([r.decoder_input_ids for r in rows], pad_id)
        batch["decoder_attention_mask"] = pad([[1] * len(r.decoder_input_ids) for r in rows], 0)
    return batch


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def token_count(batch: dict) -> int:
    n = int(batch["attention_mask"].sum())
    if "decoder_attention_mask" in batch:
        n += int(batch["decoder_attention_mask"].sum())
    return n
