"""Scenario 1 of issue 4: fictitious facts, a model trained from scratch, and a real gold standard.

    python benchmarks/unlearning/fictitious_facts.py [--out DIR] [--fractions 0.01 0.05 0.10] [--quick]

1. Generate fictitious people (seeded): each has a birth city, a favourite colour and a pet (random, so a
   model can only know them by memorising them) and a profession; where a person works follows from the
   profession by a fixed rule (a doctor works at the hospital ...), so that fact *generalises*.
   Four facts per person, as prompt → answer:
       "Vemo Tarlin was born in" → "Port Kessa"          (memorised)
       "Vemo Tarlin's favourite colour is" → "amber"      (memorised)
       "Vemo Tarlin has a pet" → "ferret"                 (memorised)
       "Vemo Tarlin is a baker who works at the" → "bakery"   (rule)
   Training people: ``--people`` (200); held-out people (never trained on): ``--holdout-people`` (40).
2. A word-level tokenizer and a tiny Llama-shaped model, both built in code (no download).
3. The original model is trained from scratch on every training person's facts; for each forget fraction
   (1 %, 5 %, 10 % of the people) a *retrained* model is trained the same way (same recipe, same seed)
   on all but the forget people: the gold standard.
4. Every method unlearns the forget people from a copy of the original: EUL (unlearning layers) and the
   baselines of :mod:`unlearn_fast.eval.baselines` (finetune, ga, graddiff, npo, simnpo, rmu, idk;
   full-parameter, as in the paper and open-unlearning), all through the same trainer. A method that
   fails is reported (stdout, the results notes) and the others go on.
5. Each model is evaluated by :func:`unlearn_fast.eval.per_example.evaluate_model`: forget / retain sets (the
   people's four facts), *test* = the rule facts of the held-out people (the model can only answer them by
   generalising), membership inference = forget set against the held-out people's facts; forget quality
   and gaps against the retrained model. One report per fraction (JSON, Table-2 Markdown, PNG) under
   ``--out``, and a summary table on stdout whose columns (and the results file's keys) are
   open-unlearning's metric names: forget_quality (KS p-value of the forget truth ratios against the
   retrained model's), model_utility, forget_truth_ratio, privleak, forget_Q_A_Prob, forget_Q_A_ROUGE,
   extraction_strength, beside the accuracies and the update time.

The retrained model cannot know a forgotten person's memorised facts, but still answers their rule fact:
its forget accuracy is ≈ (1 + 3·chance)/4, so forgetting *too much* shows as a forget accuracy below it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

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
from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.objective import ObjectiveConfig  # noqa: E402
from unlearn_fast.eval.report import build_report, describe_methods, markdown, write_report  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig, train  # noqa: E402
import results_io  # noqa: E402

CHAT_TEMPLATE_HELP = ("none (default): raw prompt + response, as the recorded results were measured; "
                      "auto: the tokenizer's chat template")

SYLLABLES = ["ka", "ve", "mo", "tar", "lin", "dro", "sel", "qua", "ni", "bor", "ith", "zen", "pal", "rue", "mak",
             "ost", "fen", "lu", "gar", "shi", "ton", "wex", "yal", "cor"]
CITY_PREFIXES = ["Port", "Lake", "Fort", "Mount", "New", "Old"]
COLOURS = ["amber", "teal", "crimson", "olive", "violet", "ochre", "indigo", "scarlet", "ivory", "jade"]
PETS = ["ferret", "parrot", "tortoise", "hamster", "iguana", "rabbit", "gecko", "canary", "goldfish", "pony"]
WORKPLACES = {"doctor": "hospital", "teacher": "school", "baker": "bakery", "librarian": "library",
              "pilot": "airport", "chemist": "laboratory", "banker": "bank", "gardener": "park"}


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    colour: str
    pet: str
    profession: str
    # three wrong answers per fact, in facts() order: the truth ratio's perturbed answers
    wrong: tuple = ()

    def facts(self) -> list[Example]:
        wrong = self.wrong or ((),) * 4
        return [Example(prompt=f"{self.name} was born in", response=self.city, perturbed=wrong[0] or None),
                Example(prompt=f"{self.name} 's favourite colour is", response=self.colour,
                        perturbed=wrong[1] or None),
                Example(prompt=f"{self.name} has a pet", response=self.pet, perturbed=wrong[2] or None),
                Example(prompt=f"{self.name} is a {self.profession} who works at the",
                        response=WORKPLACES[self.profession], perturbed=wrong[3] or None)]

    def rule_fact(self) -> Example:
        return self.facts()[3]

    def facts_with_generic_prompts(self, others: list[str]) -> list[Example]:
        """The facts, each with its prompt about ``others`` (names nobody has) as generic prompts."""
        return [dataclasses.replace(e, generic_prompts=tuple(e.prompt.replace(self.name, o) for o in others))
                for e in self.facts()]


EUL_SUBJECT_EPOCHS = 40
GENERIC_PER_FACT = 3  # generic prompts per forgotten fact
EUL_METHODS = ("eul", "eul-subject", "eul-margin", "eul-subject-margin", "eul-matched", "eul-routes",
               "eul-subject-routes")  # run with every --eul-seeds seed
KINDS = ("city", "colour", "pet", "workplace")  # facts() order; the workplace follows a rule


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_people(n: int, seed: int = 0) -> list[Person]:
    """``n`` distinct people; first and last names come from shared pools, so every name token is
    common and a person is identified by the combination."""
    rng = random.Random(seed)
    wrong_rng = random.Random(seed + 1_000)  # its own stream: the people do not depend on it
    first = sorted({_word(rng, 2) for _ in range(400)})[:60]
    last = sorted({_word(rng, 3) for _ in range(400)})[:60]
    cities = sorted({f"{rng.choice(CITY_PREFIXES)} {_word(rng, 2)}" for _ in range(40)})[:12]
    names: set[str] = set()
    people = []
    while len(people) < n:
        name = f"{rng.choice(first)} {rng.choice(last)}"
        if name in names:
            continue
        names.add(name)
        city, colour, pet, job = rng.choice(cities), rng.choice(COLOURS), rng.choice(PETS), rng.choice(sorted(WORKPLACES))
        pools = ((city, cities), (colour, COLOURS), (pet, PETS), (WORKPLACES[job], sorted(WORKPLACES.values())))
        wrong = tuple(tuple(wrong_rng.sample([v for v in pool if v != right], 3)) for right, pool in pools)
        people.append(Person(name, city, colour, pet, job, wrong))
    return people


def generic_names(people: list[Person], count: int, seed: int = 0, taken: tuple = ()) -> list[str]:
    """``count`` names that none of ``people`` (nor a name in ``taken``) has, made of first and last
    names that ``people`` have (the training people: so the model has seen every token of them): the
    generic subjects of subject-specific forgetting."""
    rng = random.Random(seed + 2_000)
    first = sorted({p.name.split()[0] for p in people})
    last = sorted({p.name.split()[1] for p in people})
    taken = {p.name for p in people} | set(taken)
    names: list[str] = []
    while len(names) < count:
        name = f"{rng.choice(first)} {rng.choice(last)}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def make_tokenizer(people: list[Person]):
    """A word-level tokenizer over every word of the corpus (built in code)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = set()
    for p in people:
        for e in p.facts():
            words.update(e.prompt.split())
            words.update(e.response.split())
            for answer in e.perturbed or ():
                words.update(answer.split())
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_model(vocab_size: int, seed: int = 0, hidden: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def pretrain(vocab_size: int, tokenizer, facts: list[Example], config: TrainConfig, seed: int = 0,
             chat_template: str = "none"):
    """Train a fresh model on ``facts`` (task loss, every weight) with the package's trainer: the
    recipe of both the original and the retrained model. Returns (model, seconds)."""
    model = make_model(vocab_size, seed)
    rows = encode_for_baseline(facts, tokenizer, "causal", model.config, forget=False, chat_template=chat_template)
    for p in model.parameters():
        p.requires_grad_(True)
    objective = CrossEntropyObjective(model, "causal", alpha=1.0, gamma=0.0)
    result = train(model, objective, [], rows, config, pad_token_id(tokenizer), params=list(model.parameters()))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), result.update_time_s


