"""The memory plan (unlearn_fast.train.plan, `unlearn-fast plan`): estimated from the config alone, within
25 % of the peak a real CPU training step measures, and the settings it proposes for a budget."""

import pytest
import transformers

from memory_probe import measure
from unlearn_fast import cli
from unlearn_fast.errors import UnlearnFastError
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train.plan import GiB, PlanSettings, candidates, estimate, fit, model_shape, parse_size

# SmolLM2-135M's shape with 6 of its 30 blocks
SMOLLM2_6 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def test_estimate_is_within_25_percent_of_a_measured_cpu_step():
    """Layers on the top 3 of 6 blocks (the trunk below is replayed), 2 × 8 rows × 128 tokens, fp32."""
    spec = {"config": SMOLLM2_6, "batch_size": 8, "max_length": 128, "rank": 32, "blocks": 3, "steps": 1}
    measured = measure(spec)
    shape = model_shape(transformers.LlamaConfig(**SMOLLM2_6), LayerConfig(rank=32, blocks=3))
    plan = estimate(shape, PlanSettings(batch_size=8, max_length=128, rows=16))
    peak = measured["peak"] - measured["start"]
    print(f"estimated {plan.total / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB "
          f"(base {(measured['loaded'] - measured['start']) / 2**20:.1f} MiB)")
    assert abs(plan.total - peak) <= 0.25 * peak, (plan.parts, measured)


@pytest.fixture(scope="module")
def shape():
    return model_shape(transformers.LlamaConfig(**SMOLLM2_6), LayerConfig(rank=32))


def test_savings_lower_the_peak_and_cost_what_they_should(shape):
    plain = estimate(shape, PlanSettings(batch_size=8, max_length=512))
    checkpointed = estimate(shape, PlanSettings(batch_size=8, max_length=512, gradient_checkpointing=True))
    halves = estimate(shape, PlanSettings(batch_size=4, accumulate=2, max_length=512))
    assert checkpointed.parts["activations for the backward"] < plain.parts["activations for the backward"] / 4
    assert checkpointed.total < plain.total and halves.total < plain.total
    assert checkpointed.flops["step"] > plain.flops["step"]  # one more forward of the trained blocks
    assert halves.flops["step"] == pytest.approx(plain.flops["step"])  # the same work in two passes
    assert plain.parts["frozen base"] == shape.params * 4
    assert shape.params == 6 * shape.block_params + 49152 * 576 + 576  # tied head, final norm
    bf16 = estimate(shape, PlanSettings(batch_size=8, max_length=512, device="cuda"))
    assert bf16.settings.dtype == "bfloat16" and bf16.parts["frozen base"] == shape.params * 2
    assert bf16.parts["CUDA context"] > 0


def test_fit_picks_the_cheapest_settings_that_fit(shape):
    settings = PlanSettings(batch_size=16, max_length=1024)
    plans = candidates(shape, settings)
    assert plans[0].settings.batch_size == 16 and not plans[0].settings.gradient_checkpointing
    assert plans[-1].settings.batch_size == 1 and plans[-1].settings.accumulate == 16
    assert plans[-1].settings.gradient_checkpointing
    budget = (plans[0].total + plans[-1].total) // 2
    best = fit(shape, settings, budget)
    assert best.total <= budget
    first = next(i for i, p in enumerate(plans) if p.settings == best.settings)
    assert all(p.total > budget for p in plans[:first])  # nothing cheaper fits
    assert fit(shape, settings, plans[-1].total - 1) is None


def test_plan_cli_reads_only_the_config(tmp_path, capsys):
    """A directory with nothing but config.json: the plan needs no weight."""
    transformers.LlamaConfig(**SMOLLM2_6).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    args = ["plan", "--model", str(tmp_path), "--batch-size", "8", "--max-length", "512", "--rank", "32",
            "--blocks", "top:3"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for part in ("frozen base", "activations for the backward", "loss-head chunk", "teacher cache (1000 rows)",
                 "unlearning layers + AdamW", "estimated peak", "FLOPs per optimiser step"):
        assert part in out, out
    assert "blocks 3-5" in out

    assert cli.main(args + ["--memory", "100GiB"]) == 0
    assert "fits in 100.00 GiB as given" in capsys.readouterr().out
    assert cli.main(args + ["--memory", "500MiB", "--rows", "16"]) == 0
    out = capsys.readouterr().out
    assert "does not fit in 500.00 MiB as given; fits with --batch-size" in out, out
    assert cli.main(args + ["--memory", "100MiB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit in 100.00 MiB even with every saving" in out and "--gradient-checkpointing" in out


def test_plan_cli_refuses_what_it_cannot_estimate(tmp_path, capsys):
    assert cli.main(["plan", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "smollm2", "--memory", "lots"]) == 2
    assert "40GiB" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("40GiB") == 40 * GiB
    assert parse_size("80 GB") == 80 * 10 ** 9
    assert parse_size("1.5gib") == int(1.5 * GiB)
    assert parse_size("1e9") == 10 ** 9
    with pytest.raises(UnlearnFastError):
        parse_size("40 parsecs")
