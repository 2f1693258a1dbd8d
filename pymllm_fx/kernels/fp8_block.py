"""Block-wise FP8 W8A8 (DeepSeek-V3 style): e4m3 weights with one scale per weight block,
activations quantized per token per group of K.

Layout (N = out features, K = in features, block size ``(bn, bk)``, usually ``(128, 128)``):
``weight`` float8_e4m3fn ``(N, K)`` and ``weight_scale_inv`` float32 ``(ceil(N/bn), ceil(K/bk))``;
the weight is ``weight[n, k] * weight_scale_inv[n // bn, k // bk]`` (despite its name the scale is
a multiplier). At run time each token's K values are cut into groups of ``bk`` and each group gets
its own scale ``amax(|group|) / 448``, so every ``bk``-wide slice of the product carries exactly
two scales, one per token and one per weight block: ``sum_g dot(x_g, w_g) * sx[m, g] * sw[n, g]``.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from pymllm_fx.kernels._checks import check_activation, check_bias, check_tensor
from pymllm_fx.kernels._triton import (
    INTERPRET,
    as_rows,
    check_contiguous,
    runs_triton,
    store_tile,
    tile_offsets,
    tl,
    triton,
)
from pymllm_fx.kernels.fp8_w8a8 import _MIN_SCALE, FP8_DTYPE, FP8_MAX, _quantize

OP = "pymllm_fx.fp8_block_linear"
# An 8-bit tl.dot reads at least 32 values along K (Triton's min_dot_size), so a K group is >= 32.
MIN_BLOCK_K = 32


def _power_of_two(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def check_block_size(where: str, block_size: Sequence[int]) -> Tuple[int, int]:
    """``(bn, bk)`` as two ints: powers of two (the kernels divide by shifts), ``bk >= 32``."""
    sizes = tuple(block_size) if isinstance(block_size, (list, tuple)) else ()
    if len(sizes) != 2 or not all(_power_of_two(s) for s in sizes) or sizes[1] < MIN_BLOCK_K:
        raise ValueError(
            f"{where}: block size must be two powers of two [rows, cols] with cols >= {MIN_BLOCK_K} "
            f"(checkpoints use [128, 128]), got {block_size!r}"
        )
    return sizes


def block_scale_shape(n: int, k: int, block_size: Sequence[int]) -> Tuple[int, int]:
    """Shape of the per-block scales of an ``(n, k)`` weight: ``(ceil(n / bn), ceil(k / bk))``."""
    return -(-n // block_size[0]), -(-k // block_size[1])


def quantize_fp8_per_token_group(x: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(..., K)`` -> (e4m3 ``(..., K)``, float32 ``(..., ceil(K / group_size))``): each token's
    K values in groups of ``group_size`` (the last may be short), one scale ``amax / 448`` each."""
    k = x.shape[-1]
    groups = -(-k // group_size)
    xf = F.pad(x.float(), (0, groups * group_size - k)).unflatten(-1, (groups, group_size))
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    xq = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq.flatten(-2)[..., :k].contiguous(), scale


def dequantize_fp8_block(weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size: Sequence[int]) -> torch.Tensor:
    """``(N, K)`` e4m3 and its block scales -> the float32 weight the checkpoint stands for."""
    n, k = weight.shape
    scale = weight_scale_inv.float().repeat_interleave(block_size[0], 0).repeat_interleave(block_size[1], 1)
    return weight.float() * scale[:n, :k]


def fp8_block_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: Sequence[int],
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch reference: per-token-group e4m3 activations times the block-scaled e4m3 weight,
    in float32. The scales are applied to the operands before one matmul: the same sum as the
    kernel's per-group scaled partial products, grouped differently (equal up to float32 rounding)."""
    bk = block_size[1]
    k = x.shape[-1]
    xq, x_scale = quantize_fp8_per_token_group(x, bk)
    xf = xq.float() * x_scale.repeat_interleave(bk, -1)[..., :k]
    out = torch.matmul(xf, dequantize_fp8_block(weight, weight_scale_inv, block_size).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _check(x, weight, weight_scale_inv, block_size, bias) -> None:
    check_block_size(OP, block_size)
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_activation(OP, x, k)
    check_tensor(OP, "weight", weight, (n, k), (FP8_DTYPE,), x.device)
    scale_shape = block_scale_shape(n, k, block_size)
    if tuple(weight_scale_inv.shape) != scale_shape:
        raise ValueError(
            f"{OP}: weight_scale_inv must have one scale per {block_size[0]}x{block_size[1]} block of the "
            f"({n}, {k}) weight, shape {scale_shape}, got {tuple(weight_scale_inv.shape)}; check the block size"
        )
    check_tensor(OP, "weight_scale_inv", weight_scale_inv, scale_shape, (torch.float32,), x.device)
    check_bias(OP, bias, n, x.device)
    check_contiguous(OP, weight=weight, weight_scale_inv=weight_scale_inv, bias=bias)


# --- Triton kernels ----------------------------------------------------------------------------
# The activation quantization matches quantize_fp8_per_token_group (amax / 448 by true division,
# round-to-nearest e4m3), so the Triton path and the reference agree on the fp8 values.


@triton.jit
def _fp8_quantize_groups_kernel(x_ptr, xq_ptr, scale_ptr, K, G, stride_xm, GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """Program (row, chunk): GROUPS consecutive K groups of one row, each with its own scale."""
    row = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    k = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    k_ok = k < K  # also masks whole groups past the last one
    x = tl.load(x_ptr + row * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)
    tl.store(scale_ptr + row * G + g, scale, mask=g < G)
    tl.store(xq_ptr + row * K + k, _quantize(x, scale[:, None]), mask=k_ok)


@triton.jit
def _fp8_block_gemm_kernel(
    xq_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """e4m3 x e4m3 dots over K tiles; each tile lies inside one scale group (BLOCK_K divides
    SCALE_K), so its partial product takes that group's token scales and weight-block scales."""
    offs_m, offs_n, m_ok, n_ok = tile_offsets(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    groups = tl.cdiv(K, SCALE_K)  # columns of both scale tensors
    x_scale_rows = x_scale_ptr + offs_m * groups
    w_scale_rows = w_scale_ptr + (offs_n // SCALE_N) * groups  # a weight column's block row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(tl.cdiv(K, BLOCK_K)):
        k = b * BLOCK_K + offs_k
        k_ok = k < K
        x = tl.load(xq_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_F32:  # Triton's interpreter has no fp8 dot
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w))
        g = (b * BLOCK_K) // SCALE_K
        x_scale = tl.load(x_scale_rows + g, mask=m_ok, other=0.0)
        w_scale = tl.load(w_scale_rows + g, mask=n_ok, other=0.0)
        acc += part * x_scale[:, None] * w_scale[None, :]
    store_tile(out_ptr, acc, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_om, HAS_BIAS)


def _gemm_config(m: int, block_k: int) -> dict:
    """Tiles by M (not yet tuned on a GPU); BLOCK_K is at most the K group so it divides it."""
    tile_k = min(block_k, 128)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=tile_k, GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=tile_k, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=tile_k, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_quantize_groups(x2: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(M, K)`` -> (e4m3 ``(M, K)``, float32 ``(M, ceil(K / group_size))``) in one Triton launch."""
    from torch.library import wrap_triton

    m, k = x2.shape
    g = -(-k // group_size)
    xq = torch.empty((m, k), device=x2.device, dtype=FP8_DTYPE)
    scale = torch.empty((m, g), device=x2.device, dtype=torch.float32)
    groups = min(triton.next_power_of_2(g), max(1, 1024 // group_size))  # ~1024 values a program
    wrap_triton(_fp8_quantize_groups_kernel)[(m, triton.cdiv(g, groups))](
        x2, xq, scale, k, g, x2.stride(0), GROUP=group_size, GROUPS=groups
    )
    return xq, scale


def fp8_block_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: Sequence[int],
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``(M, K)`` e4m3 activations with their group scales -> ``(M, N)`` on the Triton GEMM."""
    from torch.library import wrap_triton

    m, k = xq.shape
    n = weight.shape[0]
    cfg = config or _gemm_config(m, block_size[1])
    if block_size[1] % cfg["BLOCK_K"]:
        raise ValueError(f"{OP}: BLOCK_K={cfg['BLOCK_K']} must divide the K group {block_size[1]}")
    out = torch.empty((m, n), device=xq.device, dtype=out_dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(_fp8_block_gemm_kernel)[grid](
        xq, x_scale, weight, weight_scale_inv, bias if bias is not None else weight_scale_inv, out,
        m, n, k, out.stride(0), SCALE_N=block_size[0], SCALE_K=block_size[1], HAS_BIAS=bias is not None,
        DOT_F32=INTERPRET, **cfg,
    )
    return out


def fp8_block_triton(x, weight, weight_scale_inv, block_size, bias, config=None):
    """The GPU path of the op: quantize the token groups, then the block-scaled GEMM."""
    x2 = as_rows(x)
    xq, x_scale = fp8_quantize_groups(x2, block_size[1])
    out = fp8_block_mm(xq, x_scale, weight, weight_scale_inv, block_size, bias, x.dtype, config)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.triton_op("pymllm_fx::fp8_block_linear", mutates_args=())
def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    block_size: List[int],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Per-token-group fp8 quantization of ``x``, then ``x_fp8 @ weight.T`` with the group and
    block scales, + bias. Triton on CUDA (compute capability 8.9+ for fp8), the torch reference
    elsewhere (CPU, and meta/fake tensors for shapes)."""
    _check(x, weight, weight_scale_inv, block_size, bias)
    if runs_triton(x):
        return fp8_block_triton(x, weight, weight_scale_inv, block_size, bias)
    return fp8_block_linear_reference(x, weight, weight_scale_inv, block_size, bias)