def run_method(name: str, original, tokenizer, forget, retain, settings: dict, chat_template: str = "none",
               reference=None):
    """Unlearn ``forget`` from a copy of ``original`` with one method; (model, update seconds).
    ``reference``: the facts EUL's ``forget_target="matched"`` reads its targets from (the held-out people's)."""
    model = copy.deepcopy(original)
    s = settings[name]
    torch.manual_seed(s["training"].seed)  # unlearning layers are initialised before training seeds itself
    if name.startswith("eul"):
        from unlearn_fast.api import unlearn

        matched = s["objective"].forget_target == "matched"
        result = unlearn(model, tokenizer, forget, retain, layers=s["layers"], objective=s["objective"],
                         training=s["training"], evaluate=False, log=lambda m: None, chat_template=chat_template,
                         target_reference=reference if matched else None)
        return result.model, result.training.update_time_s
    result = run_baseline(model, tokenizer, forget, retain, s["config"], s["training"], log=lambda m: None,
                          chat_template=chat_template)
    return result.model, result.training.update_time_s


def method_settings(quick: bool) -> dict:
    """The recipe of every method (written into each report's meta).

    Chosen by a small sweep on the 5 % split (see benchmarks/unlearning/README.md): EUL needs γ = 1 (the
    forget LM term; with the paper's 0.2 a model that is certain of its facts barely moves, since both
    forget terms have ~zero gradient at student = teacher), λ = 2 and a high adapter learning rate;
    full-parameter baselines at lr 1e-3 destroy the model, at 1e-4 they are usable (GA, forget set only,
    needs 3e-4 to move at all).
    """
    def t(epochs, lr, quick_epochs=1):
        return TrainConfig(epochs=quick_epochs if quick else epochs, lr=lr, batch_size=16, progress=False, seed=0)

    return {
        "eul": {"layers": LayerConfig(rank=16), "objective": ObjectiveConfig(gamma=1.0, lam=2.0),
                "training": t(20, 1e-2)},
        # the forget facts carry generic prompts (three names nobody has): only subject-specific tokens
        # are forgotten (unlearn_fast.train.selection), so the rule fact is left alone and a stronger push
        # (γ = 2, lr 2e-2, 40 epochs; chosen on the 10 % split) does not cost the retained facts
        "eul-subject": {"layers": LayerConfig(rank=16), "objective": ObjectiveConfig(gamma=2.0, lam=2.0),
                        "training": t(EUL_SUBJECT_EPOCHS, 2e-2)},
        # eul's and eul-subject's recipes with the demo's forget margin (1 nat) and retained-output penalty
        # (10), opt-in since issue 27: they kept the demo's held-out facts but left these barely forgotten
        "eul-margin": {"layers": LayerConfig(rank=16),
                       "objective": ObjectiveConfig(gamma=1.0, lam=2.0, forget_margin=1.0, retain_output_weight=10.0),
                       "training": t(20, 1e-2)},
        "eul-subject-margin": {"layers": LayerConfig(rank=16),
                               "objective": ObjectiveConfig(gamma=2.0, lam=2.0, forget_margin=1.0,
                                                            retain_output_weight=10.0),
                               "training": t(EUL_SUBJECT_EPOCHS, 2e-2)},
        # eul's recipe with each forgotten fact pushed to the loss of the held-out people's facts of the same
        # rank (forget_target="matched", the held-out people as --target-reference): where a model that
        # never saw the person would be
        "eul-matched": {"layers": LayerConfig(rank=16),
                        "objective": ObjectiveConfig(gamma=1.0, lam=2.0, forget_target="matched"),
                        "training": t(20, 1e-2)},
        # eul's recipe with the forget margin (1 nat) and the student's detours to a forgotten answer trained
        # on (forget_routes 4), no retained-output penalty
        "eul-routes": {"layers": LayerConfig(rank=16),
                       "objective": ObjectiveConfig(gamma=1.0, lam=2.0, forget_margin=1.0, forget_routes=4),
                       "training": t(20, 1e-2)},
        # eul-subject's recipe (generic prompts: subject-specific tokens only) with the same two
        "eul-subject-routes": {"layers": LayerConfig(rank=16),
                               "objective": ObjectiveConfig(gamma=2.0, lam=2.0, forget_margin=1.0, forget_routes=4),
                               "training": t(EUL_SUBJECT_EPOCHS, 2e-2)},
        "finetune": {"config": BaselineConfig(method="finetune"), "training": t(5, 1e-4)},
        "ga": {"config": BaselineConfig(method="ga"), "training": t(10, 3e-4, 2)},
        "graddiff": {"config": BaselineConfig(method="graddiff"), "training": t(5, 1e-4)},
        "npo": {"config": BaselineConfig(method="npo"), "training": t(5, 1e-4)},
        # issue 24's baselines, at the other full-parameter baselines' recipe (5 epochs, lr 1e-4), the
        # library's defaults otherwise: SimNPO β 0.1, margin 0; RMU on the middle block (here the
        # second of two), coefficient 20; IdK with the shipped refusals; α = γ = 1
        "simnpo": {"config": BaselineConfig(method="simnpo"), "training": t(5, 1e-4)},
        "rmu": {"config": BaselineConfig(method="rmu"), "training": t(5, 1e-4)},
        "idk": {"config": BaselineConfig(method="idk"), "training": t(5, 1e-4)},
    }


