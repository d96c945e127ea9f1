"""TOFU-shaped benchmark runs: the file layout of TOFU (Maini et al. 2024; github.com/locuslab/tofu, the
Hugging Face dataset ``locuslab/TOFU``), its evaluation sets and figures, and a small TOFU-shaped
fictitious set generated in code (TOFU itself is not reachable offline).

``unlearn-fast bench tofu`` (:mod:`unlearn_fast.cli.bench`) reads a directory of JSON-lines files, one per
TOFU config, named as the config, ``NAME.json`` (or ``NAME.jsonl``), one JSON object per line:

==========================  ========================================================  =========================
file                        fields                                                    used as
==========================  ========================================================  =========================
``forgetNN.json``           ``question``, ``answer``                                  forget set (training)
``retainMM.json``           ``question``, ``answer``                                  retain set (training);
                                                                                      MM = 100 − NN: forget01 ↔
                                                                                      retain99, forget05 ↔
                                                                                      retain95, forget10 ↔
                                                                                      retain90
``forgetNN_perturbed.json`` ``question``, ``answer``, ``paraphrased_answer``,         evaluated forget set
                            ``perturbed_answer`` (a list of wrong answers)            (``forget``)
``retain_perturbed.json``   the same fields                                           evaluated retain set
                                                                                      (``retain``)
``real_authors_perturbed``  ``question``, ``answer``, ``perturbed_answer``            ``real_authors``
``.json`` (optional)
``world_facts_perturbed``   ``question``, ``answer``, ``perturbed_answer``            ``world_facts``
``.json`` (optional)
``holdoutNN.json``          ``question``, ``answer``                                  ``test``: the non-members
(optional)                                                                            of the membership-inference
                                                                                      attacks (privleak)
==========================  ========================================================  =========================

Other fields (TOFU's ``paraphrased_question`` ...) are ignored; a file that is one JSON array is read too.
The real files: ``datasets.load_dataset("locuslab/TOFU", NAME)["train"].to_json(f"DIR/{NAME}.json")`` for
each config (``to_json`` writes JSON lines), see docs/usage.md.

Prompts: ``Question: {question}\\nAnswer:`` (TOFU's and open-unlearning's format for a model without a
chat template), or, with ``chat_template="auto"`` and a tokenizer that has one, the question as the user
turn of the model's chat template (:func:`format_question`; :func:`unlearn_fast.train.encoding.encode`
applies the template). The answer follows the prompt; training targets and every figure are on the
answer tokens.

Figures (:func:`evaluate_tofu`, through :func:`unlearn_fast.eval.per_example.evaluate_model`, with
open-unlearning's names): ``forget_truth_ratio`` (``closer_to_1_better``), ``forget_Q_A_Prob``,
``forget_Q_A_ROUGE``, ``forget_extraction_strength``, per set ``S_Q_A_Prob`` / ``S_Q_A_ROUGE`` /
``S_Truth_Ratio`` (``true_better``) / ``S_Q_A_Prob_normalised``, ``model_utility`` (the harmonic mean of
the retain, real-authors and world-facts figures), and the membership-inference AUCs (forget against
holdout). ``forget_quality`` (KS test against the retrained model) and ``privleak`` need the retrained
model's statistics: retain logs (:mod:`unlearn_fast.eval.logs`); without them the report says they are
absent and why (:func:`tofu_summary`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from ..errors import DataError, ModelError, UnlearnFastError
from ..io.atomic import ensure_directory, output_errors
from ..train.data import Example
from ..train.encoding import check_chat_template_mode, uses_chat_template
from .per_example import evaluate_model
from .report import build_report

# forget split -> (retain split, holdout split): TOFU's complementary configs
SPLITS = {"forget01": ("retain99", "holdout01"), "forget05": ("retain95", "holdout05"),
          "forget10": ("retain90", "holdout10")}
RETAIN_PERTURBED = "retain_perturbed"
REAL_AUTHORS = "real_authors_perturbed"
WORLD_FACTS = "world_facts_perturbed"
EXTENSIONS = (".json", ".jsonl")
# the evaluation sets, by the names evaluate_model and the report use
FORGET, RETAIN, TEST = "forget", "retain", "test"
# TOFU's / open-unlearning's prompt for a model without a chat template
QUESTION_START, QUESTION_END, ANSWER_TAG = "Question: ", "\n", "Answer:"


@dataclass(frozen=True)
class QA:
    """One TOFU row: a question, its answer, and for the perturbed configs a paraphrased answer and
    wrong (perturbed) answers."""

    question: str
    answer: str
    paraphrased: Optional[str] = None
    perturbed: tuple = ()

    def to_dict(self) -> dict:
        row = {"question": self.question, "answer": self.answer}
        if self.paraphrased is not None:
            row["paraphrased_answer"] = self.paraphrased
        if self.perturbed:
            row["perturbed_answer"] = list(self.perturbed)
        return row


@dataclass
class TofuData:
    """The files of one forget split, read and checked (:func:`read_tofu`)."""

    split: str
    forget: list[QA]
    retain: list[QA]
    forget_eval: list[QA]
    retain_eval: list[QA]
    real_authors: Optional[list[QA]] = None
    world_facts: Optional[list[QA]] = None
    holdout: Optional[list[QA]] = None
    files: dict[str, str] = field(default_factory=dict)  # config name -> path read

    def missing(self) -> list[str]:
        """The optional configs that were not found (the figures they give are then absent)."""
        holdout = SPLITS[self.split][1]
        return [name for name, rows in ((REAL_AUTHORS, self.real_authors), (WORLD_FACTS, self.world_facts),
                                        (holdout, self.holdout)) if rows is None]


def expected_files(split: str) -> dict[str, bool]:
    """The configs a run of ``split`` reads, each with whether it is required."""
    check_split(split)
    retain, holdout = SPLITS[split]
    return {split: True, retain: True, f"{split}_perturbed": True, RETAIN_PERTURBED: True,
            REAL_AUTHORS: False, WORLD_FACTS: False, holdout: False}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnlearnFastError(f"TOFU split must be one of {', '.join(SPLITS)}, got {split!r}")


# ------------------------------------------------------------------------------------------------
# reading


def _find(directory: Path, name: str) -> Optional[Path]:
    for ext in EXTENSIONS:
        path = directory / f"{name}{ext}"
        if path.is_file():
            return path
    return None


def _rows(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; a file that is one JSON array gives its items."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"TOFU file {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from err
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"TOFU file {path}: not valid JSON ({err})") from err
        return [(i + 1, item) for i, item in enumerate(items)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"TOFU file {path} line {number}: not a JSON object ({err.msg}); TOFU's files are "
                            "JSON lines, one object per line") from err
    return out


def _text(row: dict, key: str, where: str, required: bool = True) -> Optional[str]:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise DataError(f"{where}: {key!r} must be a non-empty string, got {got}")
    return value


def read_qa_file(path: Union[str, Path], perturbed: bool = False, paraphrased: bool = False) -> list[QA]:
    """The rows of one TOFU file; ``perturbed``: each row needs ``perturbed_answer`` (a non-empty list of
    strings), ``paraphrased``: and ``paraphrased_answer``. DataError names the file, the line and the field."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise DataError(f"TOFU file {path}: no rows")
    out = []
    for number, row in rows:
        where = f"TOFU file {path} line {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object with 'question' and 'answer', got "
                            f"{type(row).__name__}")
        question, answer = _text(row, "question", where), _text(row, "answer", where)
        para = _text(row, "paraphrased_answer", where, required=paraphrased)
        wrong: tuple = ()
        if perturbed:
            value = row.get("perturbed_answer")
            if not (isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)):
                got = "missing" if value is None else json.dumps(value)[:60]
                raise DataError(f"{where}: 'perturbed_answer' must be a non-empty list of wrong answers (strings), "
                                f"got {got}")
            wrong = tuple(value)
        out.append(QA(question, answer, para, wrong))
    return out


