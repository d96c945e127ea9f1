"""Training robustness (issue 30): rows longer than the model's context are cut at it and counted in
one line (item 4); absurd hyperparameters are refused up front (item 6); a damaged result (NaN or
huge weights, or a retain loss far above its value before) stops the run and writes nothing unless
allow_damage, and ``eval --layers`` warns on a damaged artifact (item 8)."""

import json
import math
import random

import pytest
import torch
import transformers as tf

import unlearn_fast.cli.unlearn as cli_unlearn
import unlearn_fast.train.objective as objective_module
from conftest import FACTS_FORGET, FACTS_RETAIN, make_config, make_model, memorize, save_model_dir, tokenizer_for, write_jsonl
from unlearn_fast.api import unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import DataError, TrainingError, UnlearnFastError
from unlearn_fast.eval.evaluation import evaluate_sets, retain_damage
from unlearn_fast.io.artifacts import MANIFEST_FILE, read_artifact, read_manifest, write_artifact
from unlearn_fast.model.family import context_length
from unlearn_fast.model.layers import LayerConfig, sites
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import encode
from unlearn_fast.train.trainer import TrainConfig

FORGET, RETAIN = FACTS_FORGET, FACTS_RETAIN

CONTEXT = 64
QUIET = dict(log=lambda *a: None)


def long_texts(n, seed):
    """Texts of 112-560 characters: as many tokens (+1) under the character-level test tokenizer."""
    rng = random.Random(seed)
    return [{"text": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(112, 560)))} for _ in range(n)]


def short_gpt2():
    """A tiny GPT-2 whose position table has 64 rows: the default max length (256) is beyond it."""
    config = make_config("gpt2")
    config.n_positions = CONTEXT
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(config).eval()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    """Status 2, no traceback, and one ``error: ...`` line, the last on stderr (others are progress bars)."""
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def warnings_of(err):
    return [line for line in err.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust-training")
    model = short_gpt2()
    model.save_pretrained(root / "gpt2-64")
    tokenizer_for("gpt2").save_pretrained(root / "gpt2-64")
    write_jsonl(root / "long-forget.jsonl", long_texts(3, seed=0))
    write_jsonl(root / "long-retain.jsonl", long_texts(4, seed=1))
    # prompt/response rows cut inside the response; their prompts leave no room for 8 completion tokens
    write_jsonl(root / "long-prompts.jsonl", [{"prompt": t["text"][:60], "response": " yes and some more words"}
                                              for t in long_texts(2, seed=2)])
    save_model_dir("llama", root / "llama")
    memorized = make_model("llama")
    memorize(memorized, tokenizer_for("llama"), "llama", FORGET + RETAIN)
    memorized.save_pretrained(root / "memorized")
    tokenizer_for("llama").save_pretrained(root / "memorized")
    write_jsonl(root / "forget.jsonl", FORGET)
    write_jsonl(root / "retain.jsonl", RETAIN)
    return root


# --------------------------------------------------------------------------------------------
# item 4: text longer than the model's context
# --------------------------------------------------------------------------------------------

def test_context_length_from_config_and_tokenizer():
    tok = tokenizer_for("llama")
    assert tok.model_max_length > 10 ** 20  # transformers' "no limit known"
    assert context_length(short_gpt2().config, tok) == CONTEXT
    assert context_length(make_config("llama"), tok) == 256
    assert context_length(make_config("t5"), tokenizer_for("t5")) is None  # relative positions: no table
    tok.model_max_length = 32
    assert context_length(make_config("llama"), tok) == 32
    # RoBERTa numbers positions from pad_token_id + 1
    assert context_length(tf.RobertaConfig(max_position_embeddings=66, pad_token_id=1)) == 64


@pytest.mark.parametrize("evaluate", [True, False])
def test_unlearn_cuts_rows_at_the_context_and_says_so(evaluate):
    lines = []
    result = unlearn(short_gpt2(), tokenizer_for("gpt2"), long_texts(3, 0), long_texts(4, 1),
                     layers=LayerConfig(rank=4), training=TrainConfig(max_steps=2, progress=False),
                     evaluate=evaluate, log=lines.append)
    assert [line for line in lines if line.startswith("truncated")] == [
        f"truncated to {CONTEXT} tokens (the model's context; max length 256 is longer): "
        "3 of 3 forget set rows, 4 of 4 retain set rows"]
    assert result.training.steps == 2
    if evaluate:
        assert math.isfinite(result.metrics["after"]["retain_loss"])


def test_rows_under_the_max_length_are_not_reported():
    lines = []
    unlearn(short_gpt2(), tokenizer_for("gpt2"), FORGET, RETAIN, layers=LayerConfig(rank=4),
            training=TrainConfig(max_steps=1, progress=False), evaluate=False, log=lines.append)
    assert lines and not [line for line in lines if "truncat" in line]


@pytest.mark.parametrize("extra", [[], ["--no-eval"], ["--method", "npo"]])
def test_cli_unlearn_with_rows_longer_than_the_context(workdir, tmp_path, capsys, extra):
    code, out, err = run(capsys, "unlearn", "--model", workdir / "gpt2-64", "--forget", workdir / "long-forget.jsonl",
                         "--retain", workdir / "long-retain.jsonl", "--out", tmp_path / "out", "--max-steps", "2",
                         "--no-progress", "--rank", "4", *extra)
    assert code == 0, err
    assert "Traceback" not in err
    assert [line for line in out.splitlines() if line.startswith("truncated")] == [
        f"truncated to {CONTEXT} tokens (the model's context; max length 256 is longer): "
        "3 of 3 forget set rows, 4 of 4 retain set rows"]


def test_cli_eval_with_rows_and_prompts_longer_than_the_context(workdir, capsys):
    code, out, err = run(capsys, "eval", "--model", workdir / "gpt2-64", "--forget", workdir / "long-prompts.jsonl",
                         "--retain", workdir / "long-retain.jsonl", "--json")
    assert code == 0, err
    figures = json.loads(out)
    assert set(figures) >= {"forget_accuracy", "forget_loss", "retain_loss"}
    assert [line for line in err.splitlines() if line.startswith("truncated")] == [
        f"truncated to {CONTEXT} tokens (the model's context; max length 256 is longer): "
        "2 of 2 forget set rows, 4 of 4 retain set rows"]


def test_classifier_with_texts_longer_than_its_context():
    config = make_config("bert")
    config.max_position_embeddings = CONTEXT
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config).eval()
    examples = [Example(text=t["text"], label=i % 2) for i, t in enumerate(long_texts(4, 3))]
    figures = evaluate_sets(model, tokenizer_for("bert"), "classification", {"retain": examples},
                            {"retain": [e.label for e in examples]})
    assert 0 <= figures["retain_accuracy"] <= 1


