"""Unlearning layers: where they attach, student == teacher at init, teacher switch, frozen base,
detach, generate() — on a tiny random-weight model of every supported architecture."""

import pytest
import torch
from torch import nn

from conftest import ALL_ARCHS, CAUSAL, HIDDEN, PAD, logits_of, make_model, perturb, sample_batch
from unlearn_fast.errors import ModelError
from unlearn_fast.model.layers import (
    LayerConfig,
    UnlearningSite,
    attach,
    detach,
    layers_disabled,
    set_enabled,
    sites,
    unlearning_parameters,
)

# (stack, block, path) of every feed-forward sublayer of the tiny 2-block models.
EXPECTED_SITES = {
    "llama": [("blocks", 0, "model.layers.0.mlp"), ("blocks", 1, "model.layers.1.mlp")],
    "qwen2": [("blocks", 0, "model.layers.0.mlp"), ("blocks", 1, "model.layers.1.mlp")],
    "mistral": [("blocks", 0, "model.layers.0.mlp"), ("blocks", 1, "model.layers.1.mlp")],
    "gpt2": [("blocks", 0, "transformer.h.0.mlp"), ("blocks", 1, "transformer.h.1.mlp")],
    "t5": [("encoder", 0, "encoder.block.0.layer.1.DenseReluDense"),
           ("encoder", 1, "encoder.block.1.layer.1.DenseReluDense"),
           ("decoder", 0, "decoder.block.0.layer.2.DenseReluDense"),
           ("decoder", 1, "decoder.block.1.layer.2.DenseReluDense")],
    "bert": [("blocks", 0, "bert.encoder.layer.0.output.dense"),
             ("blocks", 1, "bert.encoder.layer.1.output.dense")],
}
# The class of the module each site wraps.
WRAPPED = {"llama": "LlamaMLP", "qwen2": "Qwen2MLP", "mistral": "MistralMLP", "gpt2": "GPT2MLP",
           "t5": "T5DenseActDense", "bert": "Linear"}


def where(model):
    return [(s.stack, s.block, s.path) for s in sites(model)]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_one_site_per_block(arch):
    model = make_model(arch)
    originals = {path: model.get_submodule(path) for _, _, path in EXPECTED_SITES[arch]}
    added = attach(model, LayerConfig(rank=4))
    assert where(model) == EXPECTED_SITES[arch]
    assert [s.path for s in added] == [p for _, _, p in EXPECTED_SITES[arch]]
    for site in sites(model):
        assert model.get_submodule(site.path) is site
        assert site.base is originals[site.path]
        assert site.base.__class__.__name__ == WRAPPED[arch]
        assert site.dim == HIDDEN
        assert len(site.layers) == 1
        layer = site.layers[0]
        assert tuple(layer.down.weight.shape) == (4, HIDDEN)
        assert tuple(layer.up.weight.shape) == (HIDDEN, 4)
        assert torch.count_nonzero(layer.up.weight) == 0 and torch.count_nonzero(layer.up.bias) == 0


def test_rank_from_reduction_factor():
    model = make_model("llama")
    attach(model, LayerConfig(reduction_factor=4))
    assert [s.layers[0].down.out_features for s in sites(model)] == [HIDDEN // 4] * 2


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_top_block_only(arch):
    model = make_model(arch)
    attach(model, LayerConfig(rank=2, blocks=1))
    expected = [s for s in EXPECTED_SITES[arch] if s[1] == 1]  # the top block of each stack
    assert where(model) == expected
    assert len(expected) == (2 if arch == "t5" else 1)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("blocks", [[0], [1, 0], (1,)])
def test_block_list(arch, blocks):
    model = make_model(arch)
    attach(model, LayerConfig(rank=2, blocks=blocks))
    expected = [s for s in EXPECTED_SITES[arch] if s[1] in set(blocks)]
    assert where(model) == expected


@pytest.mark.parametrize("blocks", [0, 3, [2], [-1], []])
def test_bad_block_selection(blocks):
    model = make_model("llama")
    with pytest.raises(ModelError):
        attach(model, LayerConfig(rank=2, blocks=blocks))


def test_second_attach_adds_a_layer_to_each_site():
    model = make_model("llama")
    attach(model, LayerConfig(rank=2))
    attach(model, LayerConfig(rank=3))
    assert len(sites(model)) == 2
    assert [[l.down.out_features for l in s.layers] for s in sites(model)] == [[2, 3], [2, 3]]


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = object()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), _NoBlocks()],
                         ids=["sequential", "modulelist-of-linears"])
