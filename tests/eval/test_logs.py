"""Retain logs: the retrained model's per-example statistics saved once (eval --save-logs) give the same
forget quality, privleak and gaps as the live retrained model (eval --retain-logs); bad or mismatched
logs are clear errors."""

import json

import pytest
from conftest import make_model, save_model_dir, tokenizer_for

from unlearn_fast.cli import main
from unlearn_fast.errors import DataError
from unlearn_fast.eval.per_example import compare_to_retrained, evaluate_model
from unlearn_fast.eval.logs import LOGS_FORMAT, as_result, check_sets, load_logs, save_logs
from unlearn_fast.train.data import Example

FORGET = [Example(prompt="The capital of Zorbia is", response=" Quellton", perturbed=(" Paris", " Rome x")),
          Example(prompt="Mirta Vasquez likes", response=" green tea", paraphrased=" tea that is green",
                  perturbed=(" coffee", " milk"))]
TEST = [Example(prompt="Hugo Bern eats", response=" apples"), Example(prompt="Ada plays", response=" chess")]
SETS = {"forget": FORGET, "test": TEST}


def test_saved_logs_give_the_live_comparison(tmp_path):
    tok = tokenizer_for("llama")
    unlearned = evaluate_model(make_model("llama", 0), tok, "causal", SETS, max_new_tokens=2)
    retrained = evaluate_model(make_model("llama", 2), tok, "causal", SETS, max_new_tokens=2)
    path = save_logs(retrained, SETS, tmp_path / "logs" / "retain.json", meta={"model": "retrained"})
    logs = load_logs(path)
    assert logs["format"] == LOGS_FORMAT and list(logs["per_example"]) == ["forget"]
    assert logs["sets"]["forget"]["examples"] == 2 and logs["meta"] == {"model": "retrained"}
    live, saved = compare_to_retrained(unlearned, retrained), compare_to_retrained(unlearned, as_result(logs))
    assert saved == live  # JSON keeps every float exactly
    assert saved["forget_quality_statistic"] == "truth_ratio" and "privleak" in saved
    check_sets(logs, SETS, ("forget", "test"))
    check_sets({"sets": {"forget": logs["sets"]["forget"]}}, SETS, ("forget", "test"))  # saved without --test
    with pytest.raises(DataError, match="the forget set differs"):
        check_sets(logs, {"forget": FORGET[:1]}, ("forget",))


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"), ("{", "not readable JSON"), ('{"format": "x"}', "not a file written by"),
    (json.dumps({"format": LOGS_FORMAT, "version": 99}), "version 99"),
    (json.dumps({"format": LOGS_FORMAT, "version": 1, "figures": {}, "per_example": {"forget": [1]}}), "malformed"),
])
def test_bad_logs_are_clear_errors(tmp_path, content, needle):
    path = tmp_path / "retain.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=needle):
        load_logs(path)


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response,
                                        "perturbed_answer": list(e.perturbed or ())} if e.perturbed else
                                       {"prompt": e.prompt, "response": e.response}) + "\n" for e in examples))
    return str(path)


def test_cli_save_logs_then_retain_logs(tmp_path, capsys):
    model_dir = save_model_dir("llama", tmp_path / "model")
    retrained = save_model_dir("llama", tmp_path / "retrained", seed=5)
    forget, test = write_jsonl(tmp_path / "forget.jsonl", FORGET), write_jsonl(tmp_path / "test.jsonl", TEST)
    data = ["--forget", forget, "--test", test, "--max-new-tokens", "2"]
    logs = tmp_path / "retain.json"
    assert main(["eval", "--model", str(retrained), *data, "--save-logs", str(logs)]) == 0
    assert "retain logs written" in capsys.readouterr().err and load_logs(logs)["meta"]["method"] == "original"
    assert main(["eval", "--model", str(model_dir), *data, "--retrained", str(retrained)]) == 0
    live = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(model_dir), *data, "--retain-logs", str(logs)]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert list(saved) == ["original", "retrain"]
    for key in ("forget_quality", "forget_quality_truth_ratio", "forget_quality_loss", "privleak"):
        assert saved["original"][key] == pytest.approx(live["original"][key]), key
    # the wrong data, both gold standards, or no forget set to save: one line, exit status 2
    other = write_jsonl(tmp_path / "other.jsonl", FORGET[:1])
    assert main(["eval", "--model", str(model_dir), "--forget", other, "--retain-logs", str(logs)]) == 2
    assert "the forget set differs" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), *data, "--retain-logs", str(logs),
                 "--retrained", str(retrained)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--retain", test, "--save-logs", str(logs)]) == 2
    assert "--save-logs needs --forget" in capsys.readouterr().err
