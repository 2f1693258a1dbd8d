"""Block-wise FP8 (torch.ops.pymllm_fx.fp8_block_linear): the torch reference against the format's
definition, the Triton kernels against the reference (on CPU through Triton's interpreter at small
shapes, on CUDA at real shapes), input checks, meta shapes and torch.compile."""

from __future__ import annotations

import pytest
import torch

import pymllm_fx  # noqa: F401  (registers torch.ops.pymllm_fx.*)
from checks import rel_err, seed
from pymllm_fx.kernels import _triton, fp8_block
from pymllm_fx.kernels.fp8_block import (
    block_scale_shape,
    dequantize_fp8_block,
    fp8_block_linear_reference,
    quantize_fp8_per_token_group,
)
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # cpu: conftest.py sets TRITON_INTERPRET=1
needs_triton = pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")
# Relative error ||out - ref|| / ||ref||. The interpreter rounds float -> bf16 by truncation
# (the GPU rounds to nearest), which costs up to one bf16 ulp.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# e4m3 keeps 3 mantissa bits: round-to-nearest errs by <= 2**-4 relative for normal values and by
# <= 2**-10 (in units of the scale) below the smallest normal.
E4M3_REL, E4M3_ABS = 2.0**-4, 2.0**-10


def block_weights(n, k, block_size, device="cpu"):
    """Random e4m3 values and positive block scales of the checkpoint layout."""
    weight = (torch.randn(n, k) * 64).clamp(-448, 448).to(FP8_DTYPE)
    scale = torch.rand(*block_scale_shape(n, k, block_size)) * 0.01 + 0.001
    return weight.to(device), scale.to(device)


def activations(lead, k, dtype, device="cpu"):
    """Wide dynamic range along K, so each group's scale differs from its row's."""
    return (torch.randn(*lead, k) * torch.logspace(-2, 1, k)).to(device, dtype)


def definition(x, weight, scale, block_size, bias=None):
    """The format's product in float64, group by group: sum_g dot(xq_g, wq_g) * sx[m, g] * sw[n // bn, g]."""
    bn, bk = block_size
    n, k = weight.shape
    xq, sx = quantize_fp8_per_token_group(x, bk)
    xq, sx = xq.double().reshape(-1, k), sx.double().reshape(-1, sx.shape[-1])
    rows = torch.arange(n, device=weight.device) // bn
    out = torch.zeros(xq.shape[0], n, dtype=torch.float64, device=x.device)
    for g in range(sx.shape[1]):
        cols = slice(g * bk, (g + 1) * bk)
        out += (xq[:, cols] @ weight[:, cols].double().t()) * sx[:, g, None] * scale.double()[rows, g][None, :]
    if bias is not None:
        out += bias.double()
    return out.reshape(*x.shape[:-1], n)


# --- the torch reference -----------------------------------------------------------------------