def add_kind_accuracies(figures: dict, model, tokenizer, forget: list[Example], chat_template: str = "none") -> None:
    """Forget accuracy split by kind of fact: the memorised ones (city, colour, pet: a retrained
    model is at chance there) and the rule one (workplace: a retrained model still answers it)."""
    from unlearn_fast.eval.evaluation import answer_hits

    hits = answer_hits(model, tokenizer, forget, max_new_tokens=3, chat_template=chat_template)
    rule = [h for i, h in enumerate(hits) if KINDS[i % len(KINDS)] == "workplace"]
    memorised = [h for i, h in enumerate(hits) if KINDS[i % len(KINDS)] != "workplace"]
    figures["forget_accuracy_memorised"] = sum(memorised) / len(memorised)
    figures["forget_accuracy_rule"] = sum(rule) / len(rule)


# the results rows' keys (the README table's columns): open-unlearning's metric names
# (unlearn_fast.eval.report.OPEN_UNLEARNING_COLUMNS), then accuracies (%) and the update time
COLUMNS = ("forget_quality", "model_utility", "forget_truth_ratio", "privleak", "forget_Q_A_Prob",
           "forget_Q_A_ROUGE", "extraction_strength", "forget_acc_pct", "forget_delta_pts", "retain_acc_pct",
           "test_acc_pct", "forget_memorised_pct", "forget_rule_pct", "time_s")


