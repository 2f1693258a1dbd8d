"""Peer int4 weight-only linears for the GPU benchmarks.

Each ``make_*`` builder takes a bf16 CUDA weight ``w`` of shape (N, K) (nn.Linear
convention: ``y = x @ w.T``) and returns a :class:`PeerLinear`:

* ``fn(x)``            -- x: bf16 (M, K) contiguous CUDA tensor -> bf16 (M, N)
* ``tensors``          -- the peer's packed tensors that ``fn`` reads (the HBM traffic)
* ``clone()``          -- a new PeerLinear on fresh copies of ``tensors`` (same math), so a
                          benchmark can cycle through e.g. 20 copies to defeat the L2 cache:
                          ``copies = peer.copies(20); for p in copies: p.fn(x)``
* ``reference_weight`` -- bf16 (N, K): the weight the packed data dequantizes to, so
                          ``fn(x) ~= x @ reference_weight.T`` (check with :func:`rel_err`)

Peers (versions pinned for the GPU machine: torch 2.11 (cu130), triton 3.6,
gemlite 0.6.0.post2, torchao 0.18.0):

a. ``make_tinygemm``  -- torch.ops.aten._convert_weight_to_int4pack / _weight_int4pack_mm
   (the "tinygemm" kernel that torchao's int4 "tile_packed_to_4d" format calls).
b. ``make_gemlite``   -- gemlite A16W4 Triton kernels (GemLiteLinearTriton, W_nbits=4).
c. ``apply_torchao_int4`` -- whole-model torchao quantize_(Int4WeightOnlyConfig(
   int4_packing_format="tile_packed_to_4d")) for the end-to-end benchmark.

Every peer is imported lazily inside the functions, so ``import peers``
works without gemlite / torchao installed (and without CUDA).

Run ``python benchmarks/peers.py`` on a CUDA machine for a self-check.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = [
    "PeerLinear",
    "rel_err",
    "quantize_tinygemm_rtn",
    "tinygemm_from_codes",
    "make_tinygemm",
    "quantize_hqq_rtn",
    "setup_gemlite",
    "gemlite_from_codes",
    "make_gemlite",
    "apply_torchao_int4",
    "PEERS",
]


# --------------------------------------------------------------------------------------
# Common container
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class PeerLinear:
    """One peer int4 linear layer: a callable plus the packed tensors it reads."""

    name: str
    fn: Callable[[Tensor], Tensor]
    tensors: Dict[str, Tensor]
    # Builds a fresh ``fn`` bound to a (possibly cloned) tensors dict.
    make_fn: Callable[[Dict[str, Tensor]], Callable[[Tensor], Tensor]]
    reference_weight: Tensor  # bf16 (N, K), shared between clones (not cloned)
    info: Dict[str, object] = dataclasses.field(default_factory=dict)

    def clone(self) -> "PeerLinear":
        """Independent copy: every packed tensor is cloned (new memory), same results."""
        tensors = {k: v.clone() for k, v in self.tensors.items()}
        return dataclasses.replace(self, fn=self.make_fn(tensors), tensors=tensors)

    def copies(self, n: int) -> List["PeerLinear"]:
        """``n`` independent copies (all freshly cloned) for L2-cache-busting loops."""
        return [self.clone() for _ in range(n)]

    @property
    def nbytes(self) -> int:
        """Bytes of packed data one call reads (weights + scales/zeros)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_w(w: Tensor, group_size: int) -> Tuple[int, int]:
    assert w.dim() == 2, f"w must be (N, K), got {tuple(w.shape)}"
    N, K = w.shape
    assert K % group_size == 0, f"K={K} not divisible by group_size={group_size}"
    return N, K


def _expand_groups(t: Tensor, group_size: int) -> Tensor:
    """(N, K/g) -> (N, K) by repeating each group value g times along K."""
    return t.repeat_interleave(group_size, dim=1)


