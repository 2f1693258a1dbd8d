"""Every Triton kernel against its torch reference: small shapes with tails on the CPU through
Triton's interpreter (CI), the same cases on CUDA, and the Llama-3-8B shapes on CUDA only."""


import pytest
import torch

from pymllm_fx.kernels import _triton, fp8_w8a8, w4a16, w8a16
from checks import seed

pytestmark = pytest.mark.skipif(not _triton.HAS_TRITON, reason="triton is not installed")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # cpu: conftest.py sets TRITON_INTERPRET=1
# Relative error ||out - ref|| / ||ref|| against the op's torch reference. The interpreter rounds
# float -> bf16 by truncation (the GPU rounds to nearest), which costs up to one bf16 ulp.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# Small shapes: tails in N (not a multiple of any block) and M; K in whole 64-feature tiles (the
# int4 kernel's domain), groups from 16 to per-channel, a tail group (K=192, group 128).
SMALL = [(1, 40, 256, 64), (3, 24, 256, 32), (5, 33, 512, 128), (17, 70, 192, 64), (9, 20, 128, 16), (2, 12, 192, 128),
         (4, 24, 256, 256)]  # (M, N, K, group)
W4_CFGS = [  # one-warp-group K splits (SPLIT > 1: batched dots), plain tiles, scale in the dot or after it
    dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=64, SPLIT=2, num_warps=2, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT=4, num_warps=4, num_stages=2, SCALE_IN=True),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT=1, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=64, SPLIT=1, num_warps=4, num_stages=2, SCALE_IN=True),
    dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=64, SPLIT=1, SPLIT_K=2, num_warps=4, num_stages=2),  # K over programs too
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT=1, SPLIT_K=4, num_warps=4, num_stages=2),  # rows past M masked
    dict(BLOCK_M=8, BLOCK_N=16, BLOCK_K=64, SPLIT=2, SPLIT_K=2, num_warps=2, num_stages=2),  # both splits
]
W4_GEMV_CFGS = [dict(BLOCK_N=16, TILES=2, num_warps=4), dict(BLOCK_N=8, TILES=1, num_warps=2),
                dict(BLOCK_N=8, TILES=1, num_warps=2, PREFETCH=True)]  # codes and groups one step ahead
GEMV_CFGS = [dict(BLOCK_N=16, BLOCK_K=256, num_warps=4), dict(BLOCK_N=8, BLOCK_K=64, num_warps=2)]  # K tails, N tails
GEMM_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def w4_weights(n, k, group_size, dtype, asym):
    g = w4a16.num_groups(k, group_size)
    qweight = w4a16.pack_int4(torch.randint(0, 16, (n, k), dtype=torch.int32)).to(DEVICE)
    scales = (torch.rand(n, g) * 0.02 + 0.005).to(DEVICE, dtype)
    zeros = torch.randint(0, 16, (n, g)).to(DEVICE, dtype) if asym else None
    return qweight, scales, zeros


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("m, n, k, group_size", SMALL)
def test_w4a16_kernels_match_reference(m, n, k, group_size, asym, dtype):
    seed("w4", m, n, k, group_size, asym, dtype)
    qweight, scales, zeros = w4_weights(n, k, group_size, dtype, asym)
    x = torch.randn(m, k).to(DEVICE, dtype)
    bias = torch.randn(n).to(DEVICE, dtype)
    ref = w4a16.w4a16_reference(x, qweight, scales, zeros, group_size, bias)
    assert w4a16.fast_path_ok(k, group_size, dtype)
    for cfg in W4_CFGS:
        out = w4a16.w4a16_mma(x, qweight, scales, zeros, group_size, bias, dict(cfg))
        assert out.dtype == dtype and rel_err(out, ref) <= REL_TOL[dtype], cfg
    out = w4a16.w4a16_dequant_linear(x, qweight, scales, zeros, group_size, bias)  # dequantize then matmul
    assert out.dtype == dtype and rel_err(out, ref) <= REL_TOL[dtype]
    weight = w4a16.w4a16_dequantize(qweight, scales, zeros, group_size, dtype, block_n=16, tiles=2)
    assert rel_err(weight, w4a16.dequantize_int4(qweight, scales, zeros, group_size).to(dtype)) <= REL_TOL[dtype] / 2
    if w4a16.gemv_ok(k, group_size, dtype):  # the decode GEMV: one row, and all rows (a program row each)
        for cfg in W4_GEMV_CFGS:
            out = w4a16.w4a16_gemv(x[m - 1:], qweight, scales, zeros, group_size, bias, dict(cfg))
            assert rel_err(out, ref[m - 1:]) <= REL_TOL[dtype], cfg
            out = w4a16.w4a16_gemv(x, qweight, scales, zeros, group_size, bias, dict(cfg))
            assert out.shape == ref.shape and rel_err(out, ref) <= REL_TOL[dtype], cfg