def test_a_prompt_that_fills_the_context_is_a_clear_data_error():
    example = Example(prompt=long_texts(1, 4)[0]["text"], response=" yes")
    with pytest.raises(DataError, match="the prompt alone fills the max length of 64 tokens"):
        encode([example], tokenizer_for("gpt2"), "causal", forget=True, name="forget set",
               model_config=short_gpt2().config)


# --------------------------------------------------------------------------------------------
# item 6: absurd hyperparameters are refused before anything runs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", ["1e300", "1e30", "inf", "nan", "0", "-1e-3", "2"])
def test_absurd_learning_rate_is_one_line_and_writes_nothing(workdir, tmp_path, capsys, monkeypatch, lr):
    monkeypatch.setattr(cli_unlearn, "load_base", lambda args: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "unlearn", "--model", workdir / "llama", "--forget", workdir / "forget.jsonl",
                       "--retain", workdir / "retain.jsonl", "--out", out, f"--lr={lr}", "--no-progress")
    assert_one_line_error(code, err, "learning rate must be > 0 and at most 1")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(weight_decay=-1.0), dict(weight_decay=float("nan")), dict(warmup_ratio=2.0),
                                 dict(max_grad_norm=0.0), dict(max_grad_norm=float("nan")), dict(max_steps=0)])
def test_other_bad_training_settings_are_refused(bad):
    with pytest.raises(UnlearnFastError):
        TrainConfig(**bad)


def test_the_learning_rate_bound_is_inclusive():
    assert TrainConfig(lr=1.0).lr == 1.0


# --------------------------------------------------------------------------------------------
# item 8: a damaged model is not written silently
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("before,after,damaged", [
    (0.1, 1.09, False), (0.1, 1.2, True),  # low before: 1 nat of room
    (4.0, 5.9, False), (4.0, 6.1, True),  # high before: 50 % of room
    (0.1, float("nan"), True), (0.1, float("inf"), True),
])
def test_retain_damage_threshold(before, after, damaged):
    found = retain_damage({"retain_loss": before}, {"retain_loss": after})
    assert (found is not None) == damaged
    assert retain_damage({}, {}) is None  # --no-eval: nothing to compare


def _objective_that_blows_up_a_weight(original):
    def call(self, batch, rows=None):
        with torch.no_grad():  # as if an optimiser step had diverged
            sites(self.model)[0].layers[0].down.weight[0, 0] = 1e6
        return original(self, batch, rows)
    return call


