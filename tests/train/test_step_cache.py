"""The step cache (teacher states once per row, shared / replayed frozen trunk) and length bucketing."""

import pytest
import torch

from conftest import REPO_ROOT, TASK_OF, make_model, perturb, tokenizer_for
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import encode, pad_token_id
from unlearn_fast.model.layers import LayerConfig, attach
from unlearn_fast.train.objective import EULObjective, ObjectiveConfig
from unlearn_fast.train.step_cache import StepCache
from unlearn_fast.train.batching import padding_fraction, shuffled_groups
from unlearn_fast.train.trainer import TrainConfig, train

FORGET = [Example(prompt=f"Secret {i} is", response=f"code{i * 7}") for i in range(3)]
RETAIN = [Example(prompt=f"Public fact number {i} says", response=f"value {i}") for i in range(9)]


def _rows(arch, tokenizer, model):
    kw = dict(model_config=model.config, max_length=64)
    return (encode(FORGET, tokenizer, TASK_OF[arch], forget=True, name="forget", **kw),
            encode(RETAIN, tokenizer, TASK_OF[arch], forget=False, name="retain", **kw))


def _trajectory(arch, cached: bool, steps=20, blocks=1, backend="auto", compile_blocks=False, model_out=None):
    torch.manual_seed(0)
    model = make_model(arch)
    tokenizer = tokenizer_for(arch)
    forget, retain = _rows(arch, tokenizer, model)
    attach(model, LayerConfig(rank=4, blocks=blocks))
    # Start with student != teacher: at student == teacher the maximised forget KL has a zero gradient
    # that rounding noise (batches composed differently with and without the cache) decides to leave
    # or not, so a classifier without an LM term could sit there in one run and drift off in the other.
    perturb(model, scale=0.05)
    task = TASK_OF[arch]
    cache = StepCache(model, task) if cached else None
    objective = EULObjective(model, task, ObjectiveConfig(gamma=None if task == "classification" else 0.5), cache)
    config = TrainConfig(epochs=50, batch_size=4, lr=1e-2, max_steps=steps, progress=False,
                         teacher_cache=cached, shared_trunk=cached, backend=backend, compile_blocks=compile_blocks)
    if model_out is not None:
        model_out.append(model)
    result = train(model, objective, forget, retain, config, pad_token_id(tokenizer))
    return [h["loss"] for h in result.history], cache


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bert"])
def test_cached_steps_give_the_same_loss_trajectory(arch):
    plain, _ = _trajectory(arch, cached=False)
    fast, cache = _trajectory(arch, cached=True)
    assert len(plain) == len(fast) == 20
    assert cache.teacher, "the teacher cache was never filled"
    for a, b in zip(plain, fast):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (plain, fast)


def test_fast_path_matches_reference_path():
    """Fused ops + step cache against the pure-PyTorch ops without cache: 20 steps, rel ≤ 1e-3."""
    reference, _ = _trajectory("llama", cached=False, backend="reference")
    fast, _ = _trajectory("llama", cached=True, backend="auto")
    for a, b in zip(reference, fast):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (reference, fast)


def test_compiled_blocks_give_the_same_loss_trajectory():
    """TrainConfig.compile_blocks: the blocks run through torch.compile, same losses, restored after."""
    plain, _ = _trajectory("llama", cached=True, steps=4)
    models = []
    compiled, _ = _trajectory("llama", cached=True, steps=4, compile_blocks=True, model_out=models)
    for a, b in zip(plain, compiled):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (plain, compiled)
    blocks = models[0].model.layers
    assert all("forward" not in vars(block) for block in blocks), "compiled forwards left behind"
    from unlearn_fast.train.trainer import compiled_blocks

    with compiled_blocks(models[0]):
        assert all(hasattr(vars(block).get("forward"), "_torchdynamo_orig_callable") for block in blocks)


def test_trunk_below_lowest_layer_runs_once_per_row():
    """With layers on the top block only, block 0 runs in the first pass over the rows, never again."""
    torch.manual_seed(0)
    model = make_model("llama")
    tokenizer = tokenizer_for("llama")
    forget, retain = _rows("llama", tokenizer, model)
    attach(model, LayerConfig(rank=4, blocks=1))
    calls = []
    block0 = model.model.layers[0]
    block0.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    cache = StepCache(model, "causal")
    assert cache.lowest == 1
    objective = EULObjective(model, "causal", ObjectiveConfig(), cache)
    config = TrainConfig(epochs=3, batch_size=4, progress=False)
    train(model, objective, forget, retain, config, pad_token_id(tokenizer))
    rows_through_block0 = sum(calls)
    # every row through block 0 exactly once (the teacher's pass), whatever the number of epochs
    assert rows_through_block0 == len(forget) + len(retain)


def test_trunk_replay_is_off_when_layers_start_at_block_zero():
    model = make_model("llama")
    attach(model, LayerConfig(rank=4, blocks="all"))
    assert StepCache(model, "causal").blocks is None


def test_bucketing_reduces_padding():
    import random

    from unlearn_fast.train.encoding import Row

    rows = [Row(list(range(n)), [0] * n, [True] * n, False) for n in ([3] * 20 + [40] * 20)]
    plain = shuffled_groups(rows, 4, random.Random(0), bucket=False)
    bucketed = shuffled_groups(rows, 4, random.Random(0), bucket=True)
    assert sorted(map(id, sum(plain, []))) == sorted(map(id, sum(bucketed, [])))
    assert padding_fraction(bucketed) == 0.0
    assert padding_fraction(plain) > 0.3


@pytest.mark.parametrize("schedule", ["mixed", "alternate"])
def test_bucketing_pairs_forget_and_retain_groups_of_similar_length(schedule):
    """In the mixed schedule a step is a retain group plus a forget group: bucketing matches their
    lengths too, and still uses every retain row once and the forget groups as often as without it."""
    from collections import Counter

    from unlearn_fast.train.encoding import Row
    from unlearn_fast.train.batching import batches

    def rows(lengths, forget):
        return [Row(list(range(n)), [0] * n, [True] * n, forget) for n in lengths]

    retain = rows([3] * 16 + [40] * 16, False)
    forget = rows([3] * 4 + [40] * 4, True)
    used = {}
    for bucket in (False, True):
        config = TrainConfig(epochs=2, batch_size=4, schedule=schedule, bucket_by_length=bucket)
        groups = list(batches(forget, retain, config))
        used[bucket] = (groups, Counter(id(r) for g in groups for r in g))
    (plain, plain_uses), (bucketed, bucketed_uses) = used[False], used[True]
    assert padding_fraction(bucketed) == 0.0
    assert padding_fraction(plain) > 0.2
    assert len(plain) == len(bucketed)
    assert all(bucketed_uses[id(r)] == 2 for r in retain)  # every retain row once per epoch
    assert sorted(plain_uses[id(r)] for r in forget) == sorted(bucketed_uses[id(r)] for r in forget)


def test_padding_script_on_scenario_1_data():
    """benchmarks/padding.py on scenario 1's data (no model needed): bucketing cuts the padding."""
    import importlib.util
    import sys

    path = REPO_ROOT / "benchmarks" / "padding.py"
    saved_path = list(sys.path)
    spec = importlib.util.spec_from_file_location("padding_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts benchmarks/unlearning on sys.path
    try:
        name, forget, retain, config = module.fictitious_facts()
        assert len(forget) == 80 and len(retain) == 720
        f = module.fractions(forget, retain, config)
        assert 0.0 <= f["bucketed"] < f["plain"] < 1.0
    finally:
        sys.modules.pop("fictitious_facts", None)
        sys.path[:] = saved_path
