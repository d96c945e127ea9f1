"""Subject-specific forget tokens (unlearn_fast.train.selection): the kept tokens against log-probabilities
computed by hand from the model's full logits, rows dropped and untouched, the teacher used with layers
attached, errors, loading generic prompts from JSONL / CSV / in-memory data, and unlearn() / the CLI."""

import json

import pytest
import torch
from conftest import make_model, save_model_dir, tokenizer_for

from unlearn_fast.api import unlearn
from unlearn_fast.cli import main
from unlearn_fast.errors import DataError
from unlearn_fast.model.layers import LayerConfig, attach, layer_state
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train.data import Columns, Example, load_examples
from unlearn_fast.train.encoding import encode
from unlearn_fast.train.objective import ObjectiveConfig
from unlearn_fast.train.selection import select_subject_tokens
from unlearn_fast.train.set_checks import check_overlap
from unlearn_fast.train.trainer import TrainConfig

FORGET = [Example(prompt="Ann likes", response=" green tea", generic_prompts=("Bob likes", "Cyd likes", "Dee likes")),
          Example(prompt="Ann lives in", response=" Oslo"),  # no generic prompts: every token stays
          Example(prompt="Ann has a", response=" cat", generic_prompts=("Eve has a",))]
RETAIN = [Example(prompt="The sky is", response=" blue"), Example(prompt="Bob plays", response=" the violin")]


def target_logprobs(model, tokenizer, example):
    """log p of each response token, from the full log-softmax of one unbatched forward."""
    row = encode([example], tokenizer, "causal", forget=True, name="x")[0]
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([row.input_ids])).logits[0].double().log_softmax(-1)
    return [float(lp[t, y]) for t, y in enumerate(row.targets) if y != IGNORE_INDEX]


def hand_gaps(model, tokenizer, example):
    real = target_logprobs(model, tokenizer, example)
    generic = [target_logprobs(model, tokenizer, Example(prompt=g, response=example.response))
               for g in example.generic_prompts]
    return [r - sum(g[t] for g in generic) / len(generic) for t, r in enumerate(real)]


def margin_between(gaps, k):
    """A margin halfway between the k-th and (k+1)-th smallest gap: a margin equal to a gap would make
    that token's selection depend on the last bit of the batched scoring."""
    ordered = sorted(gaps)
    return (ordered[k] + ordered[k + 1]) / 2


def forget_targets(row):
    return [t for t in row.targets if t != IGNORE_INDEX]


