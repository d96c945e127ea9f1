"""Shared by the fusion tests: synthetic requests (random layers and Gram matrices written with
``write_artifact``), an independent float64 least-squares fusion, and real ``unlearn`` artifacts on a
tiny random-weight Llama (hidden size 32)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import BOS, EOS, PAD, VOCAB_SIZE, make_tokenizer

from unlearn_fast.api import unlearn
from unlearn_fast.cli import main
from unlearn_fast.io.artifacts import read_artifact, write_artifact
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.ops.unlearning_layer import ACTIVATIONS
from unlearn_fast.train.trainer import TrainConfig

D, R = 32, 6

SITES = ("model.layers.0.mlp", "model.layers.1.mlp")


# --------------------------------------------------------------------------------------------
# Synthetic artifacts: random layers and the Gram matrices of random forget inputs
# --------------------------------------------------------------------------------------------


def augment(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def make_request(seed, tokens=80, dim=D, rank=R, activation="relu", paths=SITES):
    """(tensors, inputs): one request's layer tensors + Grams, and its forget inputs per site and map."""
    g = torch.Generator().manual_seed(seed)
    tensors, inputs = {}, {}
    for path in paths:
        x = (torch.randn(tokens, dim, generator=g, dtype=torch.float64) * 2 + torch.randn(dim, generator=g, dtype=torch.float64))
        down_w = torch.randn(rank, dim, generator=g) / dim ** 0.5
        down_b = torch.randn(rank, generator=g) * 0.1
        up_w = torch.randn(dim, rank, generator=g) / rank ** 0.5
        up_b = torch.randn(dim, generator=g) * 0.1
        h = ACTIVATIONS[activation](x @ down_w.double().t() + down_b.double())
        key = f"{path}.0"
        tensors.update({f"{key}.down.weight": down_w, f"{key}.down.bias": down_b,
                        f"{key}.up.weight": up_w, f"{key}.up.bias": up_b,
                        f"{key}.down.gram": augment(x).t() @ augment(x), f"{key}.up.gram": augment(h).t() @ augment(h)})
        inputs[f"{key}.down"], inputs[f"{key}.up"] = x, h
    return tensors, inputs


def layout(dim=D, rank=R, activation="relu", paths=SITES):
    return [{"path": p, "stack": "blocks", "block": i, "dim": dim, "ranks": [rank], "activations": [activation]}
            for i, p in enumerate(paths)]


def manifest_for(seed, tokens, fingerprint="base-A", **layout_kwargs):
    return {"base_model": {"name_or_path": "tiny", "class": "LlamaForCausalLM", "fingerprint": fingerprint},
            "task": "causal", "layers": {"config": {"rank": R}, "sites": layout(**layout_kwargs)},
            "forget_set": {"count": seed + 1, "sha256": hashlib.sha256(str(seed).encode()).hexdigest()},
            "grams": {"tokens": tokens, "augmented_with_bias_column": True, "dtype": "float64"}}


def write_request(path, seed, tokens=80, fingerprint="base-A", drop=(), **layout_kwargs):
    tensors, inputs = make_request(seed, tokens, **layout_kwargs)
    tensors = {k: v for k, v in tensors.items() if not any(k.endswith(d) for d in drop)}
    write_artifact(path, tensors, manifest_for(seed, tokens, fingerprint, **layout_kwargs))
    return inputs


def augmented_weight(tensors, key):
    return torch.cat([tensors[f"{key}.weight"].t(), tensors[f"{key}.bias"][None]]).double()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def lstsq_fusion(requests, key):
    """Independent oracle: least squares on the stacked augmented inputs, targets = each layer's outputs."""
    xs = [augment(inputs[key]) for _, inputs in requests]
    ys = [x @ augmented_weight(tensors, key) for x, (tensors, _) in zip(xs, requests)]
    return torch.linalg.lstsq(torch.cat(xs), torch.cat(ys), driver="gelsd").solution


def rel_on_inputs(fused, original, key):
    """‖X(A_f − A)‖ / ‖X·A‖ over the original's forget inputs X, from its Gram matrix alone."""
    gram, a = original[f"{key}.gram"], augmented_weight(original, key)
    delta = augmented_weight(fused, key) - a
    return float(torch.trace(delta.t() @ gram @ delta) / torch.trace(a.t() @ gram @ a)) ** 0.5


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def three(tmp_path):
    """Three synthetic requests written as artifacts a, b, c (full-rank forget inputs)."""
    inputs = {name: write_request(tmp_path / name, seed, tokens=60 + 20 * seed)
              for seed, name in enumerate("abc")}
    return tmp_path, inputs


def assert_same_artifact(a, b, tol=1e-12):
    _, ta = read_artifact(a)
    _, tb = read_artifact(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert rel(ta[k].double(), tb[k].double()) <= tol, k


def tiny_llama(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return tf.LlamaForCausalLM(config).eval()


REQUESTS = [
    [{"prompt": "The capital of Zorbia is", "response": " Quellton"}],
    [{"prompt": "Mirta Vasquez likes", "response": " green tea"}, {"prompt": "Mirta lives in", "response": " Oslo"}],
    [{"prompt": "The code word is", "response": " pumpkin"}],
]
RETAIN = [{"prompt": "The capital of France is", "response": " Paris"},
          {"prompt": "Bob plays", "response": " the violin"}]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    tok = make_tokenizer("causal")
    for i, forget in enumerate(REQUESTS):
        torch.manual_seed(0)  # the same layer initialisation for every request (see fusion docs)
        unlearn(tiny_llama(), tok, forget, RETAIN, out=root / f"req{i}", layers=LayerConfig(rank=4),
                training=TrainConfig(max_steps=2, progress=False), evaluate=False, log=lambda *a: None)
    return root, tok


def logits(model, tok):
    enc = tok(["The capital of Zorbia is", "Bob plays the"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
