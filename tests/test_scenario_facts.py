"""Scenario 1 (benchmarks/unlearning/fictitious_facts.py): the generated people and their generic names,
and a smoke run of the whole script (few people, one split; its numbers mean nothing)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "unlearning" / "fictitious_facts.py"


@pytest.fixture(scope="module")
def ff():
    spec = importlib.util.spec_from_file_location("fictitious_facts", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fictitious_facts"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("fictitious_facts", None)


def test_generic_names_are_nobodys_and_made_of_known_tokens(ff):
    people = ff.make_people(60, seed=3)
    names = ff.generic_names(people, 30, seed=3)
    assert len(set(names)) == 30 and not set(names) & {p.name for p in people}
    assert names == ff.generic_names(people, 30, seed=3)  # seeded
    vocab = ff.make_tokenizer(people).get_vocab()
    assert all(word in vocab for n in names for word in n.split())


def test_facts_with_generic_prompts_replace_only_the_name(ff):
    person = ff.make_people(1, seed=0)[0]
    facts = person.facts_with_generic_prompts(["Ann Bee", "Cal Dee"])
    for plain, fact in zip(person.facts(), facts):
        assert (fact.prompt, fact.response, fact.perturbed) == (plain.prompt, plain.response, plain.perturbed)
        assert fact.generic_prompts == (plain.prompt.replace(person.name, "Ann Bee"),
                                        plain.prompt.replace(person.name, "Cal Dee"))
        assert person.name not in " ".join(fact.generic_prompts)


def test_quick_run_writes_the_summary_of_every_method(ff, tmp_path):
    code = ff.main(["--quick", "--out", str(tmp_path), "--fractions", "0.05", "--eul-seeds", "0", "1",
                    "--methods", "eul", "eul-subject", "ga"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = summary["fractions"]["0.05"]
    assert set(methods) == {"original", "eul", "eul[s1]", "eul-subject", "eul-subject[s1]", "ga", "retrain"}
    for m in methods.values():
        assert 0.0 <= m["figures"]["forget_accuracy_memorised"] <= 1.0
    table = (tmp_path / "summary.md").read_text()
    assert "**eul, mean ± sd of 2 seeds**" in table and "**eul-subject, mean ± sd of 2 seeds**" in table
    assert (tmp_path / "forget_5pct" / "report.json").is_file()