def test_kept_tokens_are_those_above_the_margin_by_hand():
    model, tok = make_model("llama"), tokenizer_for("llama")
    rows = encode(FORGET, tok, "causal", forget=True, name="forget set")
    gaps = hand_gaps(model, tok, FORGET[0])
    assert len(gaps) == len(" green tea")  # character-level tokens
    margin = margin_between(gaps, len(gaps) // 2)  # about the median: some tokens kept, some not
    kept_rows, sel = select_subject_tokens(model, tok, "causal", FORGET, rows, margin)
    expected = [g > margin for g in gaps]
    assert 0 < sum(expected) < len(expected)
    all_targets = forget_targets(rows[0])
    assert forget_targets(kept_rows[0]) == [t for t, k in zip(all_targets, expected) if k]
    # the KL term goes with the kept targets; the inputs do not change
    assert [k for k, t in zip(kept_rows[0].kl_mask, kept_rows[0].targets) if t != IGNORE_INDEX] == [True] * sum(expected)
    assert sum(kept_rows[0].kl_mask) == sum(expected)
    assert kept_rows[0].input_ids == rows[0].input_ids and kept_rows[0].forget
    assert kept_rows[1] == rows[1]  # no generic prompts: untouched
    gaps_cat = hand_gaps(model, tok, FORGET[2])
    assert sel.rows == 2 and sel.tokens == len(gaps) + len(gaps_cat)
    assert sel.tokens_kept == sum(expected) + sum(g > margin for g in gaps_cat)
    assert sel.rows_kept == 1 + any(g > margin for g in gaps_cat) == len(kept_rows) - 1
    assert "kept" in sel.describe() and sel.to_dict()["margin"] == margin


def test_rows_with_nothing_specific_are_dropped_and_a_low_margin_keeps_everything():
    model, tok = make_model("llama"), tokenizer_for("llama")
    rows = encode(FORGET, tok, "causal", forget=True, name="forget set")
    kept, sel = select_subject_tokens(model, tok, "causal", FORGET, rows, margin=1e9)
    assert kept == [rows[1]] and sel.rows_kept == 0 and sel.tokens_kept == 0
    kept, sel = select_subject_tokens(model, tok, "causal", FORGET, rows, margin=-1e9)
    assert kept == rows and sel.tokens_kept == sel.tokens
    plain = [Example(prompt=e.prompt, response=e.response) for e in FORGET]
    kept, sel = select_subject_tokens(model, tok, "causal", plain, rows, margin=0.0)
    assert kept == rows and sel.rows == 0


def test_the_teacher_scores_with_the_layers_switched_off():
    model, tok = make_model("llama"), tokenizer_for("llama")
    rows = encode(FORGET, tok, "causal", forget=True, name="forget set")
    gaps = hand_gaps(model, tok, FORGET[0])
    margin = margin_between(gaps, len(gaps) // 2)
    before, _ = select_subject_tokens(model, tok, "causal", FORGET, rows, margin)
    attach(model, LayerConfig(rank=4))
    from conftest import perturb
    perturb(model, scale=2.0)
    after, _ = select_subject_tokens(model, tok, "causal", FORGET, rows, margin)
    assert after == before


def test_generic_prompts_need_a_causal_model():
    model, tok = make_model("bert"), tokenizer_for("bert")
    examples = [Example(prompt="Ann likes", response=" tea", generic_prompts=("Bob likes",))]
    rows = encode(examples, tok, "classification", forget=True, name="forget set", labels=[0])
    with pytest.raises(DataError, match="causal language models"):
        select_subject_tokens(model, tok, "classification", examples, rows, 1.0)


def test_a_row_cut_at_max_length_is_compared_on_its_remaining_tokens():
    model, tok = make_model("llama"), tokenizer_for("llama")
    examples = [Example(prompt="Ann likes", response=" green tea", generic_prompts=("Bob, who is tall, likes",))]
    rows = encode(examples, tok, "causal", forget=True, name="forget set", max_length=14)
    assert len(forget_targets(rows[0])) == 4  # <s> + 9 prompt characters + 4 of the response
    gaps = hand_gaps(model, tok, examples[0])[:4]
    margin = margin_between(gaps, 1)
    kept, sel = select_subject_tokens(model, tok, "causal", examples, rows, margin, max_length=14)
    assert sel.tokens == 4 and sel.tokens_kept == sum(g > margin for g in gaps) == 2
    assert forget_targets(kept[0]) == [t for t, g in zip(forget_targets(rows[0]), gaps) if g > margin]


# ---- loading -----------------------------------------------------------------------------------------


def test_jsonl_generic_prompts_list_or_string(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Ann likes", "response": "tea", "generic_prompts": ["Bob likes", "Cyd likes"]},
        {"prompt": "Ann has", "response": "a cat", "generic_prompts": "Eve has"},
        {"prompt": "Ann is", "response": "tall", "generic_prompts": []},
        {"prompt": "Ann was", "response": "here"}]) + "\n")
    got = load_examples(path, name="forget set")
    assert [e.generic_prompts for e in got] == [("Bob likes", "Cyd likes"), ("Eve has",), None, None]
    renamed = tmp_path / "g.jsonl"
    renamed.write_text(json.dumps({"prompt": "Ann likes", "response": "tea", "others": ["Bob likes"]}) + "\n")
    assert load_examples(renamed, Columns(generic_prompts="others"), name="forget set")[0].generic_prompts == ("Bob likes",)
    assert load_examples(renamed, name="forget set")[0].generic_prompts is None  # not the default column


