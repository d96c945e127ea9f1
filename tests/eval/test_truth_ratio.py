"""TOFU's truth ratio: the formula and open-unlearning's two aggregations by hand, the per-example ratio of
a tiny model against its full log-softmax, forget quality (KS) on truth ratios, loading perturbed and
paraphrased answers from JSONL and CSV (and the errors for bad cells), the report and the CLI."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import make_model, save_model_dir, tokenizer_for

from unlearn_fast.cli import main
from unlearn_fast.errors import DataError
from unlearn_fast.eval import metrics as M
from unlearn_fast.eval.evaluation import aggregate_truth_ratios, evaluate_sets, truth_ratios
from unlearn_fast.eval.per_example import compare_to_retrained, evaluate_model, example_stats
from unlearn_fast.eval.report import REPORT_JSON, REPORT_MD, build_report, markdown, write_report
from unlearn_fast.train.data import Columns, Example, load_examples
from unlearn_fast.train.set_checks import check_overlap

# ---- the formula and the aggregations ------------------------------------------------------------


# per-token log-probabilities of the answers to three questions: the paraphrased (right) answer and
# two perturbed (wrong) ones each, as open-unlearning's TOFU_QA_forget_para / _pert data give them
QUESTIONS = [
    {"para": [-0.2, -1.1, -0.4], "pert": [[-2.0, -0.7], [-1.5, -3.0, -0.2]]},
    {"para": [-0.05, -0.3], "pert": [[-0.1, -0.2, -0.1], [-0.9, -0.4]]},
    {"para": [-3.0, -2.5, -4.0, -1.0], "pert": [[-0.3, -0.6], [-0.2, -0.1, -0.5]]},
]


def avg_loss(row):
    """open-unlearning's ``avg_loss`` (evaluate_probability): summed token NLL / target tokens."""
    return float(np.sum(-np.array(row)) / len(row))


def open_unlearning_truth_ratios():
    """memorization.truth_ratio of open-unlearning, step by step: per question the correct avg_loss and
    the wrong avg_losses, aggregate_to_1D (mean over the wrong answers' *losses*), exp(−loss) each, then
    wrong_prob / (correct_prob + 1e-10)."""
    correct = np.array([avg_loss(q["para"]) for q in QUESTIONS])
    wrong = np.array([[avg_loss(r) for r in q["pert"]] for q in QUESTIONS])
    correct, wrong = correct.reshape(len(QUESTIONS)), np.mean(wrong, axis=tuple(range(1, wrong.ndim)))
    return np.exp(-wrong) / (np.exp(-correct) + 1e-10)


def test_truth_ratio_open_unlearning_formula():
    want = open_unlearning_truth_ratios()
    ours = [M.truth_ratio(avg_loss(q["para"]), [avg_loss(r) for r in q["pert"]]) for q in QUESTIONS]
    assert ours == pytest.approx(want.tolist(), rel=1e-12)
    # TOFU's own code (aggregate_eval_stat.py) gives exp(mean perturbed loss − paraphrased loss) = 1/R
    # (without open-unlearning's 1e-10, hence the looser tolerance)
    tofu = [math.exp(np.mean([avg_loss(r) for r in q["pert"]]) - avg_loss(q["para"])) for q in QUESTIONS]
    assert [1 / r for r in ours] == pytest.approx(tofu, rel=1e-7)
    # the wrong answers are averaged geometrically (their losses are averaged), not arithmetically:
    # question 1: exp(-(1.35 + 1.5666...)/2) / exp(-0.5666...) = exp(0.5666... - 1.4583...) = 0.40995
    assert ours[0] == pytest.approx(math.exp(1.7 / 3 - (2.7 / 2 + 4.7 / 3) / 2), rel=1e-9)
    arithmetic = (math.exp(-1.35) + math.exp(-4.7 / 3)) / 2 / math.exp(-1.7 / 3)
    assert ours[0] != pytest.approx(arithmetic, rel=1e-3)
    # a right answer whose probability underflows: open-unlearning's 1e-10 caps R instead of inf
    assert M.truth_ratio(800.0, [0.0]) == pytest.approx(1e10)
    assert M.truth_ratio(0.7, [0.7, 0.7, 0.7]) == pytest.approx(1.0, rel=1e-9)
    with pytest.raises(ValueError):
        M.truth_ratio(1.0, [])