def test_unsupported_model_raises_model_error(model):
    with pytest.raises(ModelError) as info:
        attach(model, LayerConfig(rank=2))
    message = str(info.value)
    assert model.__class__.__name__ in message
    for looked_for in (".mlp", "DenseReluDense", ".intermediate", ".output.dense"):
        assert looked_for in message
    assert sites(model) == []


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_student_equals_teacher_at_init(arch):
    model = make_model(arch)
    batch = sample_batch(arch)
    base = logits_of(model, batch)
    attach(model, LayerConfig(rank=4))
    student = logits_of(model, batch)
    with layers_disabled(model):
        teacher = logits_of(model, batch)
    assert torch.equal(student, base)
    assert torch.equal(teacher, base)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_perturbed_layers_change_outputs_and_disabling_restores_teacher(arch):
    model = make_model(arch)
    batch = sample_batch(arch)
    base = logits_of(model, batch)
    attach(model, LayerConfig(rank=4))
    perturb(model)
    student = logits_of(model, batch)
    assert (student - base).abs().max() > 1e-3
    with layers_disabled(model):
        assert all(not s.enabled for s in sites(model))
        assert torch.equal(logits_of(model, batch), base)
    assert all(s.enabled for s in sites(model))
    assert torch.equal(logits_of(model, batch), student)  # the switch is undone on exit
    set_enabled(model, False)
    assert torch.equal(logits_of(model, batch), base)
    set_enabled(model, True)
    assert torch.equal(logits_of(model, batch), student)


def test_layers_disabled_restores_state_after_an_exception():
    model = make_model("llama")
    attach(model, LayerConfig(rank=2))
    with pytest.raises(RuntimeError):
        with layers_disabled(model):
            raise RuntimeError("boom")
    assert all(s.enabled for s in sites(model))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_only_unlearning_parameters_get_gradients(arch):
    model = make_model(arch)
    base_params = dict(model.named_parameters())
    attach(model, LayerConfig(rank=4))
    perturb(model)
    params = unlearning_parameters(model)
    assert len(params) == 4 * len(EXPECTED_SITES[arch])
    ids = {id(p) for p in params}
    assert not ids & {id(p) for p in base_params.values()}
    model(**sample_batch(arch)).logits.square().sum().backward()
    for name, p in model.named_parameters():
        if id(p) in ids:
            assert p.requires_grad, name
            assert p.grad is not None, name
        else:
            assert not p.requires_grad, name
            assert p.grad is None, name
    for p in base_params.values():
        assert not p.requires_grad and p.grad is None
    for site in sites(model):
        assert torch.count_nonzero(site.layers[0].up.weight.grad) > 0, site.path


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_detach_restores_the_module_tree(arch):
    model = make_model(arch)
    batch = sample_batch(arch)
    base = logits_of(model, batch)
    tree = [(name, type(m), id(m)) for name, m in model.named_modules()]
    keys = list(model.state_dict())
    attach(model, LayerConfig(rank=4))
    attach(model, LayerConfig(rank=2))
    perturb(model)
    assert any(isinstance(m, UnlearningSite) for m in model.modules())
    detach(model)
    assert sites(model) == []
    assert [(name, type(m), id(m)) for name, m in model.named_modules()] == tree
    assert list(model.state_dict()) == keys
    assert torch.equal(logits_of(model, batch), base)


def _generate(model, arch, **kwargs):
    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 52, 53]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                              do_sample=False, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("arch", list(CAUSAL) + ["t5"])
def test_generate_with_layers_attached(arch):
    model = make_model(arch)
    base = _generate(model, arch)
    attach(model, LayerConfig(rank=4))
    assert torch.equal(_generate(model, arch), base)  # zero up-projection: the same greedy tokens
    perturb(model, scale=2.0)
    calls = []
    handles = [s.register_forward_hook(lambda m, a, out: calls.append(m.enabled)) for s in sites(model)]
    student = _generate(model, arch)
    assert student.shape == base.shape and calls and all(calls)  # the layers ran in every step
    calls.clear()
    with layers_disabled(model):
        assert torch.equal(_generate(model, arch), base)
    assert calls and not any(calls)
    for h in handles:
        h.remove()
