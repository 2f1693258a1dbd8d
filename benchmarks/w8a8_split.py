"""Where W8A8's time goes at M = 1024 and 4096 on the Llama-3-8B shapes (µs, CUDA-graph replay):
the row quantizer alone (inline-PTX rounding and its portable twin), fp8's row quantizer, the int8
GEMM alone on pre-quantized rows, the whole op, torch._int_mm and bf16 cuBLAS. On a CUDA machine:

    pip install -e . && python benchmarks/w8a8_split.py
"""

import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.library import wrap_triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules; pymllm_fx is installed

from timing import copies_for, graph_time_us  # noqa: E402
from pymllm_fx.kernels import fp8_w8a8, w8a8  # noqa: E402

SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N)


def gemm_only(xq, x_scale, qweight, scale, m, n, k, cfg):
    """The int8 GEMM kernel on rows the quantizer already produced."""
    out = torch.empty((m, n), device=xq.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    unread = scale  # a valid pointer for the arguments the constexpr switches leave unread
    wrap_triton(w8a8._w8a8_gemm_kernel)[grid](
        xq, x_scale, 1, unread, qweight, scale, unread, unread, out, m, n, k, out.stride(0),
        HAS_ZERO=False, HAS_BIAS=False, **cfg,
    )
    return out


def main():
    dev = torch.device("cuda")
    for m in (1024, 4096):
        for k, n in SHAPES:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            weights = [torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(copies_for(n * k))]
            scale = torch.rand(n, device=dev) * 0.02
            bf16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies_for(2 * n * k))]
            xq, x_scale = w8a8.w8a8_quantize_rows(x)
            cfg = w8a8._gemm_config(m)
            quant = graph_time_us([lambda: w8a8.w8a8_quantize_rows(x)] * 4)
            quant_portable = graph_time_us([lambda: w8a8.w8a8_quantize_rows(x, asm=False)] * 4)
            quant_fp8 = graph_time_us([lambda: fp8_w8a8.fp8_quantize_rows(x)] * 4)
            gemm = graph_time_us([lambda w=w: gemm_only(xq, x_scale, w, scale, m, n, k, cfg) for w in weights])
            whole = graph_time_us([lambda w=w: w8a8.w8a8_gemm(x, w, scale, None, None, None, None) for w in weights])
            int_mm = graph_time_us([lambda w=w: torch._int_mm(xq, w.t()) for w in weights])
            base = graph_time_us([lambda w=w: F.linear(x, w) for w in bf16])
            print(f"M={m} K={k} N={n}: bf16 {base:.1f} | quantizer {quant:.1f} (portable rounding {quant_portable:.1f}, "
                  f"fp8's {quant_fp8:.1f}) GEMM {gemm:.1f} int_mm {int_mm:.1f} whole op {whole:.1f} "
                  f"({base / whole:.2f}x bf16)", flush=True)
            del weights, bf16


if __name__ == "__main__":
    main()