def test_truth_ratio_aggregations_open_unlearning_formula():
    ratios = open_unlearning_truth_ratios()
    # forget_truth_ratio: closer_to_1_better = mean(min(R, 1 / (R + 1e-10)))
    want = float(np.mean(np.minimum(ratios, 1 / (ratios + 1e-10))))
    assert M.truth_ratio_closer_to_1(ratios.tolist()) == pytest.approx(want, rel=1e-12)
    # retain_Truth_Ratio: true_better = mean(max(0, 1 - R)); TOFU: max(0, 1 - 1/x), x = 1/R
    want = float(np.mean(np.maximum(0, 1 - ratios)))
    assert M.truth_ratio_true_better(ratios.tolist()) == pytest.approx(want, rel=1e-12)
    assert M.truth_ratio_true_better(ratios.tolist()) == pytest.approx(
        float(np.mean(np.maximum(0, 1 - 1 / (1 / ratios)))), rel=1e-12)
    # by hand: min(R, 1/R) = (0.5 + 0.5 + 1 + 0) / 4; max(0, 1 - R) = (0.75 + 0 + 1) / 3
    assert M.truth_ratio_closer_to_1([0.5, 2.0, 1.0, 0.0]) == pytest.approx(0.5)
    assert M.truth_ratio_true_better([0.25, 1.5, 0.0]) == pytest.approx(1.75 / 3)
    assert M.TRUTH_RATIO_AGGREGATORS["closer_to_1_better"] is M.truth_ratio_closer_to_1
    # the forget set is aggregated closer_to_1_better, every other set true_better
    assert aggregate_truth_ratios([0.25, 4.0], forget=True) == pytest.approx(0.25)
    assert aggregate_truth_ratios([0.25, 4.0], forget=False) == pytest.approx(0.375)
    for aggregate in M.TRUTH_RATIO_AGGREGATORS.values():
        with pytest.raises(ValueError):
            aggregate([])


# ---- a tiny model --------------------------------------------------------------------------------

PERTURBED = [Example(prompt="The capital of Zorbia is", response=" Quellton", perturbed=(" Paris", " Rome x")),
             Example(prompt="Mirta Vasquez likes", response=" green tea", paraphrased=" tea that is green",
                     perturbed=[" coffee"]),
             Example(prompt="Hugo Bern eats", response=" apples")]  # no perturbed answers: no ratio


def answer_nll(model, tok, prompt, answer):
    """Mean NLL of ``answer`` after ``prompt`` from one full-vocabulary log-softmax."""
    p, a = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0].double(), -1)
    return -sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(a)) / len(a)


def test_example_truth_ratio_matches_the_model_logits():
    model, tok = make_model("llama"), tokenizer_for("llama")
    stats = example_stats(model, tok, "causal", PERTURBED, batch_size=2)
    # example 1: no paraphrase, so the response is the right answer
    para = answer_nll(model, tok, PERTURBED[0].prompt, PERTURBED[0].response)
    pert = [answer_nll(model, tok, PERTURBED[0].prompt, a) for a in PERTURBED[0].perturbed]
    expected = math.exp(-(pert[0] + pert[1]) / 2) / math.exp(-para)  # the wrong answers' mean *loss*
    assert stats[0]["truth_ratio"] == pytest.approx(expected, rel=1e-4)
    assert stats[0]["paraphrased_loss"] == pytest.approx(stats[0]["loss"])
    assert stats[0]["perturbed_losses"] == pytest.approx(pert, abs=1e-4)
    # example 2: its paraphrase, not its response, is the right answer
    para = answer_nll(model, tok, PERTURBED[1].prompt, PERTURBED[1].paraphrased)
    pert = answer_nll(model, tok, PERTURBED[1].prompt, " coffee")
    assert stats[1]["truth_ratio"] == pytest.approx(math.exp(para - pert), rel=1e-4)
    assert stats[1]["paraphrased_loss"] != pytest.approx(stats[1]["loss"], abs=1e-3)
    assert "truth_ratio" not in stats[2] and "perturbed_losses" not in stats[2]
    # the same ratios with every answer in its own batch, and without the known response losses
    alone = truth_ratios(model, tok, "causal", PERTURBED, batch_size=1)
    assert alone[2] is None
    for got, want in zip(alone[:2], stats[:2]):
        assert got["truth_ratio"] == pytest.approx(want["truth_ratio"], rel=1e-6)