@pytest.mark.parametrize("k, group_size", [(200, 64), (136, 8), (256, 48)])
def test_w4a16_shapes_off_the_kernel_take_the_reference(k, group_size):
    """K not in whole 64-feature tiles, or a group that splits a 16-feature quarter: the op is still exact."""
    seed("w4-off", k, group_size)
    assert not w4a16.fast_path_ok(k, group_size, torch.bfloat16)
    qweight, scales, zeros = w4_weights(24, k, group_size, torch.bfloat16, True)
    x = torch.randn(3, k).to(DEVICE, torch.bfloat16)
    out = w4a16.w4a16_triton(x, qweight, scales, zeros, group_size, None)
    assert torch.equal(out, w4a16.w4a16_reference(x, qweight, scales, zeros, group_size))


@pytest.mark.skipif(not CUDA, reason="inline PTX runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("m, n, k, group_size", SMALL + [(1, 4096, 4096, 128), (8, 6144, 4096, 128), (64, 512, 14336, 128)])
def test_w4a16_inline_ptx_is_bit_exact_with_the_portable_path(m, n, k, group_size, asym, dtype):
    seed("w4-asm", m, n, k, group_size, asym, dtype)
    qweight, scales, zeros = w4_weights(n, k, group_size, dtype, asym)
    x = torch.randn(m, k).to(DEVICE, dtype)
    for cfg in W4_CFGS:
        fast = w4a16.w4a16_mma(x, qweight, scales, zeros, group_size, None, dict(cfg))
        portable = w4a16.w4a16_mma(x, qweight, scales, zeros, group_size, None, dict(cfg, ASM=False))
        assert torch.equal(fast, portable), cfg
    assert torch.equal(w4a16.w4a16_dequantize(qweight, scales, zeros, group_size, dtype),
                       w4a16.dequantize_int4(qweight, scales, zeros, group_size).to(dtype))  # one rounding in both
    if w4a16.gemv_ok(k, group_size, dtype):
        for cfg in W4_GEMV_CFGS + [dict(BLOCK_N=16, TILES=64, num_warps=8)]:
            fast = w4a16.w4a16_gemv(x[:2], qweight, scales, zeros, group_size, None, dict(cfg))
            portable = w4a16.w4a16_gemv(x[:2], qweight, scales, zeros, group_size, None, dict(cfg, ASM=False))
            assert torch.equal(fast, portable), cfg


def w8_codes(n, k, codes):
    """int8 codes, or e4m3 codes (fp8 weight-only checkpoints) over their whole range."""
    if codes == "int8":
        return torch.randint(-128, 128, (n, k), dtype=torch.int8).to(DEVICE)
    return (torch.randn(n, k) * 64).clamp(-448, 448).to(fp8_w8a8.FP8_DTYPE).to(DEVICE)


@pytest.mark.parametrize("codes", ["int8", "e4m3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", [(1, 40, 200), (3, 24, 256), (17, 70, 136)])
def test_w8a16_kernels_match_reference(m, n, k, dtype, codes):
    seed("w8", m, n, k, dtype, codes)
    qweight = w8_codes(n, k, codes)
    scales = (torch.rand(n) * 0.02 + 0.001).to(DEVICE, dtype)
    x = torch.randn(m, k).to(DEVICE, dtype)
    bias = torch.randn(n).to(DEVICE, dtype)
    ref = w8a16.w8a16_reference(x, qweight, scales, bias)
    for cfg in GEMV_CFGS:
        assert rel_err(w8a16.w8a16_gemv(x, qweight, scales, bias, cfg), ref) <= REL_TOL[dtype], cfg
    assert rel_err(w8a16.w8a16_gemm(x, qweight, scales, bias, GEMM_CFG), ref) <= REL_TOL[dtype]
    weight = w8a16.w8a16_dequantize(qweight, scales, dtype, block_n=8, block_k=64)  # tails in N and K
    expect = qweight.to(dtype) * scales[:, None]
    if CUDA:  # one rounding of an exact float32 product, as the reference (the interpreter truncates)
        assert torch.equal(weight, expect)
    assert rel_err(weight, expect) <= REL_TOL[dtype] / 2


@pytest.mark.skipif(not CUDA, reason="inline PTX runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k", [(40, 200), (4096, 4096), (6144, 4096), (4096, 14336)])
def test_w8a16_inline_ptx_is_bit_exact_with_the_portable_path(n, k, dtype):
    seed("w8-asm", n, k, dtype)
    qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8).to(DEVICE)
    scales = (torch.rand(n) * 0.02 + 0.001).to(DEVICE, dtype)
    x = torch.randn(1, k).to(DEVICE, dtype)
    for cfg in GEMV_CFGS + [dict(BLOCK_N=8, BLOCK_K=1024, num_warps=4)]:
        fast = w8a16.w8a16_gemv(x, qweight, scales, None, dict(cfg))
        assert torch.equal(fast, w8a16.w8a16_gemv(x, qweight, scales, None, dict(cfg, ASM=False))), cfg


def fp8_emulated(xq, x_scale, weight, weight_scale, bias, dtype):
    """The fp8 product from given quantized activations, exactly in float32."""
    out = (xq.float() @ weight.float().t()) * x_scale * weight_scale
    return (out + bias.float()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", [(1, 40, 200), (3, 24, 256), (17, 70, 136)])
def test_fp8_kernels_match_reference(m, n, k, dtype):
    seed("fp8", m, n, k, dtype)
    weight, weight_scale = fp8_w8a8.quantize_fp8_per_channel(torch.randn(n, k).to(DEVICE))
    x = (torch.randn(m, k) * torch.logspace(-2, 1, k)).to(DEVICE, dtype)
    bias = torch.randn(n).to(DEVICE, dtype)
    xq, x_scale = fp8_w8a8.fp8_quantize_rows(x, block_k=64)
    ref_q, ref_scale = fp8_w8a8.quantize_fp8_per_token(x)
    assert torch.equal(x_scale, ref_scale)
    if CUDA:  # both round to nearest even. Triton 3.9's interpreter converts to e4m3 wrongly
        assert torch.equal(xq.float(), ref_q.float())  # (126.46 -> 64), so only CUDA checks values.
    # The kernels quantize x themselves (the GEMV fused); compare with the product of their values.
    ref = fp8_emulated(xq, x_scale, weight, weight_scale, bias, dtype)
    gemv_cfg = dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2)
    assert rel_err(fp8_w8a8.fp8_gemv(x, weight, weight_scale, bias, gemv_cfg), ref) <= REL_TOL[dtype]
    assert rel_err(fp8_w8a8.fp8_gemm(x, weight, weight_scale, bias, GEMM_CFG), ref) <= REL_TOL[dtype]
    if CUDA:
        full_ref = fp8_w8a8.fp8_linear_reference(x, weight, weight_scale, bias)
        assert rel_err(fp8_w8a8.fp8_triton(x, weight, weight_scale, bias), full_ref) <= REL_TOL[dtype]


@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 4)], ids=["3d", "4d"])
def test_launchers_take_batched_and_strided_activations(lead):
    seed("lead", lead)
    n, k, group_size = 24, 128, 32
    qweight, scales, zeros = w4_weights(n, k, group_size, torch.float16, True)
    wide = torch.randn(*lead, 2 * k).to(DEVICE, torch.float16)
    x = wide[..., ::2]  # a strided view: the launcher makes the rows contiguous
    out = w4a16.w4a16_triton(x, qweight, scales, zeros, group_size, None)
    assert out.shape == (*lead, n)
    ref = w4a16.w4a16_reference(x.contiguous(), qweight, scales, zeros, group_size)
    assert rel_err(out, ref) <= REL_TOL[torch.float16]
    q8 = torch.randint(-128, 128, (n, k), dtype=torch.int8).to(DEVICE)
    s8 = torch.rand(n).to(DEVICE, torch.float16) * 0.01
    out8 = w8a16.w8a16_triton(x, q8, s8, None)
    assert out8.shape == (*lead, n) and rel_err(out8, w8a16.w8a16_reference(x, q8, s8)) <= REL_TOL[torch.float16]