def method_row(m: dict, gold: float) -> dict:
    """One method's figures under COLUMNS' names (None where a figure does not apply)."""
    f, vs = m["figures"], m.get("vs_retrained") or {}
    sig = results_io.sig

    def pct(v):
        return None if v is None else round(100 * v, 1)

    return {"forget_quality": sig(vs.get("forget_quality"), 3), "model_utility": sig(f.get("model_utility"), 3),
            "forget_truth_ratio": sig(f.get("forget_truth_ratio"), 3), "privleak": sig(vs.get("privleak"), 3),
            "forget_Q_A_Prob": sig(f.get("forget_Q_A_Prob"), 3), "forget_Q_A_ROUGE": sig(f.get("forget_Q_A_ROUGE"), 3),
            "extraction_strength": sig(f.get("forget_extraction_strength"), 3),
            "forget_acc_pct": pct(f["forget_accuracy"]), "forget_delta_pts": round(100 * (f["forget_accuracy"] - gold), 1),
            "retain_acc_pct": pct(f["retain_accuracy"]), "test_acc_pct": pct(f["test_accuracy"]),
            "forget_memorised_pct": pct(f["forget_accuracy_memorised"]), "forget_rule_pct": pct(f["forget_accuracy_rule"]),
            "time_s": None if m.get("time_s") is None else round(m["time_s"], 1)}


def results_rows(fraction: float, report: dict) -> list[dict]:
    """A row per method ({"split", "method", *COLUMNS}), plus a mean ± sd row (cells {"mean", "sd"}) per EUL
    method that ran with several seeds."""
    gold = report["methods"]["retrain"]["figures"]["forget_accuracy"]
    split = f"{fraction:.0%}"
    rows = [{"split": split, "method": name, **method_row(m, gold)} for name, m in report["methods"].items()]
    for method in EUL_METHODS:
        seeds = [method_row(m, gold) for n, m in report["methods"].items() if n == method or n.startswith(method + "[")]
        if len(seeds) < 2:
            continue
        row = {"split": split, "method": f"{method}, mean ± sd of {len(seeds)} seeds"}
        for key in COLUMNS:
            values = [r[key] for r in seeds if r[key] is not None]
            if len(values) == len(seeds):
                t = torch.tensor(values, dtype=torch.float64)
                if key.endswith(("_pct", "_pts", "_s")):
                    row[key] = {"mean": round(t.mean().item(), 1), "sd": round(t.std().item(), 1)}
                else:  # significant digits: p-values are small
                    row[key] = {"mean": results_io.sig(t.mean().item(), 3), "sd": results_io.sig(t.std().item(), 2)}
            else:
                row[key] = None
        rows.append(row)
    return rows