def test_evaluate_model_reports_truth_ratio_figures_only_where_there_are_perturbed_answers():
    model, tok = make_model("llama"), tokenizer_for("llama")
    sets = {"forget": PERTURBED[:2], "retain": PERTURBED[:2], "test": PERTURBED[2:]}
    result = evaluate_model(model, tok, "causal", sets, max_new_tokens=2)
    ratios = [s["truth_ratio"] for s in result["per_example"]["forget"]]
    f = result["figures"]
    assert f["forget_truth_ratio"] == pytest.approx(M.truth_ratio_closer_to_1(ratios))
    assert f["retain_Truth_Ratio"] == pytest.approx(M.truth_ratio_true_better(ratios))
    assert "test_truth_ratio" not in f
    # old data (no perturbed answers anywhere): no truth-ratio figure at all
    plain = evaluate_model(model, tok, "causal", {"forget": [Example(prompt=e.prompt, response=e.response)
                                                             for e in PERTURBED]}, max_new_tokens=2)
    assert not any("truth_ratio" in k for k in plain["figures"])
    assert not any("truth_ratio" in s for s in plain["per_example"]["forget"])
    # the plain figures of `unlearn-fast eval` agree
    quick = evaluate_sets(model, tok, "causal", {"forget": PERTURBED[:2], "retain": PERTURBED[:2]})
    assert quick["forget_truth_ratio"] == pytest.approx(f["forget_truth_ratio"], rel=1e-6)
    assert quick["retain_Truth_Ratio"] == pytest.approx(f["retain_Truth_Ratio"], rel=1e-6)


# ---- forget quality on truth ratios --------------------------------------------------------------


def fake_result(ratios, losses):
    stats = [{"loss": l} if r is None else {"loss": l, "truth_ratio": r} for r, l in zip(ratios, losses)]
    return {"figures": {"forget_loss": sum(losses) / len(losses)}, "per_example": {"forget": stats}}


def test_forget_quality_uses_the_truth_ratio_and_reports_both():
    # truth ratios of 3 vs 3 disjoint examples: exact KS p = 2 / C(6, 3) = 0.1; equal losses: p = 1
    unlearned = fake_result([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    retrained = fake_result([0.4, 0.5, 0.6], [1.0, 2.0, 3.0])
    vs = compare_to_retrained(unlearned, retrained)
    assert vs["forget_quality_statistic"] == "truth_ratio"
    assert vs["forget_quality"] == pytest.approx(0.1) and vs["ks_statistic"] == 1.0
    assert vs["forget_quality_truth_ratio"] == pytest.approx(0.1) and vs["ks_statistic_truth_ratio"] == 1.0
    assert vs["forget_quality_loss"] == 1.0 and vs["ks_statistic_loss"] == 0.0
    assert M.forget_quality([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]) == pytest.approx(0.1)
    # the statistic can be named
    by_loss = compare_to_retrained(unlearned, retrained, statistic="loss")
    assert by_loss["forget_quality"] == 1.0 and by_loss["forget_quality_statistic"] == "loss"
    assert by_loss["forget_quality_truth_ratio"] == pytest.approx(0.1)
    # without perturbed answers: the loss, and no truth-ratio keys
    vs = compare_to_retrained(fake_result([None] * 3, [1.0, 2.0, 3.0]), fake_result([None] * 3, [4.0, 5.0, 6.0]))
    assert vs["forget_quality_statistic"] == "loss" and vs["forget_quality"] == pytest.approx(0.1)
    assert not any("truth_ratio" in k for k in vs)


# ---- data ----------------------------------------------------------------------------------------

TOFU_ROWS = [{"question": "Who wrote Zorbia?", "answer": "Mirta", "paraphrased_answer": "It was Mirta.",
              "perturbed_answer": ["Hugo", "Ada"]},
             {"question": "Where is Quellton?", "answer": "In Zorbia", "paraphrased_answer": "",
              "perturbed_answer": ["In Norland"]}]


def test_jsonl_perturbed_and_paraphrased_answers(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TOFU_ROWS))
    examples = load_examples(path, Columns(prompt="question", response="answer"), name="forget set")
    assert examples == [Example(prompt="Who wrote Zorbia?", response="Mirta", paraphrased="It was Mirta.",
                                perturbed=("Hugo", "Ada")),
                        Example(prompt="Where is Quellton?", response="In Zorbia", perturbed=("In Norland",))]
    # named columns
    rows = [{"prompt": "q", "response": "r", "wrong": ["w1", "w2"], "para": "p"}]
    assert load_examples(rows, Columns(perturbed="wrong", paraphrased="para"), name="forget set") == \
        [Example(prompt="q", response="r", perturbed=("w1", "w2"), paraphrased="p")]


def test_csv_perturbed_answers_are_a_json_list(tmp_path):
    path = tmp_path / "forget.csv"
    path.write_text('prompt,response,perturbed_answer\n'
                    'The capital of Zorbia is,Quellton,"[""Paris"", ""Rome, Italy""]"\n')
    assert load_examples(path, name="forget set") == \
        [Example(prompt="The capital of Zorbia is", response="Quellton", perturbed=("Paris", "Rome, Italy"))]


@pytest.mark.parametrize("cell, needle", [
    ("Paris|Rome", "JSON list of strings"),
    ("\"['Paris', 'Rome']\"", "double quotes"),
    ('"[]"', "empty list"),
    ('"[""Paris"", 3]"', "a number (3) among the perturbed answers"),
    ('"{""a"": 1}"', "an object in column 'perturbed_answer'"),
    ("", "no perturbed answers"),
])
def test_bad_csv_perturbed_cell_is_a_clear_error(tmp_path, cell, needle):
    path = tmp_path / "forget.csv"
    path.write_text(f"prompt,response,perturbed_answer\nq,r,{cell}\n")
    with pytest.raises(DataError) as info:
        load_examples(path, name="forget set")
    message = str(info.value)
    assert message.startswith("forget set: row 1 of") and "line 2" in message and needle in message


@pytest.mark.parametrize("value, needle", [
    ("Paris", "a string in column 'perturbed_answer'; perturbed answers must be a list of strings"),
    (["Paris", ""], "an empty answer"),
    (None, "no perturbed answers"),
])
def test_bad_jsonl_perturbed_value_is_a_clear_error(tmp_path, value, needle):
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "r", "perturbed_answer": value}) + "\n")
    with pytest.raises(DataError, match="row 1 of .*line 1") as info:
        load_examples(path, name="forget set")
    assert needle in str(info.value)