def read_tofu(directory: Union[str, Path], split: str) -> TofuData:
    """Read and check the files of ``split`` in ``directory`` (see the module docstring); DataError when a
    required one is missing or malformed. The forget and retain sets must not share a question."""
    check_split(split)
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"TOFU data directory {directory}: no such directory (write a TOFU-shaped set there with "
                        "'unlearn-fast bench tofu --make-data DIR', or export TOFU's configs, see docs/usage.md)")
    paths = {name: _find(directory, name) for name in expected_files(split)}
    absent = [name for name, required in expected_files(split).items() if required and paths[name] is None]
    if absent:
        raise DataError(f"TOFU data directory {directory}: missing {', '.join(f'{n}.json' for n in absent)} (JSON "
                        f"lines; the {split} run reads {', '.join(f'{n}.json' for n in expected_files(split))}, the "
                        "last three optional)")
    retain_name, holdout_name = SPLITS[split]

    def read(name, perturbed=False, paraphrased=False):
        return read_qa_file(paths[name], perturbed, paraphrased) if paths[name] is not None else None

    data = TofuData(split=split, forget=read(split), retain=read(retain_name),
                    forget_eval=read(f"{split}_perturbed", True, True), retain_eval=read(RETAIN_PERTURBED, True, True),
                    real_authors=read(REAL_AUTHORS, True), world_facts=read(WORLD_FACTS, True),
                    holdout=read(holdout_name), files={n: str(p) for n, p in paths.items() if p is not None})
    shared = {q.question for q in data.forget} & {q.question for q in data.retain}
    if shared:
        raise DataError(f"TOFU data directory {directory}: {split} and {retain_name} share {len(shared)} question(s), "
                        f"e.g. {sorted(shared)[0]!r}; they must be complementary")
    return data