@pytest.mark.parametrize(
    "op, make",
    [
        ("w4a16_linear", lambda: (w4_weights(8, 64, 32, torch.float16, True), 32)),
        ("w8a16_linear", lambda: ((torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, dtype=torch.float16)), None)),
    ],
)
def test_ops_refuse_non_contiguous_weights(op, make):
    tensors, group_size = make()
    tensors = [t.cpu() if t is not None else None for t in tensors]
    strided = tensors[0].t().contiguous().t()  # same shape and values, column-major strides
    assert not strided.is_contiguous()
    args = [torch.randn(2, 64, dtype=torch.float16), strided, *tensors[1:]]
    args += [group_size, None] if group_size else [None]
    with pytest.raises(ValueError, match=f"pymllm_fx.{op}: qweight must be contiguous"):
        getattr(torch.ops.pymllm_fx, op)(*args)


def test_fp8_refuses_non_contiguous_weight():
    weight, scale = fp8_w8a8.quantize_fp8_per_channel(torch.randn(16, 32))
    strided = weight.t().contiguous().t()
    with pytest.raises(ValueError, match="pymllm_fx.fp8_linear: weight must be contiguous"):
        torch.ops.pymllm_fx.fp8_linear(torch.randn(2, 32), strided, scale, None)


# --- real shapes, CUDA only: every path the op chooses, through the op itself -------------------

