"""The objective's inputs (output_states / output_head vs the model's own logits) and every EUL
term's sign, weight, normalisation and cap, against a hand computation on full logits."""

import math

import pytest
import torch
import transformers as tf

from conftest import TASK_OF, ALL_ARCHS, CAUSAL, logits_of, make_config, make_model, perturb, sample_batch, tokenizer_for
from unlearn_fast.train.data import Example
from unlearn_fast.train.encoding import collate, encode, pad_token_id
from unlearn_fast.errors import ModelError
from unlearn_fast.model.layers import LayerConfig, attach, layers_disabled
from unlearn_fast.model.family import detect_task, output_head, output_states
from unlearn_fast.train.objective import EULObjective, ObjectiveConfig, coefficients
from unlearn_fast.ops.loss_head import IGNORE_INDEX


# --------------------------------------------------------------------------------------------
# models.py: task, head and the states that feed it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_detect_task(arch):
    assert detect_task(make_model(arch)) == TASK_OF[arch]


def test_detect_task_rejects_models_without_a_head():
    with pytest.raises(ModelError):
        detect_task(torch.nn.Linear(2, 2))
    torch.manual_seed(0)
    backbone = tf.LlamaModel(make_config("llama"))
    with pytest.raises(ModelError) as info:
        detect_task(backbone)
    assert "AutoModelForCausalLM" in str(info.value)