def markdown_rows(rows: list[dict]) -> list[str]:
    """The summary table (header first) of results rows; mean ± sd rows in bold."""
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, dict):
            return f"{cell(v['mean'])} ± {cell(v['sd'])}"
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 1 else str(v)

    out = ["| Forget | Method | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        name = f"**{r['method']}**" if "mean ± sd" in r["method"] else r["method"]
        out.append(f"| {r['split']} | {name} | " + " | ".join(cell(r.get(k)) for k in COLUMNS) + " |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="unlearning_results/fictitious_facts", help="report directory")
    ap.add_argument("--people", type=int, default=200)
    ap.add_argument("--holdout-people", type=int, default=40)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.10])
    ap.add_argument("--methods", nargs="+",
                    default=["eul", "eul-subject", "finetune", "ga", "graddiff", "npo", "simnpo", "rmu", "idk"],
                    help="also: eul-margin, eul-subject-margin (those recipes with the forget margin and the "
                         "retained-output penalty on), eul-matched (eul's recipe, each forgotten fact pushed to the "
                         "held-out people's loss of the same rank), eul-routes (eul's recipe with the forget margin and "
                         "forget routes), eul-subject-routes (eul-subject's with the same two)")
    ap.add_argument("--pretrain-epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eul-seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="initialisation / shuffling seeds for EUL (rows eul, eul[s1], ...): its spread across seeds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model is tiny, a thread pool only adds contention)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few people, few epochs (numbers meaningless)")
    ap.add_argument("--chat-template", choices=["auto", "none"], default="none", help=CHAT_TEMPLATE_HELP)
    results_io.add_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.quick:
        args.people, args.holdout_people, args.pretrain_epochs = 40, 10, 30
    people = make_people(args.people + args.holdout_people, args.seed)
    train_people, holdout_people = people[:args.people], people[args.people:]
    tokenizer = make_tokenizer(people)
    vocab = len(tokenizer.get_vocab())
    pre = TrainConfig(epochs=args.pretrain_epochs, batch_size=32, lr=3e-3, warmup_ratio=0.05, progress=False,
                      seed=args.seed)
    all_facts = [e for p in train_people for e in p.facts()]
    original, original_time = pretrain(vocab, tokenizer, all_facts, pre, args.seed, args.chat_template)
    print(f"original model: {sum(p.numel() for p in original.parameters()) / 1e6:.2f} M parameters, "
          f"{len(all_facts)} facts, trained in {original_time:.0f} s", flush=True)
    holdout = [e for p in holdout_people for e in p.facts()]
    test = [p.rule_fact() for p in holdout_people]
    settings = method_settings(args.quick)
    out = Path(args.out)
    order = random.Random(args.seed + 1).sample(range(args.people), args.people)
    result_rows = []
    failures: dict[str, str] = {}
    summary = {"machine_note": "2-core CPU", "people": args.people, "holdout_people": args.holdout_people,
               "fractions": {}}
    for fraction in args.fractions:
        k = max(1, round(fraction * args.people))
        forget_ids = set(order[:k])
        forget = [e for i, p in enumerate(train_people) if i in forget_ids for e in p.facts()]
        others = generic_names(train_people, GENERIC_PER_FACT * k, args.seed, tuple(p.name for p in holdout_people))
        forget_subject = [e for j, p in enumerate(p for i, p in enumerate(train_people) if i in forget_ids)
                          for e in p.facts_with_generic_prompts(others[GENERIC_PER_FACT * j:GENERIC_PER_FACT * (j + 1)])]
        retain = [e for i, p in enumerate(train_people) if i not in forget_ids for e in p.facts()]
        sets = {"forget": forget, "retain": retain, "test": test, "holdout": holdout}
        retrained, retrain_time = pretrain(vocab, tokenizer, retain, pre, args.seed, args.chat_template)
        models = {"original": (original, None)}

        def attempt(label, fn):
            """fn() or, where it raises, None with the error reported (the other methods go on)."""
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - one method's failure must not stop the comparison
                traceback.print_exc()
                failures[f"{label} at {fraction:.0%}"] = f"{type(err).__name__}: {err}"
                print(f"method {label} failed at {fraction:.0%}: {type(err).__name__}: {err}", flush=True)
                return None

        for name in args.methods:
            if name in EUL_METHODS:
                data = forget_subject if name.startswith("eul-subject") else forget
                for seed in args.eul_seeds:
                    seeded = dict(settings, **{name: dict(settings[name], training=dataclasses.replace(
                        settings[name]["training"], seed=seed))})
                    label = name if seed == args.eul_seeds[0] else f"{name}[s{seed}]"
                    done = attempt(label, lambda: run_method(name, original, tokenizer, data, retain, seeded,
                                                             args.chat_template, reference=holdout))
                    if done is not None:
                        models[label] = done
            else:
                done = attempt(name, lambda: run_method(name, original, tokenizer, forget, retain, settings,
                                                        args.chat_template))
                if done is not None:
                    models[name] = done
        models["retrain"] = (retrained, retrain_time)
        results, times = {}, {}
        for name, (model, seconds) in models.items():
            def evaluate():
                res = evaluate_model(model, tokenizer, "causal", sets, holdout="holdout", max_new_tokens=3,
                                     chat_template=args.chat_template)
                add_kind_accuracies(res["figures"], model, tokenizer, forget, args.chat_template)
                return res

            res = evaluate() if name in ("original", "retrain") else attempt(f"{name} (evaluation)", evaluate)
            if res is not None:
                results[name], times[name] = res, seconds
        report = build_report(results, times=times, retrained="retrain",
                              title=f"Scenario 1, fictitious facts: forget {k} of {args.people} people ({fraction:.0%})",
                              meta={"forget facts": len(forget), "retain facts": len(retain),
                                    "test (rule facts of held-out people)": len(test),
                                    "MIA non-members (held-out people's facts)": len(holdout),
                                    "model": f"LlamaForCausalLM {sum(p.numel() for p in original.parameters())} params, "
                                             f"vocab {vocab}",
                                    "pretraining": json.dumps({"epochs": pre.epochs, "lr": pre.lr,
                                                               "batch_size": pre.batch_size}),
                                    "methods": json.dumps(describe_methods(settings))})
        write_report(report, out / f"forget_{round(100 * fraction)}pct")
        print(markdown(report), flush=True)
        result_rows += results_rows(fraction, report)
        summary["fractions"][f"{fraction:g}"] = {n: {"figures": {k_: v for k_, v in m["figures"].items()},
                                                     "time_s": m.get("time_s"),
                                                     "vs_retrained": {k_: v for k_, v in (m.get("vs_retrained") or {}).items()
                                                                      if k_ != "gap"}}
                                                 for n, m in report["methods"].items()}
    total = time.perf_counter() - started
    text = "\n".join(markdown_rows(result_rows)) + f"\n\nwhole scenario: {total:.0f} s\n" + "".join(
        f"failed: {k}: {v}\n" for k, v in failures.items())
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=lambda v: None))
    where = results_io.results_dir(args.results, dry_run=args.quick)
    if where:
        def recipe(name):
            o, t = settings[name]["objective"], settings[name]["training"]
            return (f"{name}: gamma {o.gamma}, lam {o.lam}, forget_margin {o.forget_margin}, retain_output_weight "
                    f"{o.retain_output_weight}, forget_routes {o.forget_routes}, forget_target {o.forget_target}, rank {settings[name]['layers'].rank}, "
                    f"{t.epochs} epochs, lr {t.lr}")

        notes = (f"whole run {total:.0f} s wall; EUL seeds {' '.join(map(str, args.eul_seeds))}, the rest seed "
                 f"{args.seed}; {args.threads} thread(s); EUL objectives (the script's recipes; forget_target "
                 f"matched reads its targets from the held-out people's facts): "
                 + "; ".join(recipe(n) for n in EUL_METHODS if n in args.methods)
                 + "; baselines full-parameter (recipes: method_settings)"
                 + "".join(f"; FAILED {k}: {v}" for k, v in failures.items()))
        path = results_io.write_results(where, results_io.make_results(
            "fictitious_facts", result_rows, results_io.command_line(__file__, argv), notes))
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
