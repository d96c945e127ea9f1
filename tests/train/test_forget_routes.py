"""Forget routes (issue 27): the student's own detours to a forgotten answer become extra forgotten rows."""

import torch
from torch import nn

from conftest import BOS, make_model, memorize, tokenizer_for
from unlearn_fast.api import unlearn
from unlearn_fast.eval.metrics import answer_found
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train import routes as routes_module
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import encode
from unlearn_fast.train.objective import ObjectiveConfig
from unlearn_fast.train.routes import (ROUTE_CONTEXTS, ROUTE_SHOTS, ForgetRoutes, answer_span, context_probes,
                                       prompt_length)
from unlearn_fast.train.trainer import TrainConfig


def holds(text: str, example: Example) -> bool:
    return answer_found(text, example.response, example.answers)[1]


def test_answer_span_is_the_shortest_head_and_its_latest_start():
    pieces = ["the", " city", " of", " Pa", "ris", ".", " Paris"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    found = lambda text: "paris" in text.lower()  # noqa: E731
    assert answer_span(list(range(7)), decode, found) == (3, 5)
    assert answer_span([0, 1, 2, 5], decode, found) is None
    assert answer_span([6], decode, found) == (0, 1)


class Scripted(nn.Module):
    """Stands in for a model: ``generate`` appends the scripted tokens of each prompt (by its last
    token), and records the left-padded batches it was given."""

    def __init__(self, script: dict[int, list[int]], pad: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.script, self.pad, self.calls = script, pad, []

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        self.calls.append((input_ids.tolist(), attention_mask.tolist()))
        new = [self.script[int(row[-1])][:max_new_tokens] for row in input_ids]
        width = max(len(n) for n in new)
        new = [n + [pad_token_id] * (width - len(n)) for n in new]
        return torch.cat([input_ids, torch.tensor(new)], 1)


def test_refresh_turns_a_detour_into_a_forgotten_row_once(monkeypatch):
    tokenizer = tokenizer_for("llama")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = [Example(prompt="Tokyo is in", response="Japan"), Example(prompt="Rome: ", response="Italy")]
    rows = encode(examples, tokenizer, "causal", forget=True, name="forget", model_config=make_model("llama").config)
    prompts = [r.input_ids[:prompt_length(r)] for r in rows]
    assert prompts[0] == [BOS] + ids("Tokyo is in")
    detour = ids(" in Japan, yes")  # char-level: within the 16 generated tokens
    script = {prompts[0][-1]: detour, prompts[1][-1]: ids("Italy and more")}  # row 2: the trained path itself
    model = Scripted(script, tokenizer.pad_token_id)
    routes = ForgetRoutes(tokenizer, rows, examples, holds, limit=2, pad_id=tokenizer.pad_token_id)
    assert routes.refresh(model) == 1 and len(routes) == 1
    (sent, mask), = model.calls  # one batch, left-padded to the longer prompt
    short = min(len(p) for p in prompts)
    assert mask[1][:len(sent[1]) - short] == [0] * (len(sent[1]) - short) and all(mask[0])
    route = routes.routes[id(rows[0])][0]
    end = len(prompts[0]) + len(ids(" in Japan"))
    assert route.input_ids == prompts[0] + detour[:end - len(prompts[0])]
    # targets and KL positions: exactly the tokens of "Japan" in the detour (its latest start), as a forgotten row
    start = len(prompts[0]) + len(ids(" in "))
    assert [t for t in route.targets if t != IGNORE_INDEX] == route.input_ids[start:end]
    assert [i + 1 for i, m in enumerate(route.kl_mask) if m] == list(range(start, end))
    assert route.forget
    # the same detour again is not a new route; the batch gets the row's routes after it
    assert routes.refresh(model) == 0
    assert routes.expand([rows[1], rows[0]]) == [rows[1], rows[0], route]
    assert routes.expand([rows[1]]) == [rows[1]]
    # a new detour is kept up to the limit, then no more are looked for
    monkeypatch.setitem(model.script, prompts[0][-1], ids(" so: Japan"))
    assert routes.refresh(model) == 1
    monkeypatch.setitem(model.script, prompts[0][-1], ids(" well Japan"))
    calls = len(model.calls)
    assert routes.refresh(model) == 0 and len(routes.routes[id(rows[0])]) == 2
    assert all(len(sent) == 1 for sent, _ in model.calls[calls:])  # only the open row was completed


def test_unlearn_looks_for_routes_every_epoch_after_the_first(monkeypatch):
    torch.manual_seed(0)
    model, tokenizer = make_model("llama"), tokenizer_for("llama")
    forget = [{"prompt": "Ada likes ", "response": "tea"}, {"prompt": "Bo likes ", "response": "jam"}]
    retain = [{"prompt": f"{n} likes ", "response": w} for n, w in (("Cy", "figs"), ("Di", "oats"), ("Ed", "rice"))]
    memorize(model, tokenizer, "llama", forget + retain, steps=40)
    seen = []
    real_refresh = ForgetRoutes.refresh

    def counting(self, student):
        seen.append(student.training)
        return real_refresh(self, student)

    monkeypatch.setattr(routes_module.ForgetRoutes, "refresh", counting)
    common = dict(layers=LayerConfig(rank=4), training=TrainConfig(epochs=3, batch_size=2, lr=1e-2, progress=False),
                  evaluate=False, log=lambda *a, **k: None, chat_template="none")
    result = unlearn(model, tokenizer, [Example(**e) for e in forget], [Example(**e) for e in retain],
                     objective=ObjectiveConfig(forget_margin=1.0, forget_routes=2), **common)
    assert seen == [False, False]  # epochs 2 and 3, in eval mode
    assert isinstance(result.manifest["forget_routes_found"], int)
    assert result.manifest["objective"]["forget_routes"] == 2
    seen.clear()
    result = unlearn(make_model("llama"), tokenizer, [Example(**e) for e in forget], [Example(**e) for e in retain],
                     objective=ObjectiveConfig.paper(), **common)
    assert seen == [] and result.manifest["forget_routes_found"] is None


def test_context_probes_find_an_answer_given_after_retained_facts():
    tokenizer = tokenizer_for("llama")
    config = make_model("llama").config
    examples = [Example(prompt="Tokyo is in", response="Japan")]
    rows = encode(examples, tokenizer, "causal", forget=True, name="forget", model_config=config)
    retained = [Example(prompt=f"{c} is in", response=k) for c, k in (("Rome", "Italy"), ("Oslo", "Norway"),
                                                                       ("Lima", "Peru"), ("Bern", "Swiss"))]
    probes = context_probes(examples, rows, retained, tokenizer, seed=0, model_config=config)
    assert len(probes) == ROUTE_CONTEXTS and all(row is rows[0] for row, _ in probes)
    texts = [tokenizer.decode(p.input_ids[:prompt_length(p)], skip_special_tokens=True) for _, p in probes]
    for text in texts:  # three retained facts (one per line; this tokenizer drops newlines), then the prompt
        assert text.endswith("Tokyo is in")
        assert sum(f"{e.prompt} {e.response}" in text for e in retained) == ROUTE_SHOTS
    assert context_probes(examples, rows, retained, tokenizer, seed=0, model_config=config)[0][1].input_ids == \
        probes[0][1].input_ids  # seeded
    assert context_probes(examples, rows, retained[:2], tokenizer, seed=0, model_config=config) == []
    # the model gives the answer straight away: nothing new on the trained path, but after the
    # retained facts the probe's own path is a route (the probe itself is never trained)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    model = Scripted({rows[0].input_ids[prompt_length(rows[0]) - 1]: ids(" Japan")}, tokenizer.pad_token_id)
    routes = ForgetRoutes(tokenizer, rows, examples, holds, limit=4, pad_id=tokenizer.pad_token_id, probes=probes)
    assert routes.refresh(model) == ROUTE_CONTEXTS
    assert [r.input_ids for r in routes.routes[id(rows[0])]] == [p.input_ids for _, p in probes]
    assert all([t for t in r.targets if t != IGNORE_INDEX] == ids("Japan") for r in routes.routes[id(rows[0])])
