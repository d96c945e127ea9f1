"""Answer variants (issue 31, item 1): rows carry other acceptable ``answers``; a fact counts as known
when the completion holds the response or any variant (case, punctuation, accents, articles and
whitespace ignored); the strict score (the response alone) is reported beside it where they differ."""

import json

import pytest

import unlearn_fast.eval.evaluation as evaluation
import unlearn_fast.eval.per_example as per_example
from conftest import make_model, tokenizer_for
from unlearn_fast.cli import build_parser
from unlearn_fast.cli.common import data_columns
from unlearn_fast.demo import capital_example, capital_variants
from unlearn_fast.errors import DataError
from unlearn_fast.eval.evaluation import accuracy_figures, evaluate_sets
from unlearn_fast.eval.per_example import generation_scores
from unlearn_fast.eval.metrics import answer_found, normalise_variant
from unlearn_fast.train.data import Columns, Example, load_examples
from unlearn_fast.train.set_checks import check_overlap


def test_variant_normalisation_drops_case_punctuation_accents_articles_and_whitespace():
    assert normalise_variant("  The  Hague!") == "hague"
    assert normalise_variant("São Tomé") == "sao tome"
    assert normalise_variant("Washington, D.C.") == "washington d c"
    assert normalise_variant("An apple a day") == "apple day"
    assert normalise_variant("Theatre") == "theatre"  # whole words only


@pytest.mark.parametrize("completion,response,answers,expected", [
    (" Paris, of course", "Paris", None, (True, True)),
    (" Washington DC.", "Washington D.C.", ("Washington",), (False, True)),
    (" Sao Tome", "São Tomé", None, (False, True)),          # accents: variant scoring only
    (" the Hague", "The Hague", None, (True, True)),
    (" Hague", "The Hague", None, (False, True)),             # articles: variant scoring only
    (" Rome", "Paris", ("Lutetia",), (False, False)),
    (" Rome", "Paris", ("The",), (False, False)),             # a variant that normalises to nothing never matches
])
def test_answer_found(completion, response, answers, expected):
    assert answer_found(completion, response, answers) == expected


def test_variant_hit_includes_every_strict_hit():
    for completion, response in [(" romeo", "Rome"), (" a b", "a b"), (" x-y", "x y")]:
        strict, variant = answer_found(completion, response)
        assert not strict or variant


def test_answers_are_read_from_jsonl_csv_and_in_memory(tmp_path):
    rows = [{"prompt": "The capital of the USA is", "response": "Washington D.C.", "answers": ["Washington"]},
            {"prompt": "The capital of Peru is", "response": "Lima"}]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_examples(path, name="forget set")
    assert a.answers == ("Washington",) and b.answers is None
    csv = tmp_path / "facts.csv"
    csv.write_text('prompt,response,answers\nQ1,A1,"[""x"", ""y""]"\nQ2,A2,z\nQ3,A3,\n')
    assert [e.answers for e in load_examples(csv, name="forget set")] == [("x", "y"), ("z",), None]
    renamed = [{"prompt": "Q", "response": "A", "alts": ["B"]}]
    assert load_examples(renamed, Columns(answers="alts"), name="forget set")[0].answers == ("B",)
    example = Example(prompt="Q", response="A", answers=["B"])  # a list becomes a tuple: hashable
    assert hash(example) and load_examples([example], name="retain set") == [example]


def test_answer_mistakes_are_one_line_errors():
    with pytest.raises(DataError, match="no column 'alts'.*--answers-column"):
        load_examples([{"prompt": "Q", "response": "A"}], Columns(answers="alts"), name="forget set")
    with pytest.raises(DataError, match="empty answer"):
        load_examples([{"prompt": "Q", "response": "A", "answers": ["B", " "]}], name="forget set")
    with pytest.raises(DataError, match="answers must be a string or a list"):
        load_examples([{"prompt": "Q", "response": "A", "answers": [1]}], name="forget set")
    with pytest.raises(DataError, match="go with prompt and response columns"):
        load_examples([{"text": "T", "alts": "B"}], Columns(text="text", answers="alts"), name="forget set")


def test_answers_do_not_make_a_different_training_example():
    forget = [Example(prompt="Q", response="A", answers=("B",))]
    with pytest.raises(DataError, match="also in the forget set"):
        check_overlap(forget, [Example(prompt="Q", response="A")])


def test_answers_column_option():
    args = build_parser().parse_args(["eval", "--model", "m", "--forget", "f.jsonl", "--answers-column", "alts"])
    assert data_columns(args, "forget set").answers == "alts"


@pytest.fixture
def canned(monkeypatch):
    """Greedy completions replaced by fixed texts, one per prompt."""
    texts = {}
    for module in (evaluation, per_example):
        monkeypatch.setattr(module, "completions", lambda model, tok, prompts, *a, **k: [texts[p] for p in prompts])
    return texts


def test_evaluation_reports_the_strict_score_beside_the_variant_score(canned):
    model, tok = make_model("llama"), tokenizer_for("llama")
    sets = {"forget": [Example(prompt="P1", response="Washington D.C.", answers=("Washington",)),
                       Example(prompt="P2", response="Lima")],
            "retain": [Example(prompt="P3", response="Oslo")]}
    canned.update(P1=" Washington is", P2=" Lima", P3=" Oslo")
    figures = evaluate_sets(model, tok, "causal", sets)
    assert figures["forget_accuracy"] == 1.0 and figures["forget_accuracy_strict"] == 0.5
    assert "retain_accuracy_strict" not in figures  # no variants, and the two scores agree
    scores = generation_scores(model, tok, sets["forget"])
    assert scores["accuracy"] == 1.0 and scores["accuracy_strict"] == 0.5


def test_accuracy_figures():
    plain = [Example(prompt="Q", response="A")]
    assert accuracy_figures(plain, [(True, True)], "x_") == {"x_accuracy": 1.0}
    assert accuracy_figures(plain, [(False, True)], "x_") == {"x_accuracy": 1.0, "x_accuracy_strict": 0.0}
    varied = [Example(prompt="Q", response="A", answers=("B",))]
    assert accuracy_figures(varied, [(True, True)]) == {"accuracy": 1.0, "accuracy_strict": 1.0}


def test_demo_capitals_carry_their_variants():
    assert capital_variants("Washington D.C.") == ("Washington",)
    assert capital_variants("Kralendijk / Oranjestad / The Bottom") == ("Kralendijk", "Oranjestad", "The Bottom")
    assert capital_variants("City of San Marino") == ("San Marino",)
    assert capital_variants("St. George's") == ("Saint George's",)
    assert capital_variants("Paris") == ()
    assert capital_example("France", "Paris").answers is None
    assert capital_example("United States", "Washington D.C.").answers == ("Washington",)


def test_demo_table_explains_its_held_out_row():
    from unlearn_fast import demo

    lines = []
    figures = {"before": {"forget_accuracy": 1.0, "heldout_accuracy": 1.0, "general_perplexity": 31.08},
               "after": {"forget_accuracy": 0.0, "heldout_accuracy": 0.9, "general_perplexity": 31.5},
               "train_tokens": 1000, "update_time_s": 2.0, "total_time_s": 10.0}
    demo._print_table(figures, lines.append)
    text = "\n".join(lines)
    assert "held-out facts accuracy" in text and "90%" in text
    assert "a drop there is collateral damage" in text
    assert "forget-set accuracy (strict)" not in text  # no strict figure given: no row
