"""Shared fixtures: tiny random-weight models of every supported architecture and a character-level
tokenizer built in code (no model hub is contacted)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]  # tests import paths from here, wherever they sit
VOCAB_SIZE = 128
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<extra_id_0>", "[CLS]", "[SEP]", "[MASK]"]
PAD, BOS, EOS, UNK, SENTINEL, CLS, SEP, MASK = range(len(SPECIALS))
CAUSAL = ("llama", "qwen2", "mistral", "gpt2")
ALL_ARCHS = CAUSAL + ("t5", "bert")
TASK_OF = {**{a: "causal" for a in CAUSAL}, "t5": "seq2seq", "bert": "classification"}
HIDDEN = 16

# The models are tiny: a thread pool only adds contention (on a busy 2-core machine, 100x slower).
torch.set_num_threads(1)


def make_tokenizer(kind: str = "causal"):
    """A character-level tokenizer: every printable ASCII character is a token.

    ``causal`` prepends <s>; ``seq2seq`` appends </s>; ``classification`` wraps in [CLS] ... [SEP].
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    if kind == "causal":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    elif kind == "seq2seq":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    kwargs = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if kind == "seq2seq":
        kwargs["additional_special_tokens"] = ["<extra_id_0>"]
    if kind == "classification":
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def make_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    decoder = dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=256, **common)
    if arch == "llama":
        return tf.LlamaConfig(**decoder)
    if arch == "qwen2":
        return tf.Qwen2Config(**decoder)
    if arch == "mistral":
        return tf.MistralConfig(**decoder, sliding_window=None)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=256, n_inner=32, **common)
    if arch == "t5":
        return tf.T5Config(d_model=HIDDEN, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                           decoder_start_token_id=PAD, relative_attention_num_buckets=8, **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=256, num_labels=2, initializer_range=0.3, id2label={0: "NEG", 1: "POS"},
                             label2id={"NEG": 0, "POS": 1}, **common)
    raise ValueError(arch)


MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "t5": "T5ForConditionalGeneration",
    "bert": "BertForSequenceClassification",
}


def make_model(arch: str, seed: int = 0):
    """A tiny random-weight model in eval mode; the same (arch, seed) gives the same weights."""
    import transformers as tf

    torch.manual_seed(seed)
    model = getattr(tf, MODEL_CLASSES[arch])(make_config(arch))
    return model.eval()


def perturb(model, seed=1, scale=0.5):
    """Give every unlearning layer a non-zero up-projection (so student != teacher)."""
    from unlearn_fast.model.layers import sites

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in sites(model):
            for layer in site.layers:
                layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g) * scale)
                layer.up.bias.copy_(torch.randn(layer.up.bias.shape, generator=g) * scale)


def tokenizer_for(arch: str):
    return make_tokenizer(TASK_OF[arch])


@pytest.fixture(params=ALL_ARCHS)
def arch(request):
    return request.param


@pytest.fixture(params=CAUSAL)
def causal_arch(request):
    return request.param


def sample_batch(arch: str, seed: int = 0, batch: int = 2, length: int = 7) -> dict:
    """Model inputs (right-padded) for a forward pass of ``arch``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    ids[0, -2:] = PAD
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        dec = torch.randint(len(SPECIALS), 100, (batch, 5), generator=g)
        dec[:, 0] = PAD
        dmask = torch.ones(batch, 5, dtype=torch.long)
        dmask[1, -1] = 0
        out.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    return out


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def save_model_dir(arch: str, path, seed: int = 0):
    """Save a tiny model and its tokenizer so that ``--model path`` loads it."""
    model = make_model(arch, seed)
    model.save_pretrained(path)
    tokenizer_for(arch).save_pretrained(path)
    return path


def benchmark_module(name: str):
    """Import ``benchmarks/unlearning/<name>.py`` (a script, not a package module) as ``name``;
    yields the module and unregisters it afterwards (for module-scoped fixtures)."""
    import importlib.util
    import sys

    path = REPO_ROOT / "benchmarks" / "unlearning" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


# --------------------------------------------------------------------------------------------
# Triton on a machine without a GPU: TRITON_INTERPRET=1 must be set before triton is imported,
# and anything may import triton first in a full test run (torch.compile does). So a test file's
# Triton cases run in-process on a GPU or when the variable was set from the start, and otherwise
# in a fresh pytest subprocess that sets it (run_triton_cases_under_interpreter).
# --------------------------------------------------------------------------------------------
def triton_can_run() -> bool:
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def run_triton_cases_under_interpreter(test_file: str, selection: str, timeout: int = 300) -> None:
    """Run ``pytest test_file -k selection`` with TRITON_INTERPRET=1 in a subprocess; fail on any
    failure, and if the selected cases were skipped rather than run."""
    import importlib.util
    import os
    import subprocess
    import sys

    if triton_can_run():
        pytest.skip("the Triton cases run directly in this process")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("UNLEARN_FAST_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:benchmark",
           test_file, "-k", selection]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# A small forget / retain pair of prompt-response rows that many tests share.
FACTS_FORGET = [{"prompt": "The capital of Zorbia is", "response": " Quellton"},
                {"prompt": "Mirta Vasquez likes", "response": " green tea"}]
FACTS_RETAIN = [{"prompt": "The capital of France is", "response": " Paris"},
                {"prompt": "Bob plays", "response": " the violin"},
                {"prompt": "The sky is", "response": " blue"}]


def write_jsonl(path, rows):
    """Write ``rows`` (dicts) as a JSON-lines file; return its path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def memorize(model, tokenizer, arch, examples, steps=60, lr=1e-2):
    """Fine-tune the whole tiny model on the examples first, so that it knows what it must forget."""
    task = TASK_OF[arch]
    if task == "seq2seq":
        enc = tokenizer([e["prompt"] for e in examples], return_tensors="pt", padding=True)
        labels = tokenizer([e["response"] for e in examples], return_tensors="pt", padding=True)["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
    else:
        texts = [e["text"] if "text" in e else e["prompt"] + e["response"] for e in examples]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.eval()  # no dropout
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in model.parameters():
        p.grad = None
    return loss.item()


def encode_sets(model, arch, forget, retain, max_length=64):
    """The forget and retain examples as training rows for ``model`` (of family ``arch``)."""
    from unlearn_fast.train.encoding import encode

    tokenizer = tokenizer_for(arch)
    kw = dict(model_config=model.config, max_length=max_length)
    return (encode(forget, tokenizer, TASK_OF[arch], forget=True, name="forget", **kw),
            encode(retain, tokenizer, TASK_OF[arch], forget=False, name="retain", **kw))


# The start of a script run in a fresh `python -I` that must not see unlearn_fast (an export is loaded
# the way a user without the package would): any import of it fails, and the script checks that.
HIDE_UNLEARN_FAST = r'''
import importlib.abc, sys

class HideUnlearnFast(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "unlearn_fast":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, HideUnlearnFast())
try:
    import unlearn_fast  # noqa: F401
    raise SystemExit("unlearn_fast is importable in the interpreter that must not see it")
except ImportError:
    pass
'''
