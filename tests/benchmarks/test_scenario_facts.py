"""Scenario 1 (benchmarks/unlearning/fictitious_facts.py): the generated people and their generic names,
and a smoke run of the whole script (few people, one split; its numbers mean nothing)."""

import json

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def ff():
    yield from benchmark_module("fictitious_facts")


def test_generic_names_are_nobodys_and_made_of_known_tokens(ff):
    people = ff.make_people(60, seed=3)
    trained, held_out = people[:50], people[50:]
    names = ff.generic_names(trained, 30, seed=3, taken=tuple(p.name for p in held_out))
    assert len(set(names)) == 30 and not set(names) & {p.name for p in people}
    assert names == ff.generic_names(trained, 30, seed=3, taken=tuple(p.name for p in held_out))  # seeded
    trained_words = {w for p in trained for w in p.name.split()}
    assert all(word in trained_words for n in names for word in n.split())


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
