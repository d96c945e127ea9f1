"""Input robustness beyond the per-format tests (tests/train/test_readers.py, test_data.py): unicode and
emoji survive loading and encoding, duplicate rows are kept as given, and a 100 000-row retain set
loads and encodes in memory that grows with the data, not faster."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT, make_model, tokenizer_for

from unlearn_fast.api import unlearn
from unlearn_fast.model.layers import LayerConfig
from unlearn_fast.train.data import load_examples
from unlearn_fast.train.encoding import encode
from unlearn_fast.train.trainer import TrainConfig

UNICODE = [{"prompt": "Ünïcödé — 北京 is the capital of", "response": " 中国 🇨🇳"},
           {"prompt": "Emoji 🍕 then a combining e\u0301 and RTL שלום:", "response": " ok ✅"}]


def test_unicode_and_emoji_survive_loading_and_training(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in UNICODE), encoding="utf-8")
    forget = load_examples(path, name="forget set")
    assert [e.response for e in forget] == [r["response"] for r in UNICODE]  # kept exactly, no normalising
    rows = encode(forget, tokenizer_for("llama"), "causal", forget=True, name="forget set")
    assert all(len(r.input_ids) > 0 for r in rows)
    result = unlearn(make_model("llama"), tokenizer_for("llama"), forget, [{"prompt": "a", "response": " b"}],
                     out=tmp_path / "out", layers=LayerConfig(rank=2),
                     training=TrainConfig(max_steps=1, progress=False), evaluate=False, log=lambda *a: None)
    assert (result.out / "manifest.json").is_file()


def test_duplicate_rows_are_kept_as_given():
    rows = [{"text": "same row"}, {"text": "same row"}, {"text": "other"}]
    assert [e.text for e in load_examples(rows, name="retain set")] == ["same row", "same row", "other"]


MEASURE = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import tokenizer_for
from unlearn_fast.train.data import load_examples
from unlearn_fast.train.encoding import encode
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({{"prompt": f"Person {{i}} was born in", "response": f" town {{i % 977}}"}}) + "\\n")
def rss_kib():  # resident memory now: the loaded rows stay alive, so this is what they hold
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
tok = tokenizer_for("llama")
base = rss_kib()
rows = encode(load_examples(path, name="retain set"), tok, "causal", forget=False, name="retain set")
print(json.dumps({{"rows": len(rows), "kib": rss_kib() - base}}))
"""


def peak_kib(n: int, tmp_path) -> dict:
    script = MEASURE.format(tests=str(REPO_ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", script, str(n), str(tmp_path / f"retain{n}.jsonl")],
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_100k_row_retain_set_holds_memory_in_proportion(tmp_path):
    small, large = peak_kib(1_000, tmp_path), peak_kib(100_000, tmp_path)
    assert (small["rows"], large["rows"]) == (1_000, 100_000)
    per_row_kib = large["kib"] / large["rows"]
    # measured on the 2-core box: ~1.5 KiB per row of this shape (Python objects for the
    # example and its token lists); 8 KiB per row would mean a copy of the data per step or worse
    assert per_row_kib < 8, large
    print(f"resident memory held by the rows: 1k rows {small['kib']} KiB, 100k rows {large['kib']} KiB ({per_row_kib:.2f} KiB/row)")