LLAMA_SHAPES = [(4096, 4096), (14336, 4096), (4096, 28672)]  # (K, N)


@pytest.mark.skipif(not CUDA, reason="real shapes need a CUDA device")
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 32, 64, 128, 1024])
@pytest.mark.parametrize("k, n", LLAMA_SHAPES)
def test_ops_on_cuda_at_llama_shapes(k, n, m):
    seed("cuda", k, n, m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    g = w4a16.num_groups(k, 128)
    qweight = w4a16.pack_int4(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32))
    scales = (torch.rand(n, g, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, g), device="cuda").to(torch.bfloat16)
    out = torch.ops.pymllm_fx.w4a16_linear(x, qweight, scales, zeros, 128, bias)
    assert rel_err(out, w4a16.w4a16_reference(x, qweight, scales, zeros, 128, bias)) <= 1e-2
    out = torch.ops.pymllm_fx.w4a16_linear(x, qweight, scales, None, 128, None)
    assert rel_err(out, w4a16.w4a16_reference(x, qweight, scales, None, 128)) <= 1e-2
    q8 = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
    s8 = (torch.rand(n, device="cuda") * 0.01).to(torch.bfloat16)
    out = torch.ops.pymllm_fx.w8a16_linear(x, q8, s8, bias)
    assert rel_err(out, w8a16.w8a16_reference(x, q8, s8, bias)) <= 1e-2
    e4m3 = (torch.randn(n, k, device="cuda") * 64).clamp(-448, 448).to(fp8_w8a8.FP8_DTYPE)  # fp8 weight-only
    out = torch.ops.pymllm_fx.w8a16_linear(x, e4m3, s8, bias)
    assert rel_err(out, w8a16.w8a16_reference(x, e4m3, s8, bias)) <= 1e-2
    weight, weight_scale = fp8_w8a8.quantize_fp8_per_channel(torch.randn(n, k, device="cuda"))
    out = torch.ops.pymllm_fx.fp8_linear(x, weight, weight_scale, bias)
    assert rel_err(out, fp8_w8a8.fp8_linear_reference(x, weight, weight_scale, bias)) <= 1e-2
