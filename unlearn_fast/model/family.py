"""What the objective needs from each kind of transformers model: its task, the hidden states
that feed its output head, and that head.

Three tasks: ``causal`` (decoder-only LMs: Llama, Qwen2, Mistral, SmolLM, GPT-2), ``seq2seq``
(T5: the encoder reads the input, the decoder is teacher-forced on the target) and
``classification`` (encoders with a sequence-classification head, e.g. BERT). For causal and
seq2seq models the loss head is the LM head, applied by the fused op to the final hidden states
so that full-vocabulary logits never exist. A classification head is small, so its logits are
taken as "hidden states" and the head is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import ModelError

TASKS = ("causal", "seq2seq", "classification")


def detect_task(model: nn.Module) -> str:
    """The task a model serves, read from its structure and config."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{model.__class__.__name__} is not a transformers model (it has no .config)")
    name = model.__class__.__name__
    if "SequenceClassification" in name or (hasattr(model, "classifier") and not hasattr(model, "lm_head")):
        return "classification"
    if getattr(config, "is_encoder_decoder", False):
        if model.get_output_embeddings() is None:
            raise ModelError(f"{name}: an encoder-decoder model needs an LM head (use a *ForConditionalGeneration class)")
        return "seq2seq"
    if model.get_output_embeddings() is not None:
        return "causal"
    raise ModelError(f"{name}: no LM head and no classification head found; "
                     "load the model with AutoModelForCausalLM, AutoModelForSeq2SeqLM or "
                     "AutoModelForSequenceClassification")


# config fields that bound the input length (learned position tables; absent for T5's relative positions)
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# RoBERTa-style models number positions from pad_token_id + 1: that many table rows are never usable
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer")
# transformers stores int(1e30) (or 1e20) in model_max_length when a tokenizer knows no limit
SANE_TOKENIZER_LIMIT = 10 ** 8


def context_length(config, tokenizer=None) -> Optional[int]:
    """The most tokens the model takes in one input, or None when nothing bounds it.

    The smallest of the config's position-table sizes (:data:`POSITION_LIMITS`) and the tokenizer's
    ``model_max_length`` when that is a real number (below :data:`SANE_TOKENIZER_LIMIT`). A longer
    input would index past the position table (``IndexError: index out of range in self``).
    """
    limits = []
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            limits.append(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < SANE_TOKENIZER_LIMIT:
        limits.append(model_max)
    return min(limits) if limits else None


def has_lm_head(model: nn.Module) -> bool:
    return detect_task(model) in ("causal", "seq2seq")


@dataclass
class Head:
    """The frozen output head as the loss head op takes it."""

    weight: Tensor
    bias: Optional[Tensor] = None
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None


def output_head(model: nn.Module, task: str) -> Head:
    if task == "classification":
        n = model.config.num_labels
        device = next(model.parameters()).device
        return Head(torch.eye(n, device=device, dtype=torch.float32))
    emb = model.get_output_embeddings()
    config = model.config
    if not emb.weight.is_floating_point():  # e.g. a bitsandbytes Linear8bitLt / Linear4bit: no [V, d] matrix
        raise ModelError(f"{model.__class__.__name__}: the output head is quantised ({type(emb).__name__}, "
                         f"{emb.weight.dtype}); the loss head reads it as a float matrix: load the base with the "
                         "head left unquantised (load_model(..., dtype='nf4') does)")
    return Head(emb.weight, getattr(emb, "bias", None),
                float(getattr(config, "logit_scale", None) or 1.0),
                getattr(config, "final_logit_softcapping", None))


def backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None:
        raise ModelError(f"{model.__class__.__name__}: no backbone at .{model.base_model_prefix}")
    return backbone


def output_states(model: nn.Module, task: str, batch: dict) -> Tensor:
    """[B, T_out, H] states whose product with the head gives the model's logits.

    causal: the backbone's last hidden state (final norm applied); seq2seq: the decoder's last
    hidden state, scaled as T5 scales it before a tied head; classification: the logits.
    """
    if task == "causal":
        return backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    if task == "seq2seq":
        encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        decoded = model.get_decoder()(input_ids=batch["decoder_input_ids"],
                                      attention_mask=batch["decoder_attention_mask"],
                                      encoder_hidden_states=encoded.last_hidden_state,
                                      encoder_attention_mask=batch["attention_mask"],
                                      use_cache=False).last_hidden_state
        config = model.config
        if getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", False)):
            decoded = decoded * (config.d_model ** -0.5)
        return decoded
    if task == "classification":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.unsqueeze(1)
    raise ModelError(f"unknown task {task!r}")


def output_mask(task: str, batch: dict) -> Tensor:
    """[B, T_out] bool: which output positions are real tokens (for Gram statistics)."""
    if task == "seq2seq":
        return batch["decoder_attention_mask"].bool()
    return batch["attention_mask"].bool()
