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

Chat templates (causal LMs, ``prompt`` + ``response`` rows): with ``chat_template="auto"`` (the default)
and a tokenizer that has a chat template, a row is the conversation user turn = prompt, assistant
turn = response, exactly as ``tokenizer.apply_chat_template`` writes and tokenises it; the targets are
the answer's tokens only (:func:`chat_ids`). Generation (evaluation) starts from the same template with
the generation prompt (:func:`chat_prompt`), i.e. from the tokens that precede the answer in training.
``"none"``: raw prompt + response, as without a template. ``text`` rows are never templated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import DataError, UnlearnFastError
from ..model.family import context_length
from ..ops.loss_head import IGNORE_INDEX
from .data import Example

MASKED_WORD_PREFIX = "Predict the masked word: "
CHAT_TEMPLATE_MODES = ("auto", "none")  # --chat-template: use the tokenizer's template if it has one / never


@dataclass
class Row:
    input_ids: list[int]
    targets: list[int]
    kl_mask: list[bool]
    forget: bool
    decoder_input_ids: Optional[list[int]] = None
    truncated: bool = False  # the example had more tokens than the max length (not part of the row's data)
    # a forgotten row's mean target loss (nats per token) at which its forget terms stop
    # (forget_target="matched"; see unlearn_fast.train.objective.matched_targets); None: no row target
    loss_target: Optional[float] = None


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _join(prompt: str, response: str) -> tuple[str, str]:
    """Put one space between prompt and response unless either side already has one."""
    if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
        response = " " + response
    return prompt, response


def check_chat_template_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`CHAT_TEMPLATE_MODES`, else a one-line error."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise UnlearnFastError(f"chat template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    return mode


def uses_chat_template(tokenizer, mode: str = "auto") -> bool:
    """Are prompt/response rows encoded through the tokenizer's chat template? ``auto``: when it has one."""
    return check_chat_template_mode(mode) == "auto" and bool(getattr(tokenizer, "chat_template", None))


def chat_template_record(tokenizer, mode: str, task: str) -> dict:
    """What a manifest records of the encoding: ``mode`` as asked and whether prompt/response rows went
    through the tokenizer's chat template (``applied``; only causal LMs use one)."""
    return {"mode": mode, "applied": task == "causal" and uses_chat_template(tokenizer, mode)}


def mode_of_record(record) -> Optional[str]:
    """The ``mode`` that encodes rows as a manifest's :func:`chat_template_record` says they were:
    ``auto`` where the template was applied, ``none`` where not (and for a manifest written before chat
    templates, which has no record: its rows were raw); None when the record is unreadable."""
    if record is None:
        return "none"
    if isinstance(record, dict) and isinstance(record.get("applied"), bool):
        return "auto" if record["applied"] else "none"
    return None


def chat_conversation(prompt: str, response: Optional[str] = None) -> list[dict]:
    """The conversation a prompt/response row is: user turn = prompt, assistant turn = response (None:
    the user turn alone). Both are stripped: surrounding whitespace separates prompt and response in a
    raw row (" Paris" after "The capital of France is"), and means nothing inside a turn."""
    turns = [{"role": "user", "content": prompt.strip()}]
    return turns if response is None else turns + [{"role": "assistant", "content": response.strip()}]


def _render(tokenizer, conversation: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a Jinja error, or a template that refuses these roles
        raise ValueError(f"the chat template cannot write this conversation: {err}") from None


def chat_prompt(tokenizer, prompt: str) -> str:
    """The text a model generates the answer to ``prompt`` after: the chat template of the user turn with
    the generation prompt (``add_generation_prompt=True``). Tokenise it without special tokens (the
    template writes its own)."""
    return _render(tokenizer, chat_conversation(prompt), True)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], int, int]:
    """(ids, start, end): the conversation user = ``prompt``, assistant = ``response``
    (:func:`chat_conversation`) as ``tokenizer.apply_chat_template`` tokenises it, and the answer's
    tokens ``ids[start:end]``.

    The answer is found in the text, after the generation prompt (the template must write the user turn
    with the generation prompt as the start of the whole conversation, or training and generation would
    see different prompts), and mapped to the tokens that overlap it: a token that runs over the answer's
    edge counts as the answer's.

    The template's closing tokens after the answer (``<|im_end|>``, a newline, an end-of-sequence token)
    are inputs, not targets. They say that the turn ended, not what the answer was: pushing them away on
    a forgotten row would teach the model not to end its turn, on any subject; and the answer loss that
    evaluation reports then measures the same tokens with and without a template. Retained rows keep
    them under the KL term (it covers every position of a retained row), so the model still ends its
    turns as the teacher does.
    """
    text = _render(tokenizer, chat_conversation(prompt, response), False)
    head = chat_prompt(tokenizer, prompt)
    if not text.startswith(head):
        raise ValueError("the chat template does not start the conversation with the user turn and generation "
                         "prompt it generates from (use chat template 'none')")
    answer = response.strip()
    first = text.find(answer, len(head))
    if not answer or first < 0:
        raise ValueError("the chat template does not write the response as given (use chat template 'none')")
    ids = _ids(tokenizer, text, special=False)
    start = _common_prefix(_ids(tokenizer, text[:first], special=False), ids)
    upto = _ids(tokenizer, text[:first + len(answer)], special=False)
    end = _common_prefix(upto, ids)
    if end < len(upto):  # the answer's last token is merged with the text after it
        end += 1
    return ids, start, end


def _causal(example: Example, tokenizer, forget: bool, max_length: int, chat: bool = False) -> Row:
    end = None  # where the targets stop (None: at the end of the row)
    if example.text is not None:
        full = _ids(tokenizer, example.text)
        first_target = 1
    elif chat:
        full, first_target, end = chat_ids(tokenizer, example.prompt, example.response)
    else:
        prompt, response = _join(example.prompt, example.response)
        p = _ids(tokenizer, prompt)
        full = p + _ids(tokenizer, response, special=False)
        first_target = len(p)
    ids = full[:max_length]
    n = len(ids)
    stop = n if end is None else min(end, n)
    if first_target >= n and len(full) > n:
        raise ValueError(f"the prompt alone fills the max length of {max_length} tokens")
    if n < 2 or first_target >= stop:
        raise ValueError("no target tokens")
    targets = [ids[t + 1] if first_target <= t + 1 < stop else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
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
           model_config=None, labels: Optional[Sequence[int]] = None, max_length: int = 256,
           chat_template: str = "auto") -> list[Row]:
    """Rows for every example of one set; a row that tokenises to nothing is a DataError.

    Rows are cut at ``max_length`` tokens, itself capped at the model's context as ``model_config``
    and the tokenizer tell it (:func:`fit_max_length`); a cut row has ``truncated`` set.
    ``chat_template`` (causal LMs, prompt/response rows): ``auto`` encodes them through the tokenizer's
    chat template where it has one (:func:`chat_ids`), ``none`` as raw prompt + response.
    """
    max_length = fit_max_length(max_length, model_config, tokenizer)
    chat = task == "causal" and uses_chat_template(tokenizer, chat_template)
    rows: list[Row] = []
    for i, example in enumerate(examples):
        try:
            if task == "causal":
                rows.append(_causal(example, tokenizer, forget, max_length, chat))
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
    """Right-padded batch tensors: inputs, attention masks, targets, KL mask, forget flags (and the
    rows' loss targets where any row has one)."""
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
    if any(r.loss_target is not None for r in rows):  # no target (a retained row): never reached
        batch["loss_target"] = torch.tensor([math.inf if r.loss_target is None else r.loss_target for r in rows],
                                            dtype=torch.float64)
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