def test_csv_generic_prompts_one_or_a_json_list(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text('prompt,response,generic_prompts\n'
                    'Ann likes,tea,Bob likes\n'
                    'Ann has,a cat,"[""Eve has"", ""Max has""]"\n'
                    'Ann is,tall,\n')
    got = load_examples(path, name="forget set")
    assert [e.generic_prompts for e in got] == [("Bob likes",), ("Eve has", "Max has"), None]


@pytest.mark.parametrize("cell,needle", [('"[""Bob likes"", oops]"', "not a JSON list"),
                                         ('"[1, 2]"', "string or a list of strings")])
def test_bad_csv_generic_prompts_are_clear_errors(tmp_path, cell, needle):
    path = tmp_path / "f.csv"
    path.write_text(f"prompt,response,generic_prompts\nAnn likes,tea,{cell}\n")
    with pytest.raises(DataError, match=needle) as err:
        load_examples(path, name="forget set")
    assert "row 1" in str(err.value) or "line 2" in str(err.value)


def test_bad_in_memory_generic_prompts():
    with pytest.raises(DataError, match="empty generic prompt"):
        load_examples([{"prompt": "Ann likes", "response": "tea", "generic_prompts": ["Bob likes", " "]}],
                      name="forget set")
    with pytest.raises(DataError, match="go with prompt/response"):
        load_examples([Example(text="Ann likes tea", generic_prompts=("Bob likes tea",))], name="forget set")
    with pytest.raises(DataError, match="with prompt and response columns"):
        load_examples([{"text": "Ann likes tea"}], Columns(text="text", generic_prompts="g"), name="forget set")


def test_generic_prompts_do_not_make_a_different_training_example():
    forget = [Example(prompt="Ann likes", response="tea", generic_prompts=("Bob likes",))]
    with pytest.raises(DataError, match="also in the forget set"):
        check_overlap(forget, [Example(prompt="Ann likes", response="tea")])


# ---- unlearn() and the CLI -----------------------------------------------------------------------


def _unlearn(examples, margin, **kw):
    model = make_model("llama")
    return unlearn(model, tokenizer_for("llama"), examples, RETAIN, layers=LayerConfig(rank=4),
                   objective=ObjectiveConfig(subject_margin=margin, gamma=1.0),
                   training=TrainConfig(max_steps=3, batch_size=2, lr=1e-2, progress=False),
                   evaluate=False, log=lambda *a: None, **kw)


def test_unlearn_trains_on_the_selected_tokens_and_records_them():
    plain = [Example(prompt=e.prompt, response=e.response) for e in FORGET]
    reference = layer_state(_unlearn(plain, 1.0).model)
    everything = _unlearn(FORGET, -1e9)  # every token kept: the same run as without generic prompts
    for k, v in layer_state(everything.model).items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    sel = everything.manifest["subject_selection"]
    assert sel["tokens_kept"] == sel["tokens"] == len(" green tea") + len(" cat")
    model, tok = make_model("llama"), tokenizer_for("llama")
    gaps = hand_gaps(model, tok, FORGET[0])
    margin = margin_between(gaps, len(gaps) // 2)
    some = _unlearn(FORGET, margin)
    assert 0 < some.manifest["subject_selection"]["tokens_kept"] < sel["tokens"]
    assert some.manifest["objective"]["subject_margin"] == margin
    assert any(not torch.equal(v, reference[k]) for k, v in layer_state(some.model).items())
    assert _unlearn(plain, 1.0).manifest["subject_selection"] is None
    # the Gram matrices cover every forgotten row, whatever was selected (the lowest down-projection's
    # inputs are the frozen base's states: equal; every other one depends on the trained layers)
    assert some.manifest["grams"]["tokens"] == everything.manifest["grams"]["tokens"]
    lowest = "model.layers.0.mlp.0.down.gram"
    torch.testing.assert_close(some.grams[lowest], everything.grams[lowest], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(some.grams["model.layers.1.mlp.0.down.gram"],
                              everything.grams["model.layers.1.mlp.0.down.gram"])


def test_unlearn_with_nothing_specific_left_is_a_clear_error():
    only_generic = [FORGET[0], FORGET[2]]
    with pytest.raises(DataError, match="nothing to forget"):
        _unlearn(only_generic, 1e9)


def test_cli_reads_the_generic_prompts_column_and_the_margin(tmp_path, capsys):
    save_model_dir("llama", tmp_path / "model")
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response, "others": list(e.generic_prompts)}) + "\n"
                              for e in (FORGET[0], FORGET[2])))
    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in RETAIN))
    common = ["unlearn", "--model", tmp_path / "model", "--forget", forget, "--retain", retain,
              "--max-steps", "2", "--no-eval", "--no-progress", "--rank", "4", "--generic-prompts-column", "others"]
    code = main([str(a) for a in common + ["--out", tmp_path / "a", "--subject-margin", "1e9"]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "nothing to forget" in err
    assert not (tmp_path / "a").exists()
    code = main([str(a) for a in common + ["--out", tmp_path / "b", "--subject-margin=-1e9"]])
    out = capsys.readouterr().out
    assert code == 0 and "subject-specific tokens: kept" in out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["objective"]["subject_margin"] == -1e9
    assert manifest["subject_selection"]["rows_kept"] == 2