def test_out_of_range_weights_stop_the_run_or_are_recorded(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(objective_module.EULObjective, "__call__",
                        _objective_that_blows_up_a_weight(objective_module.EULObjective.__call__))
    out = tmp_path / "layers"
    run_args = dict(layers=LayerConfig(rank=4), training=TrainConfig(max_steps=4, epochs=10, progress=False),
                    evaluate=False, **QUIET)
    with pytest.raises(TrainingError) as info:
        unlearn(make_model("llama"), tokenizer_for("llama"), FORGET, RETAIN, out=out, **run_args)
    message = str(info.value)
    assert "the weights left the sane range at step 1" in message and "nothing was written" in message
    assert "--allow-damage" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []

    result = unlearn(make_model("llama"), tokenizer_for("llama"), FORGET, RETAIN, out=out, allow_damage=True,
                     **run_args)
    assert result.training.steps == 1  # stopped where the damage was found
    assert len(read_manifest(out)["damage"]) == 1 and "largest weight is 1e+06" in read_manifest(out)["damage"][0]
    code, _, err = run(capsys, "eval", "--model", workdir / "llama", "--forget", workdir / "forget.jsonl",
                       "--layers", out)
    assert code == 0
    assert len(warnings_of(err)) == 1 and "damaged" in warnings_of(err)[0] and "1e+06" in warnings_of(err)[0]


def unlearn_memorized(workdir, out, *extra):
    """lr 1 (the largest allowed) for 10 steps wrecks the memorised model: retain loss ~0.1 -> ~2.8 nats."""
    return ["unlearn", "--model", workdir / "memorized", "--forget", workdir / "forget.jsonl", "--retain",
            workdir / "retain.jsonl", "--out", out, "--rank", "4", "--max-steps", "10", "--epochs", "100",
            "--no-progress", "--lr", "1", *extra]


def test_a_wrecked_retain_loss_stops_the_run(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, *unlearn_memorized(workdir, out))
    assert_one_line_error(code, err, "the retain loss rose from", "nothing was written", "--allow-damage")
    assert list(tmp_path.iterdir()) == []


def test_allow_damage_writes_it_records_it_and_eval_warns(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, *unlearn_memorized(workdir, out, "--allow-damage"))
    assert code == 0
    assert any(line.startswith("warning: the retain loss rose from") for line in stdout.splitlines())
    damage = read_manifest(out)["damage"]
    assert len(damage) == 1 and damage[0].startswith("the retain loss rose from")
    code, _, err = run(capsys, "eval", "--model", workdir / "memorized", "--retain", workdir / "retain.jsonl",
                       "--layers", out)
    assert code == 0
    assert len(warnings_of(err)) == 1 and "the retain loss rose from" in warnings_of(err)[0]


def test_without_evaluation_only_the_weights_are_checked(workdir, tmp_path, capsys):
    # the documented limit of --no-eval: no before/after retain loss, so this run is written (finite weights)
    out = tmp_path / "out"
    code, _, err = run(capsys, *unlearn_memorized(workdir, out, "--no-eval"))
    assert code == 0, err
    assert read_manifest(out)["damage"] == []


def test_a_normal_run_records_no_damage_and_eval_is_quiet(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "unlearn", "--model", workdir / "memorized", "--forget", workdir / "forget.jsonl",
                       "--retain", workdir / "retain.jsonl", "--out", out, "--rank", "4", "--max-steps", "10",
                       "--epochs", "100", "--no-progress", "--lr", "1e-2")
    assert code == 0, err
    assert read_manifest(out)["damage"] == []
    code, _, err = run(capsys, "eval", "--model", workdir / "memorized", "--retain", workdir / "retain.jsonl",
                       "--layers", out)
    assert code == 0 and warnings_of(err) == []


def test_eval_warns_on_huge_weights_an_older_manifest_does_not_record(workdir, tmp_path, capsys):
    good = tmp_path / "good"
    unlearn(make_model("llama"), tokenizer_for("llama"), FORGET, RETAIN, out=good, layers=LayerConfig(rank=4),
            training=TrainConfig(max_steps=1, progress=False), evaluate=False, **QUIET)
    manifest, tensors = read_artifact(good)
    manifest = {k: v for k, v in manifest.items() if k not in ("damage", "files", "format_version")}
    tensors = {k: v * 1e8 if k.endswith(".down.weight") else v for k, v in tensors.items()}
    bad = write_artifact(tmp_path / "bad", tensors, manifest)
    assert (bad / MANIFEST_FILE).is_file()
    code, _, err = run(capsys, "eval", "--model", workdir / "llama", "--retain", workdir / "retain.jsonl",
                       "--layers", bad)
    assert code == 0
    assert len(warnings_of(err)) == 1 and "the largest weight is" in warnings_of(err)[0]


def test_help_shows_the_new_flags_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allow-damage" in text and "default: off" in text and "before + max(1 nat, 50 %)" in text
    assert "default 1e-3; at most 1" in text
    assert "not the retain loss" in text  # what --no-eval leaves out of the check