@pytest.mark.parametrize("k, group", [(256, 128), (200, 128), (96, 32), (40, 32)])
def test_group_quantization_round_trip(k, group):
    seed("group", k, group)
    x = activations((3, 2), k, torch.float32)
    xq, scale = quantize_fp8_per_token_group(x, group)
    groups = -(-k // group)
    assert xq.dtype == FP8_DTYPE and xq.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (3, 2, groups)
    for g in range(groups):  # each group (the last may be short) maps its amax to 448
        cols = slice(g * group, (g + 1) * group)
        torch.testing.assert_close(scale[..., g], x[..., cols].abs().amax(dim=-1) / 448.0, rtol=0, atol=0)
        assert torch.equal(xq[..., cols].float().abs().amax(dim=-1), torch.full((3, 2), 448.0))
    per_col = scale.repeat_interleave(group, -1)[..., :k].double()
    back = xq.double() * per_col
    assert ((back - x.double()).abs() <= E4M3_REL * x.double().abs() + E4M3_ABS * per_col + 1e-12).all()


def test_group_quantization_zero_group_is_finite():
    x = torch.zeros(2, 96)
    x[1, :32] = torch.randn(32)
    xq, scale = quantize_fp8_per_token_group(x, 32)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(xq[0].float(), torch.zeros(96)) and torch.equal(xq[1, 32:].float(), torch.zeros(64))


def test_dequantize_uses_each_blocks_scale():
    weight = torch.ones(5, 7).to(FP8_DTYPE)
    scale = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    expected = torch.tensor([[1.0] * 3 + [2.0] * 3 + [3.0]] * 3 + [[4.0] * 3 + [5.0] * 3 + [6.0]] * 2)
    assert torch.equal(dequantize_fp8_block(weight, scale, (3, 3)), expected)


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k, block_size", [(40, 200, (128, 128)), (300, 256, (128, 128)), (72, 160, (32, 64))])
def test_op_on_cpu_matches_definition(n, k, block_size, dtype, bias, lead):
    seed("op", n, k, block_size, dtype, bias, lead)
    weight, scale = block_weights(n, k, block_size)
    x = activations(lead, k, dtype)
    b = torch.randn(n).to(dtype) if bias else None
    out = torch.ops.pymllm_fx.fp8_block_linear(x, weight, scale, list(block_size), b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert torch.equal(out, fp8_block_linear_reference(x, weight, scale, block_size, b))
    assert rel_err(out, definition(x, weight, scale, block_size, b)) <= REL_TOL[dtype]


def test_block_scales_are_not_one_per_row():
    """Swapping two K blocks' scales must change the output: the op reads scales per block."""
    seed("swap")
    weight, scale = block_weights(8, 256, (128, 128))
    x = torch.randn(3, 256)
    swapped = scale.flip(1).contiguous()
    assert not torch.equal(scale, swapped)
    out = torch.ops.pymllm_fx.fp8_block_linear(x, weight, scale, [128, 128], None)
    assert rel_err(torch.ops.pymllm_fx.fp8_block_linear(x, weight, swapped, [128, 128], None), out) > 0.1


# --- Triton kernels against the reference ------------------------------------------------------

# (M, N, K, block): tails in N and K (a short last group and a partial weight block), and a block
# narrower than the GEMM tile along N.
SMALL = [(1, 40, 200, (128, 128)), (3, 72, 160, (32, 64)), (17, 48, 96, (16, 32))]
GEMM_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k, block_size", SMALL)
def test_triton_kernels_match_reference(m, n, k, block_size, dtype):
    seed("triton", m, n, k, block_size, dtype)
    weight, scale = block_weights(n, k, block_size, DEVICE)
    x = activations((m,), k, dtype, DEVICE)
    bias = torch.randn(n).to(DEVICE, dtype)
    ref = fp8_block_linear_reference(x, weight, scale, block_size, bias)

    # The group quantization kernel: its scales are the reference's exactly. Triton 3.9's
    # interpreter converts float32 to e4m3 wrongly (126.46 -> 64), so only CUDA checks the values.
    xq, x_scale = fp8_block.fp8_quantize_groups(x, block_size[1])
    ref_q, ref_scale = quantize_fp8_per_token_group(x, block_size[1])
    assert torch.equal(x_scale, ref_scale)
    if CUDA:
        assert torch.equal(xq.float(), ref_q.float())

    # The GEMM on the reference's e4m3 activations gives the reference's output.
    out = fp8_block.fp8_block_mm(ref_q, ref_scale, weight, scale, block_size, bias, dtype, GEMM_CFG)
    assert out.dtype == dtype and rel_err(out, ref) <= REL_TOL[dtype]
    out = fp8_block.fp8_block_mm(ref_q, ref_scale, weight, scale, block_size, None, dtype, GEMM_CFG)
    assert rel_err(out, fp8_block_linear_reference(x, weight, scale, block_size)) <= REL_TOL[dtype]

    # Both launches together, compared with the product of the values the kernel quantized to.
    out = fp8_block.fp8_block_triton(x, weight, scale, block_size, bias, GEMM_CFG)
    per_col = x_scale.repeat_interleave(block_size[1], -1)[:, :k]
    xf = xq.float() * per_col
    expected = (xf @ dequantize_fp8_block(weight, scale, block_size).t() + bias.float()).to(dtype)
    assert rel_err(out, expected) <= REL_TOL[dtype]
    if CUDA:
        assert rel_err(out, ref) <= REL_TOL[dtype]


@needs_triton
def test_triton_takes_batched_strided_activations():
    seed("strided")
    n, k, block_size = 24, 96, (16, 32)
    weight, scale = block_weights(n, k, block_size, DEVICE)
    wide = activations((2, 3), 2 * k, torch.float16, DEVICE)
    x = wide[..., ::2]  # a strided 3-D view: the launcher makes the rows contiguous
    out = fp8_block.fp8_block_triton(x, weight, scale, block_size, None, GEMM_CFG)
    assert out.shape == (2, 3, n)
    xq, x_scale = fp8_block.fp8_quantize_groups(x.reshape(-1, k).contiguous(), block_size[1])
    xf = (xq.float() * x_scale.repeat_interleave(block_size[1], -1)[:, :k]).reshape(2, 3, k)
    expected = (xf @ dequantize_fp8_block(weight, scale, block_size).t()).half()
    assert rel_err(out, expected) <= REL_TOL[torch.float16]


@needs_triton
def test_gemm_refuses_a_tile_wider_than_the_group():
    weight, scale = block_weights(8, 64, (16, 32))
    xq, x_scale = quantize_fp8_per_token_group(torch.randn(2, 64), 32)
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide the K group 32"):
        fp8_block.fp8_block_mm(xq, x_scale, weight, scale, (16, 32), None, torch.float32, dict(GEMM_CFG, BLOCK_K=64))


# --- real shapes, CUDA only: through the op, as a model calls it --------------------------------


@pytest.mark.skipif(not CUDA, reason="real shapes need a CUDA device")
@pytest.mark.parametrize("m", [1, 16, 128, 1024])
@pytest.mark.parametrize("k, n", [(7168, 2112), (4096, 14336), (14336, 4096), (2000, 1000)])
def test_op_on_cuda_at_real_shapes(k, n, m):
    seed("cuda", k, n, m)
    weight, scale = block_weights(n, k, (128, 128), "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.pymllm_fx.fp8_block_linear(x, weight, scale, [128, 128], bias)
    assert rel_err(out, fp8_block_linear_reference(x, weight, scale, (128, 128), bias)) <= 1e-2


# --- input checks, meta shapes, torch.compile ----------------------------------------------------


@pytest.mark.parametrize(
    "case, exc, pattern",
    [
        ("int_activations", TypeError, "activations must be float16, bfloat16 or float32"),
        ("mismatched_k", ValueError, "do not match the weight's 256 input features"),
        ("weight_not_fp8", TypeError, "weight must have dtype torch.float8_e4m3fn"),
        ("weight_1d", ValueError, r"weight must be 2-D \(N, K\)"),
        ("scale_shape", ValueError, r"one scale per 128x128 block of the \(40, 256\) weight, shape \(1, 2\), got \(40, 2\)"),
        ("scale_fp16", TypeError, "weight_scale_inv must have dtype torch.float32"),
        ("bias_shape", ValueError, r"bias must have shape \(40,\)"),
        ("block_not_pow2", ValueError, r"block size must be two powers of two .* got \[128, 96\]"),
        ("block_k_small", ValueError, r"cols >= 32 .* got \[128, 16\]"),
        ("block_three", ValueError, r"got \[128, 128, 1\]"),
        ("strided_weight", ValueError, "weight must be contiguous"),
        ("strided_scale", ValueError, "weight_scale_inv must be contiguous"),
    ],
)
def test_bad_inputs(case, exc, pattern):
    seed("bad", case)
    weight, scale = block_weights(40, 256, (128, 128))
    x, bias, block = torch.randn(3, 256, dtype=torch.bfloat16), None, [128, 128]
    if case == "int_activations":
        x = x.to(torch.int32)
    elif case == "mismatched_k":
        x = torch.randn(3, 128, dtype=torch.bfloat16)
    elif case == "weight_not_fp8":
        weight = weight.float()
    elif case == "weight_1d":
        weight = weight.flatten()
    elif case == "scale_shape":
        scale = torch.ones(40, 2)
    elif case == "scale_fp16":
        scale = scale.half()
    elif case == "bias_shape":
        bias = torch.randn(7, dtype=torch.bfloat16)
    elif case == "block_not_pow2":
        block = [128, 96]
    elif case == "block_k_small":
        block = [128, 16]
    elif case == "block_three":
        block = [128, 128, 1]
    elif case == "strided_weight":
        weight = weight.t().contiguous().t()
    elif case == "strided_scale":
        scale = torch.rand(2, 2)[:, :1].t()  # the right shape (1, 2), but strides (1, 2)
    with pytest.raises(exc, match=f"pymllm_fx.fp8_block_linear: .*{pattern}"):
        torch.ops.pymllm_fx.fp8_block_linear(x, weight, scale, block, bias)


def test_fake_shapes_on_meta():
    x = torch.empty(3, 4, 300, dtype=torch.bfloat16, device="meta")
    w = torch.empty(200, 300, dtype=FP8_DTYPE, device="meta")
    s = torch.empty(2, 3, dtype=torch.float32, device="meta")
    out = torch.ops.pymllm_fx.fp8_block_linear(x, w, s, [128, 128], None)
    assert out.shape == (3, 4, 200) and out.dtype == torch.bfloat16


def test_compiles_in_one_graph():
    """torch.compile(fullgraph=True) through fake tensors (aot_eager) with no graph break."""
    seed("compile")
    weight, scale = block_weights(48, 160, (32, 64))

    def fn(x):
        return torch.ops.pymllm_fx.fp8_block_linear(x + 1, weight, scale, [32, 64], None) * 3

    x = torch.randn(4, 160)
    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))