# --------------------------------------------------------------------------------------
# a. tinygemm: aten._convert_weight_to_int4pack + aten._weight_int4pack_mm (CUDA)
# --------------------------------------------------------------------------------------
# Verified against:
#   * pytorch aten/src/ATen/native/cuda/int4mm.cu (_convert_weight_to_int4pack_cuda,
#     _weight_int4pack_mm_cuda, BLayout_TC_int4::load, convert_i4x8_to_bf16x2x4)
#   * torch/_meta_registrations.py (meta__convert_weight_to_int4pack: input uint8 [n][k/2],
#     output int32 [n/8][k/(inner_k_tiles*16)][32][inner_k_tiles/2])
#   * torchao 0.18 quantization/quantize_/workflows/int4/int4_tile_packed_to_4d_tensor.py
#     (Int4TilePackedTo4dTensor.from_hp and its aten.linear impl), quant_primitives.py
#     (_choose_qparams_affine_tinygemm, _quantize_affine_tinygemm), utils.py
#     (pack_tinygemm_scales_and_zeros)
#
# Conventions (CUDA kernel, torch >= 2.5):
#   * packing input: uint8 (N, K/2), element k even in the HIGH nibble, k odd in the low
#     nibble: ``(q[:, ::2] << 4) | q[:, 1::2]`` (exactly what torchao does).
#   * inner_k_tiles in {2, 4, 8} (torchao fixes 8); needs N % 8 == 0, K % (inner_k_tiles*16) == 0.
#   * scales_and_zeros: bf16 (K/g, N, 2), [..., 0] = scale, [..., 1] = zero.
#   * dequant (in bf16 fma): W[n, k] = (q[n, k] - 8) * scale + zero   (q in 0..15)
#     i.e. the zero lives in the float domain: zero = min + 8 * scale (torchao's
#     "ZeroPointDomain.FLOAT" / tinygemm convention).
#   * x must be bf16, 2-D, contiguous; group_size in {32, 64, 128, 256}; output bf16 (M, N).
#   * no autotuning; one fixed kernel config (8 warps, 8 k-tiles per warp).