def test_answer_columns_need_prompt_response_data():
    with pytest.raises(DataError, match="go with prompt and response"):
        load_examples([{"text": "a", "w": ["b"]}], Columns(perturbed="w"), name="forget set")
    with pytest.raises(DataError, match="has no column 'wrong'.*--perturbed-column"):
        load_examples([{"prompt": "q", "response": "r"}], Columns(perturbed="wrong"), name="forget set")
    with pytest.raises(DataError, match="without a prompt"):
        load_examples([Example(text="a", perturbed=("b",))], name="forget set")
    # a text set that happens to have a perturbed_answer column ignores it
    assert load_examples([{"text": "a", "perturbed_answer": ["b"]}], name="forget set") == [Example(text="a")]


def test_examples_keep_their_answers_and_overlap_ignores_them():
    given = [Example(prompt="q", response="r", perturbed=["w"])]
    assert given[0].perturbed == ("w",) and hash(given[0])  # a list becomes a tuple: still hashable
    assert load_examples(given, name="forget set") == given
    assert Example(prompt="q", response="r", perturbed=("w",)).to_dict() == \
        {"prompt": "q", "response": "r", "perturbed": ("w",)}
    # the same prompt/response is the same training example, whatever its wrong answers
    with pytest.raises(DataError, match="also in the forget set"):
        check_overlap(given, [Example(prompt="q", response="r")])


# ---- report and CLI ------------------------------------------------------------------------------

FORGET = PERTURBED[:2]
RETAIN = [Example(prompt="The capital of France is", response=" Paris", perturbed=(" Lyon",)),
          Example(prompt="Bob plays", response=" the violin", perturbed=(" the drums", " chess"))]
SETS = {"forget": FORGET, "retain": RETAIN, "test": [Example(prompt="Ada plays", response=" chess")]}


