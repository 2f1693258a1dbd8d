"""GPTQ calibration time and peak GPU memory on a Llama-3-8B-shaped model (issue 16).

A LlamaForCausalLM with Llama-3-8B's config and random bf16 weights, built on the GPU directly
(no CPU copy), calibrated with random token ids (128 sequences x 2048 tokens by default), int4
GPTQ group 128. Prints the wall time of quantize() (graph capture + calibration + swap), the
calibration's share, and the peak GPU memory.

    python benchmarks/gptq_time.py                       # the H200 run: 8B shape, 128 x 2048
    python benchmarks/gptq_time.py --desc-act            # act-order as well
    python benchmarks/gptq_time.py --tiny                # a small check on CPU (or GPU)
"""

import argparse
import time

import torch
import transformers

import pymllm_fx
import pymllm_fx.api.quantize_model as quantize_model
from pymllm_fx import calibration as calibration_module

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true", help="a small Llama shape, 4 x 64 tokens: checks the script")
parser.add_argument("--sequences", type=int, default=128)
parser.add_argument("--tokens", type=int, default=2048)
parser.add_argument("--group-size", type=int, default=128)
parser.add_argument("--desc-act", action="store_true")
parser.add_argument("--asym", action="store_true")
parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (time scales with the count)")
args = parser.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if args.tiny:
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    args.sequences, args.tokens = min(args.sequences, 4), min(args.tokens, 64)
else:  # Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
if args.layers:
    config.num_hidden_layers = args.layers
config._attn_implementation = "sdpa"

torch.manual_seed(0)
start = time.perf_counter()
torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no float32 or CPU copy
with torch.device(device):
    model = transformers.LlamaForCausalLM(config).eval()
torch.set_default_dtype(torch.float32)
print(f"built {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters on {device} in "
      f"{time.perf_counter() - start:.1f} s")
calibration = [torch.randint(0, config.vocab_size, (args.tokens,)) for _ in range(args.sequences)]
method = {"quant_method": "int4", "gptq": True, "group_size": args.group_size, "sym": not args.asym,
          "desc_act": args.desc_act}

timed = {}
real = calibration_module.gptq_calibrate


def timed_calibrate(*a, **k):
    t = time.perf_counter()
    try:
        return real(*a, **k)
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed["calibration"] = time.perf_counter() - t


quantize_model.gptq_calibrate = timed_calibrate  # this script's timer around the calibration only
if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
start = time.perf_counter()
pymllm_fx.quantize(model, method, calibration=calibration)
if device.type == "cuda":
    torch.cuda.synchronize()
wall = time.perf_counter() - start
print(f"method {method}, calibration {args.sequences} x {args.tokens} tokens, {config.num_hidden_layers} layers")
print(f"quantize wall time {wall:.1f} s (GPTQ calibration {timed.get('calibration', float('nan')):.1f} s)")
if device.type == "cuda":
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (the bf16 model alone: "
          f"{base / 2**30:.2f} GiB); after quantize {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
pymllm_fx.explain(model, file=None)
with torch.no_grad():
    out = model(calibration[0][None, :16].to(device), use_cache=False).logits
assert torch.isfinite(out).all(), "non-finite logits after GPTQ"
print("logits finite; ok")
