"""Gradient accumulation (TrainConfig.accumulate, --accumulate): N micro-batches of batch_size rows make the
update of one batch of N × batch_size rows, each loss term a mean over its positions in the whole batch."""

import pytest
import torch

from conftest import TASK_OF, encode_sets, make_model, perturb, tokenizer_for
from unlearn_fast.cli import build_parser
from unlearn_fast.model.layers import LayerConfig, attach, unlearning_parameters
from unlearn_fast.train import trainer
from unlearn_fast.train.data import Example
from unlearn_fast.train.distributed import split_rows, term_counts
from unlearn_fast.train.encoding import encode, pad_token_id
from unlearn_fast.train.objective import TERMS, EULObjective, ObjectiveConfig
from unlearn_fast.train.step_cache import StepCache
from unlearn_fast.train.trainer import TrainConfig, train

FORGET = [Example(prompt=f"Secret {i} is", response=f"code{i * 7}") for i in range(5)]
# rows of different lengths: micro-batches pad differently from the whole batch
RETAIN = [Example(prompt=f"Public fact number {i} says", response=f"value {i}" * (1 + i % 3)) for i in range(13)]


def _run(arch, batch_size, accumulate, schedule, sizes=None):
    torch.manual_seed(0)
    model = make_model(arch)
    tokenizer, task = tokenizer_for(arch), TASK_OF[arch]
    forget, retain = encode_sets(model, arch, FORGET, RETAIN)
    attach(model, LayerConfig(rank=4, blocks=1))
    perturb(model, scale=0.05)
    objective = EULObjective(model, task, ObjectiveConfig(gamma=0.5), StepCache(model, task))
    if sizes is not None:
        original = objective.__call__
        objective = lambda batch, rows: (sizes.append(len(rows)), original(batch, rows))[1]  # noqa: E731
        objective.global_normalisers = True
    config = TrainConfig(epochs=3, batch_size=batch_size, accumulate=accumulate, lr=1e-2, progress=False,
                         schedule=schedule)
    result = train(model, objective, forget, retain, config, pad_token_id(tokenizer))
    return [p.detach().clone() for p in unlearning_parameters(model)], result


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("schedule", ["mixed", "alternate"])
def test_accumulated_micro_batches_give_the_larger_batchs_update(arch, schedule):
    """batch_size 2 × accumulate 3 against batch_size 6: the same weights after every step of 3 epochs
    (fp32, within 1e-6), the same logged loss and terms."""
    whole, big = _run(arch, 6, 1, schedule)
    sizes = []
    parts, small = _run(arch, 2, 3, schedule, sizes)
    assert small.steps == big.steps > 3
    assert max(sizes) <= 2 * (2 if schedule == "mixed" else 1)  # one forward holds a micro-batch only
    for a, b in zip(whole, parts):
        assert float((a - b).abs().max()) <= 1e-6
    for a, b in zip(big.history, small.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        for term in TERMS:  # a mean over the term's positions in the whole batch, NaN where absent
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6, nan_ok=True)
    assert small.tokens == big.tokens


def test_an_objective_without_global_normalisers_averages_its_micro_batches():
    """Another objective's loss is a mean over its own micro-batch: the parts are averaged."""
    weight = torch.nn.Parameter(torch.ones(3))

    def objective(batch, rows):
        return (weight * len(rows)).sum(), {"rows": float(len(rows))}

    model = make_model("llama")
    tokenizer = tokenizer_for("llama")
    rows = encode(RETAIN[:5], tokenizer, "causal", forget=False, name="retain", model_config=model.config)
    config = TrainConfig(batch_size=2, accumulate=3)
    loss, terms, tokens = trainer._accumulate(objective, rows, True, rows, None, config, 0, "cpu")
    # micro-batches of 2, 2 and 1 rows: their losses (3·2, 3·2, 3·1) and gradients averaged
    assert loss.item() == pytest.approx(5.0)
    assert weight.grad.tolist() == pytest.approx([5 / 3] * 3)
    assert terms["rows"] == pytest.approx(5 / 3)
    assert tokens == sum(len(r.input_ids) for r in rows)


def test_accumulate_is_checked_and_reaches_the_config():
    with pytest.raises(Exception, match="accumulation"):
        TrainConfig(accumulate=0)
    args = build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--retain", "r", "--out", "o",
                                      "--accumulate", "4", "--gradient-checkpointing"])
    assert args.accumulate == 4 and args.gradient_checkpointing
    args = build_parser().parse_args(["unlearn", "--model", "m", "--forget", "f", "--retain", "r", "--out", "o"])
    assert args.accumulate == 1 and not args.gradient_checkpointing


def test_ranks_times_micro_batches_add_up_to_one_batch():
    """Data parallel and accumulation together: each of 2 ranks runs its share of the global batch in
    micro-batches, all normalised by the global batch's counts; the gradients sum to one process's."""
    torch.manual_seed(0)
    model = make_model("llama")
    tokenizer = tokenizer_for("llama")
    kw = dict(model_config=model.config, max_length=64)
    forget = encode(FORGET, tokenizer, "causal", forget=True, name="forget", **kw)
    retain = encode(RETAIN, tokenizer, "causal", forget=False, name="retain", **kw)
    attach(model, LayerConfig(rank=4))
    perturb(model, scale=0.3)
    params = unlearning_parameters(model)
    objective = EULObjective(model, "causal", ObjectiveConfig(gamma=0.5))
    group = retain[:7] + forget[:4]

    def grads(rows, counts, config):
        for p in params:
            p.grad = None
        loss, _, _ = trainer._accumulate(objective, rows, True, group, counts, config, 0, "cpu")
        return loss.item(), [p.grad.clone() for p in params]

    whole_loss, whole = grads(group, None, TrainConfig(batch_size=11))
    counts = term_counts(group)
    ranks = [grads(split_rows(group, 2, r), counts, TrainConfig(batch_size=2, accumulate=3)) for r in range(2)]
    assert sum(loss for loss, _ in ranks) == pytest.approx(whole_loss, rel=1e-5)
    for i, g in enumerate(whole):
        assert torch.allclose(ranks[0][1][i] + ranks[1][1][i], g, rtol=1e-4, atol=1e-7)