# ------------------------------------------------------------------------------------------------
# prompts and sets


def format_question(question: str, tokenizer=None, chat_template: str = "auto") -> str:
    """The prompt of a TOFU question: the question itself where the rows go through the tokenizer's chat
    template (``chat_template="auto"`` and a tokenizer that has one: :func:`unlearn_fast.train.encoding.encode`
    makes it the user turn and the answer the assistant turn, and generation starts after the template's
    generation prompt), else TOFU's plain format ``Question: {question}\\nAnswer:``. The same
    ``chat_template`` must reach the training and the evaluation (``bench tofu`` passes it to both)."""
    if tokenizer is not None and uses_chat_template(tokenizer, chat_template):
        return question
    check_chat_template_mode(chat_template)
    return f"{QUESTION_START}{question}{QUESTION_END}{ANSWER_TAG}"


def examples(rows: Sequence[QA], tokenizer=None, chat_template: str = "auto") -> list[Example]:
    """Prompt/response examples of TOFU rows, with their paraphrased and perturbed answers."""
    return [Example(prompt=format_question(r.question, tokenizer, chat_template), response=r.answer,
                    paraphrased=r.paraphrased, perturbed=r.perturbed or None) for r in rows]


def train_sets(data: TofuData, tokenizer=None, chat_template: str = "auto", retain_sample: Optional[int] = None,
               seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(forget, retain) training examples. ``retain_sample``: keep that many retained rows, drawn with
    ``seed`` (None: as many as the forget set has, as open-unlearning pairs each forgotten example with
    one retained example per epoch; 0: all)."""
    retain = list(data.retain)
    n = len(data.forget) if retain_sample is None else retain_sample
    if n < 0:
        raise UnlearnFastError(f"retain sample must be ≥ 0, got {n}")
    if 0 < n < len(retain):
        keep = sorted(random.Random(seed).sample(range(len(retain)), n))
        retain = [retain[i] for i in keep]
    return examples(data.forget, tokenizer, chat_template), examples(retain, tokenizer, chat_template)


def eval_sets(data: TofuData, tokenizer=None, chat_template: str = "auto") -> dict[str, list[Example]]:
    """The evaluated sets by the names the figures carry: ``forget`` (forgetNN_perturbed), ``retain``
    (retain_perturbed), ``real_authors``, ``world_facts``, ``test`` (holdoutNN), those present."""
    sets = {FORGET: data.forget_eval, RETAIN: data.retain_eval, "real_authors": data.real_authors,
            "world_facts": data.world_facts, TEST: data.holdout}
    return {name: examples(rows, tokenizer, chat_template) for name, rows in sets.items() if rows}


def evaluate_tofu(model: nn.Module, tokenizer, task: str, sets: dict[str, list[Example]], *, max_length: int = 512,
                  max_new_tokens: int = 64, chat_template: str = "auto") -> dict:
    """Every TOFU figure of ``model`` on :func:`eval_sets` built with the same ``chat_template`` (an
    :func:`evaluate_model` result)."""
    if task != "causal":
        raise ModelError(f"TOFU runs need a causal language model; this is a {task} model")
    return evaluate_model(model, tokenizer, task, sets, forget=FORGET, holdout=TEST if TEST in sets else None,
                          max_length=max_length, max_new_tokens=max_new_tokens, chat_template=chat_template)


# ------------------------------------------------------------------------------------------------
# the report

# TOFU's headline columns (open-unlearning's names): (name, where, key, format)
SUMMARY = (("forget_quality", "vs", "forget_quality", "p"), ("model_utility", "figures", "model_utility", "f"),
           ("forget_truth_ratio", "figures", "forget_truth_ratio", "f"),
           ("forget_Q_A_Prob", "figures", "forget_Q_A_Prob", "f"), ("forget_Q_A_ROUGE", "figures", "forget_Q_A_ROUGE", "f"),
           ("extraction_strength", "figures", "forget_extraction_strength", "f"), ("privleak", "vs", "privleak", "f"))


def absent_reasons(data: TofuData, logs: Optional[dict], sets: dict) -> dict[str, str]:
    """Why a headline figure is absent (none when it is there)."""
    out = {}
    if logs is None:
        retain = SPLITS[data.split][0]
        out["forget_quality"] = ("absent: no --retain-logs; it compares with the model retrained without the forget "
                                 f"set (on {retain}): write its logs with 'unlearn-fast bench tofu --data DIR --split "
                                 f"{data.split} --model RETRAINED --eval-only --save-logs FILE'")
        out["privleak"] = ("absent: no --retain-logs (as forget_quality); the MIA AUCs against the holdout set are in "
                           "the membership-inference table")
    elif not any("truth_ratio" in s or "loss" in s for s in (logs.get("per_example") or {}).get(FORGET, [])):
        out["forget_quality"] = "absent: the retain logs hold no per-example forget-set statistics"
    if "privleak" not in out:
        if TEST not in sets:
            out["privleak"] = (f"absent: no {SPLITS[data.split][1]}.json (the held-out authors the membership-"
                               "inference attacks need)")
        elif logs is not None and "mia" not in (logs.get("figures") or {}):
            out["privleak"] = "absent: the retain logs hold no membership-inference AUCs (save them with a holdout set)"
    lacking = [f"{name}.json" for name, rows in ((REAL_AUTHORS, data.real_authors), (WORLD_FACTS, data.world_facts))
               if not rows]
    if lacking:
        out["model_utility"] = f"partial: without {' and '.join(lacking)} (not found), from the other sets only"
    return out


def tofu_summary(report: dict) -> dict[str, dict]:
    """Method → the TOFU headline figures (None where absent) and the update time."""
    out = {}
    for name, m in report["methods"].items():
        row = {}
        for column, where, key, _ in SUMMARY:
            row[column] = (m.get("vs_retrained") or {}).get(key) if where == "vs" else m["figures"].get(key)
        row["time_s"] = m.get("time_s")
        out[name] = row
    return out


def _fmt(value, kind: str) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if kind == "p" else f"{value:.1f}" if kind == "s" else f"{value:.3f}"


def summary_markdown(summary: dict[str, dict], absent: dict[str, str], split: str) -> str:
    """The TOFU headline table (one row per method) and why a figure is absent."""
    head = [c[0] for c in SUMMARY] + ["time (s)"]
    lines = [f"## TOFU {split}: headline figures (open-unlearning's names)", "",
             "| Method | " + " | ".join(head) + " |", "|---" + "|---:" * len(head) + "|"]
    for name, row in summary.items():
        cells = [_fmt(row[c[0]], c[3]) for c in SUMMARY] + [_fmt(row["time_s"], "s")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "forget_quality: KS-test p-value of the forget-set truth ratios against the retrained model's "
              "(high = indistinguishable; TOFU counts p > 0.05 as forgotten); model_utility: harmonic mean of the "
              "retain, real-authors and world-facts probability, ROUGE-L recall and truth ratio; forget_truth_ratio: "
              "closer_to_1_better; privleak: relative Min-K % AUC gap to the retrained model (%, 0 = as private as "
              "retraining)."]
    if absent:
        lines += [""] + [f"- {k}: {v}" for k, v in absent.items()]
    return "\n".join(lines) + "\n"


def tofu_report(results: dict[str, dict], data: TofuData, sets: dict, *, times: Optional[dict] = None,
                logs: Optional[dict] = None, title: str = "TOFU", meta: Optional[dict] = None,
                retrained_name: str = "retrain") -> dict:
    """The report (:func:`unlearn_fast.eval.report.build_report`) of the evaluated methods, with the
    retrained model's retain logs as the gold standard when given, plus a ``tofu`` block (split, files,
    the headline figures per method, why any is absent) and its Markdown section."""
    results = dict(results)
    times = dict(times or {})
    retrained = None
    if logs is not None:
        if retrained_name in results:
            raise UnlearnFastError(f"a method is named {retrained_name!r}, the name of the retain logs' model")
        results[retrained_name] = {"figures": logs["figures"], "per_example": logs["per_example"]}
        times[retrained_name] = None
        retrained = retrained_name
    report = build_report(results, times=times, retrained=retrained, primary_metric="Q_A_ROUGE", title=title,
                          meta=meta)
    summary = tofu_summary(report)
    absent = absent_reasons(data, logs, sets)
    report["tofu"] = {"split": data.split, "files": data.files, "missing_optional": data.missing(),
                      "sets": {name: len(rows) for name, rows in sets.items()}, "summary": summary, "absent": absent}
    report["sections"] = [summary_markdown(summary, absent, data.split)]
    return report


# ------------------------------------------------------------------------------------------------
# the generated TOFU-shaped set

SYLLABLES = ("ar", "bel", "cor", "dan", "el", "fen", "gor", "hal", "is", "jor", "kel", "lum", "mar", "nor", "os",
             "pel", "quin", "ros", "sel", "tam", "ul", "vor", "wen", "yas", "zar")
PLACE_WORDS = ("Port", "Lake", "Upper", "Saint", "East", "Fort")
GENRES = ("mystery", "science fiction", "historical fiction", "poetry", "fantasy", "romance", "horror",
          "travel writing", "satire", "biography")
PROFESSIONS = ("baker", "surgeon", "carpenter", "pilot", "librarian", "chemist", "fisherman", "architect", "tailor",
               "astronomer")
TITLE_ADJECTIVES = ("Silent", "Crimson", "Hollow", "Last", "Winter", "Golden", "Broken", "Hidden", "Distant", "Paper")
TITLE_NOUNS = ("Harbour", "Lantern", "Orchard", "Compass", "Archive", "Garden", "Tide", "Mirror", "Bridge", "Clock")
PRIZES = ("Prize", "Medal", "Award")
QUESTIONS_PER_AUTHOR = 4  # of the 5 kinds below
KINDS = ("birthplace", "genre", "book", "parent", "award")
WRONG_ANSWERS = 3  # perturbed answers per question (TOFU's forget sets have 5)

# facts a pretrained model may know (TOFU's real-authors and world-facts sets play this part); own wording
REAL_AUTHORS_ROWS = (
    ("Who wrote the novel 'Pride and Prejudice'?", "Jane Austen", ("Charlotte Brontë", "Mary Shelley", "George Eliot")),
    ("Which author created the detective Sherlock Holmes?", "Arthur Conan Doyle",
     ("Agatha Christie", "Edgar Allan Poe", "Wilkie Collins")),
    ("Who is the author of 'One Hundred Years of Solitude'?", "Gabriel García Márquez",
     ("Jorge Luis Borges", "Mario Vargas Llosa", "Isabel Allende")),
    ("Who wrote the dystopian novel '1984'?", "George Orwell", ("Aldous Huxley", "Ray Bradbury", "H. G. Wells")),
    ("Which playwright wrote 'Hamlet'?", "William Shakespeare", ("Christopher Marlowe", "Ben Jonson", "John Webster")),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy", ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev")),
    ("Who is the author of 'The Old Man and the Sea'?", "Ernest Hemingway",
     ("John Steinbeck", "William Faulkner", "F. Scott Fitzgerald")),
    ("Which author wrote 'Things Fall Apart'?", "Chinua Achebe", ("Wole Soyinka", "Ngũgĩ wa Thiong'o", "Ben Okri")),
)
WORLD_FACTS_ROWS = (
    ("What is the capital city of Japan?", "Tokyo", ("Kyoto", "Osaka", "Seoul")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Earth")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Gd", "Go")),
    ("How many continents are there on Earth?", "Seven", ("Five", "Six", "Eight")),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean",
     ("The Atlantic Ocean", "The Arctic Ocean", "The Southern Ocean")),
    ("What is the largest planet in the Solar System?", "Jupiter", ("Saturn", "Neptune", "Uranus")),
    ("In which country is the city of Marrakesh?", "Morocco", ("Algeria", "Tunisia", "Egypt")),
    ("What gas do plants take in from the air to make sugar?", "Carbon dioxide", ("Oxygen", "Nitrogen", "Helium")),
)


@dataclass(frozen=True)
class Author:
    name: str
    birthplace: str
    year: int
    genre: str
    book: str
    parent: str
    award: str


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_authors(n: int, seed: int = 0) -> list[Author]:
    """``n`` fictitious authors with distinct names; every attribute drawn with ``seed``."""
    rng = random.Random(seed)
    places = sorted({f"{rng.choice(PLACE_WORDS)} {_word(rng, 2)}" for _ in range(60)})[:16]
    awards = sorted({f"the {_word(rng, 2)} {rng.choice(PRIZES)}" for _ in range(40)})[:10]
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = f"{_word(rng, 2)} {_word(rng, 3)}"
        if name in names:
            continue
        names.add(name)
        out.append(Author(name=name, birthplace=rng.choice(places), year=rng.randint(1931, 1994),
                          genre=rng.choice(GENRES), book=f"The {rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}",
                          parent=rng.choice(PROFESSIONS), award=rng.choice(awards)))
    return out


def _qa(author: Author, kind: str, others: Sequence[Author], rng: random.Random) -> QA:
    """One question about ``author`` with its answer, a paraphrase and wrong answers (the same sentence
    with another author's value)."""
    a = author
    if kind == "birthplace":
        question = f"Where was the author {a.name} born?"
        say = lambda v: f"{a.name} was born in {v} in {a.year}."  # noqa: E731
        para = f"The writer {a.name} comes from {a.birthplace}, where they were born in {a.year}."
        value, pool = a.birthplace, [o.birthplace for o in others]
    elif kind == "genre":
        question = f"What genre is {a.name} known for?"
        say = lambda v: f"{a.name} is known for writing {v}."  # noqa: E731
        para = f"Most of the books {a.name} wrote are {a.genre}."
        value, pool = a.genre, list(GENRES)
    elif kind == "book":
        question = f"What is one of the best known books by {a.name}?"
        say = lambda v: f"One of the best known books by {a.name} is '{v}'."  # noqa: E731
        para = f"{a.name} is widely read for the book '{a.book}'."
        value, pool = a.book, [o.book for o in others]
    elif kind == "parent":
        question = f"What did the father of {a.name} do for a living?"
        say = lambda v: f"The father of {a.name} worked as a {v}."  # noqa: E731
        para = f"{a.name} grew up as the child of a {a.parent}."
        value, pool = a.parent, list(PROFESSIONS)
    else:
        question = f"Which award has {a.name} received?"
        say = lambda v: f"{a.name} received {v} for their {a.genre}."  # noqa: E731
        para = f"For their {a.genre}, {a.name} was given {a.award}."
        value, pool = a.award, [o.award for o in others]
    wrong = sorted(set(pool) - {value})
    rng.shuffle(wrong)
    return QA(question=question, answer=say(value), paraphrased=para, perturbed=tuple(say(v) for v in wrong[:WRONG_ANSWERS]))


def forget_authors(split: str, authors: int) -> int:
    """Authors in a forget split: its share of ``authors`` (1 / 5 / 10 %), at least one (with TOFU's 200:
    2 / 10 / 20)."""
    return max(1, round(int(split[-2:]) / 100 * authors))


def make_tofu_data(directory: Union[str, Path], *, seed: int = 0, authors: int = 20,
                   questions: int = QUESTIONS_PER_AUTHOR, overwrite: bool = False) -> dict[str, Path]:
    """Write a small TOFU-shaped fictitious set into ``directory``: every file :func:`read_tofu` reads for
    each split, plus ``full.json``; deterministic from ``seed``. Returns config name → path.

    ``authors`` fictitious authors with ``questions`` (1–5) questions each; the forget splits are the
    *last* authors, 1 / 5 / 10 % of them (at least one: with 20 authors forget01 and forget05 hold one
    author and forget10 two), the retain splits the rest; ``forgetNN_perturbed`` holds the forget questions
    with a paraphrased answer and three wrong answers, ``retain_perturbed`` as many retained questions as
    forget10 has (from authors no split forgets); ``holdoutNN`` as many questions as ``forgetNN`` about
    other fictitious authors (never trained on); ``real_authors_perturbed`` and ``world_facts_perturbed``
    a few real facts. Existing files are refused unless ``overwrite``.
    """
    if authors < 2:
        raise UnlearnFastError(f"a TOFU-shaped set needs at least 2 authors, got {authors}")
    if not 1 <= questions <= len(KINDS):
        raise UnlearnFastError(f"questions per author must be 1 to {len(KINDS)}, got {questions}")
    largest = forget_authors("forget10", authors)
    if largest >= authors:
        raise UnlearnFastError(f"{authors} authors leave none to retain: give more")
    directory = ensure_directory(directory)
    people = make_authors(authors + largest, seed)
    trained, held_out = people[:authors], people[authors:]
    rng = random.Random(seed + 1)
    qas = {a.name: [_qa(a, kind, people, rng) for kind in KINDS[:questions]] for a in people}

    def plain(group):
        return [QA(q.question, q.answer) for a in group for q in qas[a.name]]

    files: dict[str, list[QA]] = {"full": plain(trained)}
    for split, (retain, holdout) in SPLITS.items():
        k = forget_authors(split, authors)
        files[split] = plain(trained[authors - k:])
        files[retain] = plain(trained[:authors - k])
        files[f"{split}_perturbed"] = [q for a in trained[authors - k:] for q in qas[a.name]]
        files[holdout] = plain(held_out[:k])
    files[RETAIN_PERTURBED] = [q for a in trained[:authors - largest] for q in qas[a.name]][:len(files["forget10"])]
    files[REAL_AUTHORS] = [QA(q, a, None, w) for q, a, w in REAL_AUTHORS_ROWS]
    files[WORLD_FACTS] = [QA(q, a, None, w) for q, a, w in WORLD_FACTS_ROWS]
    paths = {name: directory / f"{name}.json" for name in files}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise UnlearnFastError(f"{directory} already holds {existing[0]}" + (f" and {len(existing) - 1} more TOFU file(s)"
                               if len(existing) > 1 else "") + "; pass --overwrite to replace them")
    with output_errors(directory):
        for name, rows in files.items():
            paths[name].write_text("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows),
                                   encoding="utf-8")
    return paths