def quantize_tinygemm_rtn(w: Tensor, group_size: int = 128) -> Tuple[Tensor, Tensor, Tensor]:
    """RTN asymmetric int4 exactly as torchao's TINYGEMM qparams path does it.

    Mirrors ``_choose_qparams_affine_tinygemm`` + ``_quantize_affine_tinygemm`` op by op in
    bf16 (scale_dtype = zero_point_dtype = bf16), so codes/scales/zeros match what
    ``quantize_(Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"))`` produces.

    Returns q uint8 (N, K) in 0..15, scales bf16 (N, K/g), zeros bf16 (N, K/g) with
    W ~= (q - 8) * scale + zero.
    """
    N, K = _check_w(w, group_size)
    x = w.to(torch.bfloat16).reshape(N, K // group_size, group_size)
    quant_min, quant_max, mid = 0, 15, 8.0  # mid_point = (quant_max + quant_min + 1) / 2
    min_val = torch.amin(x, dim=-1)
    max_val = torch.amax(x, dim=-1)
    scale = (max_val - min_val) / float(quant_max - quant_min)
    scale = torch.clamp(scale, min=torch.finfo(torch.bfloat16).smallest_normal)
    zero = min_val + scale * mid
    scale = scale.to(torch.bfloat16)
    zero = zero.to(torch.bfloat16)
    # _quantize_affine_tinygemm_no_dtype_cast
    lo = (zero - scale * mid).unsqueeze(-1)
    q = torch.clamp(torch.round((x - lo) / scale.unsqueeze(-1)), quant_min, quant_max)
    q = q.reshape(N, K).to(torch.uint8)
    return q, scale, zero


def tinygemm_from_codes(
    q: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int = 128,
    inner_k_tiles: int = 8,
) -> PeerLinear:
    """Pack codes for tinygemm.

    q: (N, K) integer codes 0..15 (any int dtype); scales, zeros: (N, K/g) with
    W = (q - 8) * scale + zero  (float-domain zero; from an HQQ-style (s, z) with
    W = (q - z) * s use zero = (8 - z) * s).
    """
    N, K = _check_w(q, group_size)
    assert group_size in (32, 64, 128, 256), "tinygemm supports group_size 32/64/128/256"
    assert inner_k_tiles in (2, 4, 8)
    assert N % 8 == 0, "tinygemm needs N % 8 == 0"
    assert K % (inner_k_tiles * 16) == 0, f"tinygemm needs K % {inner_k_tiles * 16} == 0"
    q = q.to(torch.uint8)
    scales = scales.to(torch.bfloat16).reshape(N, K // group_size)
    zeros = zeros.to(torch.bfloat16).reshape(N, K // group_size)

    # uint8 [n][k/2]: even k -> high nibble (torchao's quant_2d)
    q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, inner_k_tiles)
    # (N, K/g, 2) -> (K/g, N, 2) contiguous  (torchao pack_tinygemm_scales_and_zeros)
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()

    ref = ((q.float() - 8.0) * _expand_groups(scales.float(), group_size)
           + _expand_groups(zeros.float(), group_size)).to(torch.bfloat16)

    def make_fn(t: Dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
        mm = torch.ops.aten._weight_int4pack_mm
        w_packed, s_and_z = t["packed"], t["scales_and_zeros"]

        def fn(x: Tensor) -> Tensor:
            # x: bf16 (M, K) contiguous -> bf16 (M, N)
            return mm(x, w_packed, group_size, s_and_z)

        return fn

    tensors = {"packed": packed, "scales_and_zeros": sz}
    return PeerLinear(
        name="tinygemm",
        fn=make_fn(tensors),
        tensors=tensors,
        make_fn=make_fn,
        reference_weight=ref,
        info={"group_size": group_size, "inner_k_tiles": inner_k_tiles, "N": N, "K": K},
    )


def make_tinygemm(w: Tensor, group_size: int = 128, inner_k_tiles: int = 8) -> PeerLinear:
    """tinygemm int4 linear from a bf16 CUDA weight (N, K), quantized like torchao."""
    q, s, z = quantize_tinygemm_rtn(w, group_size)
    return tinygemm_from_codes(q, s, z, group_size, inner_k_tiles)


# --------------------------------------------------------------------------------------
# b. gemlite 0.6 A16W4 (Triton)
# --------------------------------------------------------------------------------------
# Verified against gemlite 0.6.0.post2 (sdist; no wheel on PyPI):
#   * gemlite/__init__.py: exports GemLiteLinearTriton, GemLiteLinear (= GemLiteLinearTriton),
#     DType, set_autotune, set_packing_bitwidth, set_kernel_caching, load_config,
#     cache_config, reset_config, forward_functional, ...
#   * gemlite/core.py: GemLiteLinearTriton.__init__(W_nbits, group_size, in_features,
#     out_features, input_dtype, output_dtype, acc_dtype=None, scaled_activations=False),
#     .pack(W_q, scales, zeros, bias=None, fma_mode=True, contiguous=None,
#     packing_bitwidth=None, packed=False), .get_tensor_args(), .get_meta_args(),
#     .forward_auto_no_warmup -> forward_functional (torch custom op "gemlite::forward_functional"),
#     get_matmul_type (M<=4: GEMV_REVSPLITK, 4<M<64: GEMM_SPLITK, M>=64: GEMM),
#     get_default_cache_config (loads configs/<gpu>.json matching the device name at import)
#   * gemlite/helper.py: A16Wn.from_weights_ / A16W4_HQQ_INT (what gemlite's own helpers do:
#     scales/zeros cast to the activation dtype, GemLiteLinearTriton(...).pack(...))
#   * gemlite/triton_kernels/config.py: set_autotune(config) ("fast" default, "max",
#     "default"/False), AUTOTUNE.USE_CUDA_GRAPH; utils.py: dequantize() W_group_mode 3/4.
#
# Conventions:
#   * W_q: uint8 (N, K) codes 0..15 (MUST be uint8 so pack() bit-packs it; 32-bit packing
#     over K by default -> int32 (K/8, N)); scales, zeros: (N, K/g), W = (W_q - zeros) * scales.
#   * pack(fma_mode=True) (the default, used by gemlite's helpers) stores
#     zeros' = bf16(-zeros * scales) and dequantizes W = fma(W_q, scales, zeros') in bf16.
#   * importing gemlite needs CUDA (it queries device 0 at import) and, on a GPU whose
#     name contains a bundled config tag (e.g. "h100"), loads configs/h100.json:
#     for (M bucket, N, K, g) in that file no autotune is run. On an H200 no config
#     matches ("h100" is not in "nvidia_h200"), so every new shape autotunes.
#   * Autotune: triton.autotune keyed on (M bucket [M itself for GEMV kernels], N, K,
#     group_size, elements_per_sample, dtype, ...). The FIRST call of every new key JIT-
#     compiles and benchmarks the candidate configs (seconds). Warm up by calling fn(x)
#     once per M you will time (all clones share the autotune cache; it is in-process
#     only, use gemlite.cache_config(path)/load_config(path) to persist it).
#   * Accuracy: with gemlite's defaults the M < 64 split-K paths add partial sums with
#     bf16 atomics (see setup_gemlite(native_atomic_bf16=...)); results are then slightly
#     nondeterministic and ~1e-2 off the fp32 reference. M >= 64 (GEMM) is ~1.7e-3.
#   * Per-call host overhead: each call goes through a torch custom op + triton autotuner
#     dispatch; GEMM_SPLITK/GEMV kernels also launch a zero-fill (torch.zeros / pre_hook).
#     Measured on H100 + torch 2.11: ~250-350 us of CPU per eager call (mostly
#     torch._library.custom_ops backend_impl), so eager loops are CPU-bound (N=K=4096:
#     ~245-345 us/call eager vs 8.4/13.7/43.6 us/call at M=1/16/128 inside a CUDA graph;
#     tinygemm: 15/23/156 eager, 6.6/21.9/154 graphed). Capture timed loops in a CUDA graph.
#   * First call of an uncached shape (e.g. N=1536, K=4096 on H100): ~10-12 s per M bucket.


def quantize_hqq_rtn(w: Tensor, group_size: int = 128) -> Tuple[Tensor, Tensor, Tensor]:
    """Plain RTN asymmetric int4 in gemlite/HQQ convention W ~= (q - z) * s.

    Returns q uint8 (N, K) in 0..15, scales bf16 (N, K/g), zeros bf16 (N, K/g) (float zero,
    as HQQ stores it). Codes are computed with the bf16-rounded scales/zeros.
    """
    N, K = _check_w(w, group_size)
    x = w.float().reshape(N, K // group_size, group_size)
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    s = ((mx - mn) / 15.0).clamp_min(1e-8).to(torch.bfloat16)
    z = (-mn / s.float()).to(torch.bfloat16)
    q = torch.round(x / s.float().unsqueeze(-1) + z.float().unsqueeze(-1)).clamp_(0, 15)
    return q.reshape(N, K).to(torch.uint8), s, z


def setup_gemlite(
    autotune: Optional[str] = None,
    config_file: Optional[str] = None,
    reset_config: bool = False,
    packing_bitwidth: Optional[int] = None,
    native_atomic_bf16: Optional[bool] = None,
) -> None:
    """Global gemlite knobs; call once BEFORE building/warming any gemlite layer.

    autotune: None = keep gemlite's default ("fast" for every kernel); "max" = exhaustive
        (slow, minutes per shape); "default" = 1-2 fixed configs, no search.
        (gemlite.set_autotune reloads its kernel modules, dropping in-process tune results.)
    config_file: path of a gemlite autotune cache json to load, or a bundled tag such as
        "h100" (gemlite/configs/h100.json). gemlite already loads the bundled file that
        matches the GPU name at import (h100 on an H100; nothing on an H200).
    reset_config: drop all cached configs first (forces autotuning of every shape).
    packing_bitwidth: 8/16/32/64 (gemlite default 32; README: "recommended to leave this
        at the default value").
    native_atomic_bf16: gemlite default True on sm_90+: the split-K kernels used for M < 64
        (GEMV_REVSPLITK for M <= 4, GEMM_SPLITK for 4 < M < 64) atomically add partial sums
        straight into the bf16 output. Measured on H100 (N=256..4096, K=4096, g=128):
        rel. error vs the dequantized reference 0.3-2e-2 (M=1..16) instead of ~1.7e-3.
        False = accumulate into an fp32 buffer, then cast (an extra cast kernel per call;
        README: "recommended to leave this at the default value"). Read at every call.
    """
    import gemlite

    if reset_config:
        gemlite.reset_config()
    if config_file:
        path = config_file
        if not os.path.exists(path):
            path = os.path.join(os.path.dirname(gemlite.__file__), "configs", f"{config_file}.json")
        if not gemlite.load_config(path):
            raise FileNotFoundError(f"gemlite config not loaded: {config_file}")
    if autotune is not None:
        gemlite.set_autotune(autotune)
    if packing_bitwidth is not None:
        gemlite.set_packing_bitwidth(packing_bitwidth)
    if native_atomic_bf16 is not None:
        gemlite.set_native_atomic_bfp16(native_atomic_bf16)


def gemlite_from_codes(
    q: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int = 128,
    packing_bitwidth: Optional[int] = None,
    fma_mode: bool = True,
) -> PeerLinear:
    """Pack codes for gemlite A16W4 (bf16 in / bf16 out).

    q: (N, K) codes 0..15; scales, zeros: (N, K/g) with W = (q - zeros) * scales
    (HQQ convention). From tinygemm's (scale, zero_f) with W = (q - 8) * scale + zero_f use
    zeros = 8 - zero_f / scale.
    """
    from gemlite import DType, GemLiteLinearTriton
    from gemlite.core import forward_functional

    N, K = _check_w(q, group_size)
    assert K % 32 == 0 and group_size >= 16
    dev = q.device
    layer = GemLiteLinearTriton(
        W_nbits=4,
        group_size=group_size,
        in_features=K,
        out_features=N,
        input_dtype=DType.BF16,
        output_dtype=DType.BF16,
        scaled_activations=False,
    )
    layer.pack(
        q.to(device=dev, dtype=torch.uint8).contiguous(),  # uint8 => gemlite bit-packs it
        scales.to(device=dev, dtype=torch.bfloat16).reshape(N, K // group_size),
        zeros.to(device=dev, dtype=torch.bfloat16).reshape(N, K // group_size),
        bias=None,
        fma_mode=fma_mode,
        packing_bitwidth=packing_bitwidth,
    )
    meta_args = layer.get_meta_args()  # list[int], shared by all clones
    W_q, s_t, z_t, meta_scale = (t.data for t in layer.get_tensor_args())
    tensors = {"W_q": W_q, "scales": s_t, "zeros": z_t, "meta_scale": meta_scale}

    # Reference from the tensors the kernel actually reads: scales/zeros are (K/g, N).
    s_full = _expand_groups(s_t.t().float(), group_size)
    z_full = _expand_groups(z_t.t().float(), group_size)
    if layer.W_group_mode == 4:  # fma_mode: W = q * s + z' with z' = bf16(-z * s)
        ref = q.float() * s_full + z_full
    elif layer.W_group_mode == 3:  # W = (q - z) * s
        ref = (q.float() - z_full) * s_full
    else:
        raise RuntimeError(f"unexpected gemlite W_group_mode={layer.W_group_mode}")
    ref = ref.to(torch.bfloat16)

    def make_fn(t: Dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
        args = [t["W_q"], t["scales"], t["zeros"], t["meta_scale"]]

        def fn(x: Tensor) -> Tensor:
            # same call as GemLiteLinearTriton.forward (forward_auto_no_warmup):
            # matmul_type=-1 => gemlite picks GEMV_REVSPLITK / GEMM_SPLITK / GEMM from M.
            return forward_functional(x, None, args, meta_args)

        return fn

    return PeerLinear(
        name="gemlite",
        fn=make_fn(tensors),
        tensors=tensors,
        make_fn=make_fn,
        reference_weight=ref,
        info={
            "group_size": group_size,
            "N": N,
            "K": K,
            "elements_per_sample": layer.elements_per_sample,
            "W_group_mode": layer.W_group_mode,
            "meta_args": meta_args,
            "layer": layer,  # the original nn.Module (layer.forward(x) == fn(x))
        },
    )


def make_gemlite(w: Tensor, group_size: int = 128, packing_bitwidth: Optional[int] = None) -> PeerLinear:
    """gemlite A16W4 linear from a bf16 CUDA weight (N, K) (RTN asym, HQQ convention).

    The first fn(x) for each new M bucket compiles + autotunes: warm up before timing.
    """
    q, s, z = quantize_hqq_rtn(w, group_size)
    return gemlite_from_codes(q, s, z, group_size, packing_bitwidth=packing_bitwidth)


# --------------------------------------------------------------------------------------
# c. torchao 0.18 end-to-end: Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")
# --------------------------------------------------------------------------------------
# Verified against torchao 0.18.0 wheel:
#   * torchao/quantization/quant_api.py: Int4WeightOnlyConfig(group_size=128,
#     set_inductor_config=True, int4_packing_format=Int4PackingFormat.PLAIN,
#     int4_choose_qparams_algorithm=TINYGEMM, int4_tile_packed_ntile=8, version=2);
#     quantize_(model, config, filter_fn=None [-> _is_linear], device=None);
#     _int4_weight_only_transform calls recommended_inductor_config_setter() when
#     set_inductor_config (mutates torch._inductor.config globally!).
#   * .../workflows/int4/int4_packing_format.py: Int4PackingFormat.TILE_PACKED_TO_4D =
#     "tile_packed_to_4d" (str enum, so the plain string works; torchao's own
#     test/prototype/test_awq.py passes the string).
#   * .../workflows/int4/int4_tile_packed_to_4d_tensor.py: needs bf16 weight, CUDA cc >= 8,
#     pads K up to a multiple of 1024 and N to a multiple of 8 (padding is real extra work
#     for e.g. K=11008 -> 11264), uses only aten._convert_weight_to_int4pack /
#     aten._weight_int4pack_mm -- no fbgemm-gpu-genai / mslk needed. (The DEFAULT
#     packing_format "plain" -> Int4Tensor needs the `mslk` package; "preshuffled" too.)
#     Its linear: reshape x to 2-D, .to(bf16), F.pad(K to 1024-multiple) -- which clones x
#     even when no padding is needed --, _weight_int4pack_mm, slice N, reshape, + bias.
#   * torchao/__init__.py: loads its _C*.so only for torch >= 2.11 (warns otherwise); the
#     tile_packed_to_4d path does not need them.


def apply_torchao_int4(
    model: torch.nn.Module,
    group_size: int = 128,
    filter_fn: Optional[Callable[[torch.nn.Module, str], bool]] = None,
    set_inductor_config: bool = True,
) -> torch.nn.Module:
    """torchao int4 weight-only (tinygemm) on every nn.Linear of ``model``, in place.

    ``model`` must already be bf16 and on CUDA (e.g. ``model.to("cuda", torch.bfloat16)``).
    filter_fn(module, fqn) -> bool selects modules (default: torchao's _is_linear, i.e. every
    nn.Linear incl. lm_head; pass e.g. ``lambda m, n: isinstance(m, torch.nn.Linear) and
    "lm_head" not in n`` to match a library that skips lm_head). Linears whose in_features
    is not a multiple of group_size are left unquantized by torchao.
    set_inductor_config=True is torchao's default (sets coordinate_descent_tuning etc. in
    torch._inductor.config for the whole process -- affects any later torch.compile).
    """
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    config = Int4WeightOnlyConfig(
        group_size=group_size,
        int4_packing_format="tile_packed_to_4d",
        set_inductor_config=set_inductor_config,
    )
    quantize_(model, config, filter_fn=filter_fn)
    return model


PEERS: Dict[str, Callable[..., PeerLinear]] = {
    "tinygemm": make_tinygemm,
    "gemlite": make_gemlite,
}


# --------------------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------------------
def _self_check() -> int:
    if not torch.cuda.is_available():
        print("peers.py self-check: CUDA is needed (no CUDA device found); nothing run.")
        return 0

    torch.manual_seed(0)
    dev = "cuda"
    tol = 1e-2
    K = 4096
    shapes = [(256, K), (1024, K), (4096, K)]
    Ms = [1, 3, 16, 128]
    failures = 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")

    def report(tag: str, err: float, limit: float = tol) -> None:
        nonlocal failures
        ok = err < limit
        failures += 0 if ok else 1
        print(f"  {tag:<44s} rel_err={err:.2e}  {'OK' if ok else 'FAIL'}")

    for name, make in PEERS.items():
        print(f"[{name}]")
        try:
            for N, K_ in shapes:
                w = (torch.randn(N, K_, device=dev) * 0.02).to(torch.bfloat16)
                peer = make(w, group_size=128)
                wq_err = rel_err(peer.reference_weight, w)
                print(f"  N={N} K={K_}: packed {peer.nbytes / 2**20:.2f} MiB, "
                      f"quant rel_err(ref_w, w)={wq_err:.3f}")
                clone = peer.clone()
                for M in Ms:
                    x = torch.randn(M, K_, device=dev, dtype=torch.bfloat16)
                    ref = x.float() @ peer.reference_weight.float().T
                    out = peer.fn(x)
                    assert out.shape == (M, N) and out.dtype == torch.bfloat16, (out.shape, out.dtype)
                    # gemlite's default bf16-atomic split-K paths (M < 64) get a looser bound
                    atomic = name == "gemlite" and M < 64
                    lim = 4e-2 if atomic else tol
                    sfx = " (bf16 atomics)" if atomic else ""
                    report(f"N={N} M={M}{sfx}", rel_err(out, ref), lim)
                    report(f"N={N} M={M} clone{sfx}", rel_err(clone.fn(x), ref), lim)
                    if atomic:  # gemlite with fp32 split-K accumulation: must meet tol
                        setup_gemlite(native_atomic_bf16=False)
                        try:
                            report(f"N={N} M={M} (fp32 atomics)", rel_err(peer.fn(x), ref))
                        finally:
                            setup_gemlite(native_atomic_bf16=True)
                del peer, clone
        except ImportError as e:
            print(f"  SKIP ({e})")

    print("[torchao tile_packed_to_4d]")
    try:
        import torchao  # noqa: F401

        for N, K_ in shapes[:2]:
            w = (torch.randn(N, K_, device=dev) * 0.02).to(torch.bfloat16)
            lin = torch.nn.Linear(K_, N, bias=False, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(w)
            model = torch.nn.Sequential(lin)
            apply_torchao_int4(model, group_size=128, set_inductor_config=False)
            print(f"  weight type after quantize_: {type(model[0].weight).__name__}")
            tg = make_tinygemm(w, 128)  # same quantization math => same packed weight
            same = torch.equal(model[0].weight.qdata, tg.tensors["packed"]) and torch.equal(
                model[0].weight.scale_and_zero, tg.tensors["scales_and_zeros"])
            print(f"  N={N}: packed data identical to make_tinygemm: {same}")
            for M in Ms:
                x = torch.randn(M, K_, device=dev, dtype=torch.bfloat16)
                ref = x.float() @ tg.reference_weight.float().T
                with torch.no_grad():
                    report(f"N={N} M={M} (vs tinygemm reference)", rel_err(model(x), ref))
    except ImportError as e:
        print(f"  SKIP ({e})")

    print("self-check:", "PASS" if failures == 0 else f"{failures} FAILURE(S)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(_self_check())