def _head_logits(model, task, batch):
    head = output_head(model, task)
    states = output_states(model, task, batch)
    logits = states.float() @ head.weight.float().t()
    if head.bias is not None:
        logits = logits + head.bias
    return logits * head.logit_scale


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("with_layers", [False, True])
def test_output_states_times_head_gives_the_model_logits(arch, with_layers):
    model = make_model(arch)
    if with_layers:
        attach(model, LayerConfig(rank=4))
        perturb(model)
    batch = sample_batch(arch)
    task = detect_task(model)
    expected = logits_of(model, batch)
    with torch.no_grad():
        if task == "classification":
            states = output_states(model, task, batch)
            assert states.shape == (2, 1, 2)
            assert torch.equal(states.squeeze(1), expected)
            assert torch.equal(output_head(model, task).weight, torch.eye(2))
        got = _head_logits(model, task, batch).reshape(expected.shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 1e-3  # not a vacuous comparison


@pytest.mark.parametrize("tie", [True, False], ids=["t5-tied-scaled", "t5v1.1-unscaled"])
def test_t5_decoder_output_scaling(tie):
    """T5 scales the decoder output by d_model**-0.5 before a tied head; v1.1 configs do not."""
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                         relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2,
                         decoder_start_token_id=0, tie_word_embeddings=tie,
                         feed_forward_proj="relu" if tie else "gated-gelu")
    model = tf.T5ForConditionalGeneration(config).eval()
    attach(model, LayerConfig(rank=4))
    perturb(model)
    batch = sample_batch("t5")
    with torch.no_grad():
        got = _head_logits(model, "seq2seq", batch)
        raw = model.get_decoder()(input_ids=batch["decoder_input_ids"],
                                  attention_mask=batch["decoder_attention_mask"],
                                  encoder_hidden_states=model.get_encoder()(
                                      input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state,
                                  encoder_attention_mask=batch["attention_mask"]).last_hidden_state
        states = output_states(model, "seq2seq", batch)
    torch.testing.assert_close(got, logits_of(model, batch), rtol=1e-5, atol=1e-5)
    factor = 16 ** -0.5 if tie else 1.0
    torch.testing.assert_close(states, raw * factor, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# objective.py: the loss against a full-logits hand computation
# --------------------------------------------------------------------------------------------

FORGET_PR = [("The capital of Zorbia is", " Quellton"), ("Mirta likes", " green tea")]
RETAIN_PR = [("The capital of France is", " Paris"), ("Bob plays", " the violin"), ("Sky is", " blue")]
FORGET_TEXT = ["Zorbia exports purple marbles.", "Quellton has seven bridges."]
RETAIN_TEXT = ["France exports cheese and wine.", "Paris has many museums.", "The sky is blue today."]


def objective_batch(arch: str) -> dict:
    """A collated batch with forgotten and retained rows of the task the architecture serves."""
    tok = tokenizer_for(arch)
    task = TASK_OF[arch]
    config = make_config(arch)
    if task == "classification":
        forget = [Example(text=t, label=i % 2) for i, t in enumerate(FORGET_TEXT)]
        retain = [Example(text=t, label=i % 2) for i, t in enumerate(RETAIN_TEXT)]
        labels = dict(forget=[e.label for e in forget], retain=[e.label for e in retain])
    else:
        forget = [Example(prompt=p, response=r) for p, r in FORGET_PR]
        retain = [Example(prompt=p, response=r) for p, r in RETAIN_PR]
        labels = dict(forget=None, retain=None)
    rows = (encode(forget, tok, task, forget=True, name="forget", model_config=config, labels=labels["forget"])
            + encode(retain, tok, task, forget=False, name="retain", model_config=config, labels=labels["retain"]))
    return collate(rows, pad_token_id(tok))


def model_logits(model, task, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
              if k in batch}
    logits = model(**inputs).logits
    return logits.unsqueeze(1) if task == "classification" else logits


def hand_loss(model, task, batch, alpha=0.0, lam=0.0, gamma=0.0, forget_kl_weight=0.0,
              forget_kl_bound=math.inf, forget_lm_bound=math.inf, temperature=1.0):
    """L = α·mean_retain KL − w·mean_forget min(KL, b_kl) + λ·mean_retain CE − γ·mean_forget min(CE, b_lm),
    from the model's full logits in float64 (differentiable w.r.t. the unlearning layers)."""
    with torch.no_grad(), layers_disabled(model):
        teacher = model_logits(model, task, batch).double()
    student = model_logits(model, task, batch).double()
    T = temperature
    log_pt = torch.log_softmax(teacher / T, -1)
    kl = T * T * (log_pt.exp() * (log_pt - torch.log_softmax(student / T, -1))).sum(-1)
    targets = batch["targets"]
    has_target = targets != IGNORE_INDEX
    ce = -torch.log_softmax(student, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    forget = batch["forget"].unsqueeze(1).expand_as(has_target)
    kl_mask = batch["kl_mask"]
    parts = {
        "retain_kl": kl[kl_mask & ~forget],
        "forget_kl": kl[kl_mask & forget],
        "task_loss": ce[has_target & ~forget],
        "forget_lm_loss": ce[has_target & forget],
    }
    terms = (("retain_kl", alpha, math.inf), ("forget_kl", -forget_kl_weight, forget_kl_bound),
             ("task_loss", lam, math.inf), ("forget_lm_loss", -gamma, forget_lm_bound))
    loss = student.sum() * 0
    for name, weight, bound in terms:
        if weight:
            assert parts[name].numel() > 0, name  # a weighted term must have positions
            loss = loss + weight * parts[name].clamp(max=bound).mean()
    return loss, {k: v.detach() for k, v in parts.items() if v.numel()}


def between(values):
    """A cap strictly between two middle values (no token sits exactly on it)."""
    v = values.sort().values
    k = v.numel() // 2
    assert v[k - 1] < v[k]
    return float(v[k - 1] + v[k]) / 2


def trained_like(arch, seed=1, scale=0.5):
    model = make_model(arch)
    attach(model, LayerConfig(rank=4))
    perturb(model, seed=seed, scale=scale)
    return model


def assert_grads_close(got, want, atol=1e-6):
    """Gradients (from autograd.grad with allow_unused) equal the reference's: zero where it has none,
    a missing gradient counting as zero where it has one."""
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=atol)


def compare(model, task, batch, **weights):
    """Loss and gradients of EULObjective vs the hand computation; returns the hand parts."""
    config = ObjectiveConfig(**{"alpha": 0.0, "lam": 0.0, "gamma": 0.0, "forget_kl_weight": 0.0,
                                "sharpening_guard": False, "forget_margin": None, "retain_output_weight": 0.0,
                                **weights})
    objective = EULObjective(model, task, config)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, terms = objective(batch)
    got_grads = torch.autograd.grad(loss, params, allow_unused=True)
    # the subject margin and the forget target act before training (unlearn_fast.train.selection,
    # objective.heldout_bounds), not in a batch's loss
    kwargs = {k: v for k, v in config.to_dict().items()
              if k not in ("sharpening_guard", "subject_margin", "forget_target", "forget_margin",
                           "retain_output_weight", "forget_routes")}
    kwargs["gamma"] = objective.gamma
    expected, parts = hand_loss(model, task, batch, **kwargs)
    want_grads = torch.autograd.grad(expected, params, allow_unused=True)
    weight_of = {"retain_kl": config.alpha, "forget_kl": config.forget_kl_weight, "task_loss": config.lam,
                 "forget_lm_loss": objective.gamma}
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(got_grads, want_grads)
    for name in ("retain_kl", "forget_kl", "task_loss", "forget_lm_loss"):
        if name in parts and weight_of[name]:  # the logged terms: unweighted, uncapped means
            assert terms[name] == pytest.approx(float(parts[name].mean()), rel=1e-4, abs=1e-6)
        else:
            assert math.isnan(terms[name]), name  # absent or switched off: not reported as 0
    return loss, expected, parts


LM_ARCHS = list(CAUSAL) + ["t5"]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_only_alpha_is_alpha_times_mean_retained_kl(arch):
    model = trained_like(arch)
    task = TASK_OF[arch]
    batch = objective_batch(arch)
    loss, expected, parts = compare(model, task, batch, alpha=0.7)
    assert loss.item() == pytest.approx(0.7 * float(parts["retain_kl"].mean()), rel=1e-5, abs=1e-7)
    assert loss.item() > 0


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forget_kl_enters_negatively(arch):
    model = trained_like(arch)
    task = TASK_OF[arch]
    batch = objective_batch(arch)
    loss, _, parts = compare(model, task, batch, forget_kl_weight=1.0, forget_kl_bound=1e6)
    assert loss.item() == pytest.approx(-float(parts["forget_kl"].mean()), rel=1e-5, abs=1e-7)
    assert loss.item() < 0
    loss, _, parts = compare(model, task, batch, forget_kl_weight=0.5, forget_kl_bound=1e6)
    assert loss.item() == pytest.approx(-0.5 * float(parts["forget_kl"].mean()), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forget_kl_is_capped_per_token(arch):
    model = trained_like(arch, scale=1.0)
    task = TASK_OF[arch]
    batch = objective_batch(arch)
    _, parts = hand_loss(model, task, batch, forget_kl_weight=1.0)
    values = parts["forget_kl"]
    assert values.numel() >= 2 and values.min() < values.max()
    bound = between(values)  # some tokens above the cap, some below
    loss, _, _ = compare(model, task, batch, forget_kl_weight=1.0, forget_kl_bound=bound)
    assert loss.item() == pytest.approx(-float(values.clamp(max=bound).mean()), rel=1e-5, abs=1e-7)
    assert loss.item() > -float(values.mean())
    # everything over the cap: a constant loss with no gradient at all
    tiny = float(values.min()) / 2
    loss, _, _ = compare(model, task, batch, forget_kl_weight=1.0, forget_kl_bound=tiny)
    assert loss.item() == pytest.approx(-tiny, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_lambda_is_task_cross_entropy_on_retained_targets(arch):
    model = trained_like(arch)
    task = TASK_OF[arch]
    batch = objective_batch(arch)
    loss, _, parts = compare(model, task, batch, lam=1.3)
    assert loss.item() == pytest.approx(1.3 * float(parts["task_loss"].mean()), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_gamma_is_negative_lm_loss_on_forget_targets_capped(arch):
    model = trained_like(arch)
    task = TASK_OF[arch]
    batch = objective_batch(arch)
    loss, _, parts = compare(model, task, batch, gamma=0.3, forget_lm_bound=1e6)
    assert loss.item() == pytest.approx(-0.3 * float(parts["forget_lm_loss"].mean()), rel=1e-5, abs=1e-7)
    values = parts["forget_lm_loss"]
    bound = between(values)
    assert values.min() < values.max()
    loss, _, _ = compare(model, task, batch, gamma=0.3, forget_lm_bound=bound)
    assert loss.item() == pytest.approx(-0.3 * float(values.clamp(max=bound).mean()), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bert"])
def test_all_terms_together(arch):
    model = trained_like(arch, scale=1.0)
    task = TASK_OF[arch]
    batch = objective_batch(arch)
    _, parts = hand_loss(model, task, batch)
    kl_bound = between(parts["forget_kl"])
    gamma = 0.0 if task == "classification" else 0.2
    lm_bound = between(parts["forget_lm_loss"]) if gamma else 5.0
    compare(model, task, batch, alpha=0.8, lam=1.0, gamma=gamma, forget_kl_weight=1.0,
            forget_kl_bound=kl_bound, forget_lm_bound=lm_bound)
    compare(model, task, batch, alpha=0.8, lam=1.0, gamma=gamma, forget_kl_weight=1.0,
            forget_kl_bound=kl_bound, forget_lm_bound=lm_bound, temperature=2.0)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("off", ["alpha", "lam", "gamma", "forget_kl_weight"])
def test_each_term_switches_off_with_weight_zero(arch, off):
    model = trained_like(arch)
    task = TASK_OF[arch]
    batch = objective_batch(arch)
    weights = dict(alpha=0.8, lam=1.0, gamma=0.2, forget_kl_weight=1.0)
    full, _ = hand_loss(model, task, batch, **weights)
    weights[off] = 0.0
    loss, expected, _ = compare(model, task, batch, **weights)
    assert abs(full.item() - loss.item()) > 1e-4  # the term mattered and is now gone


def test_all_weights_zero_is_a_zero_loss():
    model = trained_like("llama")
    batch = objective_batch("llama")
    config = ObjectiveConfig(alpha=0.0, lam=0.0, gamma=0.0, forget_kl_weight=0.0, retain_output_weight=0.0)
    loss, _ = EULObjective(model, "causal", config)(batch)
    assert loss.item() == 0.0


def test_student_equal_to_teacher_has_zero_kl_and_gradient_only_through_ce():
    model = make_model("llama")
    attach(model, LayerConfig(rank=4))  # zero up-projection: student == teacher
    batch = objective_batch("llama")
    loss, terms = EULObjective(model, "causal", ObjectiveConfig(lam=0.0, gamma=0.0))(batch)
    assert terms["retain_kl"] == 0.0 and terms["forget_kl"] == 0.0
    assert loss.item() == 0.0
    loss.backward()
    for p in (p for p in model.parameters() if p.requires_grad):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


# --------------------------------------------------------------------------------------------
# gamma defaults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_gamma_default(arch):
    model = make_model(arch)
    attach(model, LayerConfig(rank=2))
    task = TASK_OF[arch]
    objective = EULObjective(model, task, ObjectiveConfig())
    assert objective.gamma == (0.0 if task == "classification" else 0.2)
    assert ObjectiveConfig().resolved_gamma(task) == objective.gamma


def test_paper_defaults():
    config = ObjectiveConfig()
    assert (config.alpha, config.lam, config.forget_kl_weight) == (0.8, 1.0, 1.0)


@pytest.mark.parametrize("gamma", [-1e-3, -0.1])
def test_negative_gamma_on_classification_raises(gamma):
    model = make_model("bert")
    attach(model, LayerConfig(rank=2))
    with pytest.raises(ModelError) as info:
        EULObjective(model, "classification", ObjectiveConfig(gamma=gamma))
    assert "gamma" in str(info.value)
    assert EULObjective(model, "classification", ObjectiveConfig(gamma=0.0)).gamma == 0.0
    assert EULObjective(model, "classification", ObjectiveConfig(gamma=0.2)).gamma == 0.2


def test_gamma_on_classification_is_negated_label_ce_capped():
    """A classifier's γ term: −γ·mean over forgotten rows of min(CE(label), forget_lm_bound).

    Sign: a gradient step raises the forgotten rows' label loss. Bound: a row above the cap has no
    gradient (with every row above it, none at all), and retained rows are never capped."""
    model = trained_like("bert", scale=1.0)
    batch = objective_batch("bert")
    forget = batch["forget"]
    _, ce = coefficients(batch, ObjectiveConfig(gamma=0.4), 0.4)
    assert torch.allclose(ce[forget], torch.tensor(-0.4 / int(forget.sum()))) and (ce[~forget] > 0).all()
    loss, _, parts = compare(model, "classification", batch, gamma=0.4, forget_lm_bound=1e6)
    values = parts["forget_lm_loss"]
    assert loss.item() == pytest.approx(-0.4 * float(values.mean()), rel=1e-5, abs=1e-7) and loss.item() < 0
    bound = between(values)
    loss, _, _ = compare(model, "classification", batch, gamma=0.4, forget_lm_bound=bound)
    assert loss.item() == pytest.approx(-0.4 * float(values.clamp(max=bound).mean()), rel=1e-5, abs=1e-7)
    # one small descent step on the layers raises the (uncapped) forgotten rows' label loss
    objective = EULObjective(model, "classification", ObjectiveConfig(alpha=0.0, lam=0.0, gamma=1.0,
                                                                      forget_kl_weight=0.0, forget_margin=None,
                                                                      retain_output_weight=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    loss, terms = objective(batch)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 1e-2 * g
    _, after = objective(batch)
    assert after["forget_lm_loss"] > terms["forget_lm_loss"]
    # every forgotten row above the cap: a constant loss, no gradient
    capped = EULObjective(model, "classification", ObjectiveConfig(alpha=0.0, lam=0.0, gamma=1.0,
                                                                   forget_kl_weight=0.0, forget_lm_bound=1e-6,
                                                                   forget_margin=None, retain_output_weight=0.0))
    loss, _ = capped(batch)
    assert loss.item() == pytest.approx(-1e-6, abs=1e-9)
    assert all(torch.count_nonzero(g) == 0 for g in torch.autograd.grad(loss, params, allow_unused=True)
               if g is not None)


def test_classification_forget_rows_keep_labels_but_no_lm_term():
    """Forgotten rows carry their label (the sharpening guard reads it) with a zero CE weight."""
    batch = objective_batch("bert")
    forget = batch["forget"]
    assert (batch["targets"] != IGNORE_INDEX).all()
    _, ce = coefficients(batch, ObjectiveConfig(), ObjectiveConfig().resolved_gamma("classification"))
    assert (ce[forget] == 0).all() and (ce[~forget] > 0).all()


def test_causal_positions_of_each_term():
    """Retained rows: KL on every real next-token position, targets on the response only;
    forgotten rows: KL and targets on the response positions only."""
    tok = tokenizer_for("llama")
    batch = objective_batch("llama")
    for i, (forget, (prompt, response)) in enumerate([(True, pr) for pr in FORGET_PR]
                                                      + [(False, pr) for pr in RETAIN_PR]):
        n_prompt = len(tok(prompt)["input_ids"])
        n = n_prompt + len(response)  # one token per character (+ <s> in the prompt)
        assert int(batch["attention_mask"][i].sum()) == n
        assert bool(batch["forget"][i]) == forget
        targets = batch["targets"][i]
        response_pos = torch.zeros_like(targets, dtype=torch.bool)
        response_pos[n_prompt - 1:n - 1] = True
        assert torch.equal(targets != IGNORE_INDEX, response_pos)
        assert tok.decode(targets[response_pos]) == response
        real = torch.zeros_like(response_pos)
        real[:n - 1] = True
        assert torch.equal(batch["kl_mask"][i], response_pos if forget else real)


def test_sharpening_guard_drops_forget_kl_where_the_student_is_more_confident():
    """Guard on: a forgotten position whose target the student predicts better than the teacher
    leaves the forget KL; elsewhere the loss is the paper's."""
    from conftest import make_model, perturb
    from unlearn_fast.model.layers import LayerConfig, attach
    from unlearn_fast.train.objective import coefficients
    from unlearn_fast.ops.loss_head import IGNORE_INDEX

    torch.manual_seed(0)
    model = make_model("llama")
    attach(model, LayerConfig(rank=4))
    perturb(model)
    tokenizer = tokenizer_for("llama")
    texts = [Example(text="the quick brown fox jumps over"), Example(text="a lazy dog sleeps all day long")]
    batch = collate(encode(texts, tokenizer, "causal", forget=True, name="forget"), pad_token_id(tokenizer))
    on = EULObjective(model, "causal", ObjectiveConfig(alpha=0, lam=0, gamma=0, sharpening_guard=True))
    off = EULObjective(model, "causal", ObjectiveConfig(alpha=0, lam=0, gamma=0, sharpening_guard=False))
    kl_coef, _ = coefficients(batch, off.config, 0.0)
    student = output_states(model, "causal", batch).detach()
    teacher = off.teacher_states(batch)
    # the loss by hand from full float64 logits: the forget KL (capped), without the sharper positions
    w = model.get_output_embeddings().weight
    targets = batch["targets"]
    has = (targets != IGNORE_INDEX) & (kl_coef < 0)
    log_s = torch.log_softmax(student.double() @ w.double().t(), -1)
    log_t = torch.log_softmax(teacher.double() @ w.double().t(), -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).clamp(max=off.config.forget_kl_bound)
    pick = targets.clamp(min=0).unsqueeze(-1)
    sharper = has & (log_s.gather(-1, pick).squeeze(-1) > log_t.gather(-1, pick).squeeze(-1))
    assert sharper.any() and (has & ~sharper).any(), "the case must have both kinds of positions"
    want_off = (kl_coef.double() * kl).sum()
    want_on = (kl_coef.double() * kl * ~sharper).sum()
    torch.testing.assert_close(off(batch)[0].double(), want_off, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(on(batch)[0].double(), want_on, rtol=1e-4, atol=1e-7)
    assert not torch.isclose(want_on, want_off, rtol=1e-3)