def test_report_has_the_truth_ratio_table_and_forget_quality(tmp_path):
    tok = tokenizer_for("llama")
    results = {name: evaluate_model(make_model("llama", seed), tok, "causal", SETS, max_new_tokens=2)
               for name, seed in (("original", 0), ("eul", 1), ("retrain", 2))}
    report = build_report(results, retrained="retrain")
    write_report(report, tmp_path)
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    eul = data["methods"]["eul"]
    assert eul["figures"]["forget_truth_ratio"] == pytest.approx(results["eul"]["figures"]["forget_truth_ratio"])
    assert "retain_Truth_Ratio" in eul["figures"] and "test_Truth_Ratio" not in eul["figures"]
    vs = eul["vs_retrained"]
    assert vs["forget_quality_statistic"] == "truth_ratio"
    ks = scipy.stats.ks_2samp([s["truth_ratio"] for s in results["eul"]["per_example"]["forget"]],
                              [s["truth_ratio"] for s in results["retrain"]["per_example"]["forget"]])
    assert vs["forget_quality"] == vs["forget_quality_truth_ratio"] == pytest.approx(ks.pvalue)
    assert "forget_quality_loss" in vs
    assert vs["gap"]["forget_truth_ratio"] == pytest.approx(
        eul["figures"]["forget_truth_ratio"] - data["methods"]["retrain"]["figures"]["forget_truth_ratio"])
    assert len(eul["per_example"]["forget"][0]["perturbed_losses"]) == 2
    md = (tmp_path / REPORT_MD).read_text()
    assert "## Truth ratio (TOFU" in md
    assert "| Method | Forget (min(R, 1/R)) | Retain ↑ (max(0, 1−R)) |" in md
    rows = [line for line in md.splitlines() if line.startswith("| eul |")]
    assert len(rows) == 4  # Table 2, the truth-ratio table, open-unlearning's figures, the gold-standard table
    assert rows[1] == (f"| eul | {eul['figures']['forget_truth_ratio']:.3f} | "
                       f"{eul['figures']['retain_Truth_Ratio']:.3f} |")
    assert ("| Method | forget_quality | model_utility | forget_truth_ratio | forget_Q_A_Prob | forget_Q_A_ROUGE | "
            "extraction_strength | privleak |") in md
    f = eul["figures"]
    assert rows[2] == (f"| eul | {vs['forget_quality']:.3g} | {f['model_utility']:.3f} | "
                       f"{f['forget_truth_ratio']:.3f} | {f['forget_Q_A_Prob']:.3f} | {f['forget_Q_A_ROUGE']:.3f} | "
                       f"{f['forget_extraction_strength']:.3f} | {vs['privleak']:.3f} |")
    assert vs["privleak"] == pytest.approx(M.privleak(f["mia"]["mia_min_k"],
                                                      data["methods"]["retrain"]["figures"]["mia"]["mia_min_k"]))
    assert "Forget quality (KS p, loss) | Forget quality (KS p, truth ratio)" in md
    gold = [c.strip() for c in rows[3].strip("|").split("|")]
    assert gold[5:7] == [f"{vs['forget_quality_loss']:.3g}", f"{vs['forget_quality_truth_ratio']:.3g}"]
    # without perturbed answers neither the table nor the column appears
    plain = {k: {"figures": {f: v for f, v in r["figures"].items() if "truth_ratio" not in f.lower()},
                 "per_example": {s: [{k_: v for k_, v in e.items() if k_ != "truth_ratio"} for e in ex]
                                 for s, ex in r["per_example"].items()}} for k, r in results.items()}
    md = markdown(build_report(plain, retrained="retrain"))
    assert "Truth ratio" not in md and "truth ratio)" not in md and "Forget quality (KS p, loss)" in md


def test_cli_eval_prints_truth_ratios(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "model")
    retrained = save_model_dir("llama", tmp_path / "retrained", seed=5)
    (tmp_path / "forget.csv").write_text(
        "question,answer,perturbed_answer\n"
        + "".join(f'{e.prompt},{e.response},"{json.dumps(list(e.perturbed)).replace(chr(34), chr(34) * 2)}"\n'
                  for e in FORGET))
    data = ["--forget", str(tmp_path / "forget.csv"), "--prompt-column", "question", "--response-column", "answer"]
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), *data, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    forget = load_examples(tmp_path / "forget.csv", Columns(prompt="question", response="answer"), name="forget set")
    assert [e.perturbed for e in forget] == [e.perturbed for e in FORGET]
    expected = evaluate_sets(make_model("llama"), tokenizer_for("llama"), "causal", {"forget": forget})
    assert figures["forget_truth_ratio"] == pytest.approx(expected["forget_truth_ratio"], rel=1e-6)
    assert main(["eval", "--model", str(model_dir), *data, "--retrained", str(retrained), "--max-new-tokens", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "forget_truth_ratio" in out["original"] and "forget_truth_ratio" in out["retrain"]
    assert out["original"]["forget_quality_statistic"] == "truth_ratio"
    assert 0.0 <= out["original"]["forget_quality_truth_ratio"] <= 1.0 and "forget_quality_loss" in out["original"]
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer,perturbed_answer\nq,a,Paris|Rome\n")
    assert main(["eval", "--model", str(model_dir), "--forget", str(bad), "--prompt-column", "question",
                 "--response-column", "answer"]) == 2
    assert "JSON list of strings" in capsys.readouterr().err
