"""int4's default searches each group's scale and zero point; ``rtn=True`` keeps plain min/max."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import pymllm_fx
from pymllm_fx.kernels.w4a16 import dequantize_int4, pack_int4
from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.methods.int4 import Int4LinearMethod, quantize_int4
from pymllm_fx.methods.registry import resolve
from checks import seed
from hf_models import model_and_sites

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def minmax_rtn(weight, group_size, sym):
    """Min/max round-to-nearest written here from its definition: per group of ``group_size`` inputs
    (a shorter last group), asym: the range [min(w, 0), max(w, 0)] in 15 steps and the integer zero
    point round(-min / step); sym: step max|w| / 7, codes round(w / step) in -8..7 stored plus 8.
    Codes are rounded with the float32 step; the step and zero point are stored in the weight's dtype."""
    w = weight.float()
    tiny = torch.finfo(torch.float32).tiny
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], group_size):
        g = w[:, start:start + group_size]
        if sym:
            step = (g.abs().amax(dim=1, keepdim=True) / 7).clamp(min=tiny)
            codes.append(torch.round(g / step).clamp(-8, 7) + 8)
        else:
            lo, hi = g.amin(dim=1, keepdim=True).clamp(max=0), g.amax(dim=1, keepdim=True).clamp(min=0)
            step = ((hi - lo) / 15).clamp(min=tiny)
            zero = torch.round(-lo / step).clamp(0, 15)
            codes.append((torch.round(g / step) + zero).clamp(0, 15))
            zeros.append(zero)
        scales.append(step)
    return (torch.cat(codes, 1).to(torch.uint8), torch.cat(scales, 1).to(weight.dtype),
            None if sym else torch.cat(zeros, 1).to(weight.dtype))


def dequantized(codes, scales, zeros, group_size):
    """(codes - zero) * scale in float64, per element."""
    group = torch.arange(codes.shape[1]) // group_size
    zero = 8.0 if zeros is None else zeros.double()[:, group]
    return (codes.double() - zero) * scales.double()[:, group]


def group_errors(weight, deq, group_size, weighted):
    """Per group, the squared error, plain or weighted by |w| + rms(group) / 2 (the search's criterion)."""
    n, k = weight.shape
    pad = -k % group_size
    w = F.pad(weight.double(), (0, pad)).view(n, -1, group_size)
    d = F.pad(deq, (0, pad)).view(n, -1, group_size)
    err = (d - w).square()
    if weighted:
        err = err * (w.abs() + 0.5 * w.square().sum(-1, keepdim=True).div(group_size).sqrt())
    return err.sum(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("k, group_size", [(64, 32), (200, 64), (576, 128)])
def test_rtn_gives_the_minmax_codes_bit_for_bit(k, group_size, sym, dtype):
    seed("rtn", k, group_size, sym, dtype)
    w = (torch.randn(24, k) * 0.05 + (0 if sym else 0.01)).to(dtype)
    w[3, : min(k, 40)] = torch.rand(min(k, 40)).to(dtype) + 0.2  # groups that do not span 0
    w[5] = 0  # all-zero groups
    got, want = quantize_int4(w, group_size, sym, rtn=True), minmax_rtn(w, group_size, sym)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[2] is None) == sym and (sym or torch.equal(got[2], want[2]))
    # and through the method, from a quantization_config
    method = resolve({"quant_method": "int4", "group_size": group_size, "sym": sym, "rtn": True})
    assert isinstance(method, Int4LinearMethod) and method.rtn
    layer = ReplicatedLinear(k, 24, bias=False, params_dtype=dtype, quant_method=method, prefix="blk.proj")
    layer.weight.weight_loader(layer.weight, w)
    method.process_weights_after_loading(layer)
    assert torch.equal(layer.qweight, pack_int4(want[0])) and torch.equal(layer.scales, want[1])
    assert (layer.zeros is None) == sym and (sym or torch.equal(layer.zeros, want[2]))
    assert method.describe(layer).startswith(f"W4A16 g{group_size} {'sym' if sym else 'asym'} rtn")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("k, group_size", [(64, 32), (200, 64), (576, 128)])
def test_default_grid_is_never_worse_than_rtn(k, group_size, sym, dtype):
    """The search judges min/max among its candidates, so every group's weighted error is at most
    RTN's; each code is the nearest level of its group's grid; zero points are integers 0..15."""
    seed("search", k, group_size, sym, dtype)
    w = (torch.randn(24, k) * 0.05 * torch.rand(24, 1) + (0 if sym else 0.01)).to(dtype)
    w[3, : min(k, 40)] = torch.rand(min(k, 40)).to(dtype) + 0.2
    w[5] = 0
    w[7, 9] = 1.0  # an outlier
    codes, scales, zeros = quantize_int4(w, group_size, sym)
    groups = -(-k // group_size)
    assert codes.shape == (24, k) and codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales.shape == (24, groups) and scales.dtype == dtype and scales.isfinite().all()
    assert (scales[torch.arange(24) != 5] > 0).all()  # an all-zero group's tiny scale may round to 0 in fp16
    if sym:
        assert zeros is None
    else:
        assert zeros.shape == (24, groups) and zeros.dtype == dtype
        assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
    deq = dequantized(codes, scales, zeros, group_size)
    # nearest level: within half a step, except weights clipped to the grid's end codes 0 and 15
    step = scales.double()[:, torch.arange(k) // group_size]
    inside = (codes > 0) & (codes < 15)
    assert ((deq - w.double()).abs()[inside] <= (0.5 * step * (1 + 1e-3))[inside]).all()
    rtn = dequantized(*quantize_int4(w, group_size, sym, rtn=True), group_size)
    searched, plain = group_errors(w, deq, group_size, True), group_errors(w, rtn, group_size, True)
    assert (searched <= plain * (1 + 1e-6) + 1e-30).all()
    assert searched.sum() < plain.sum()
    assert torch.equal(deq[5], torch.zeros(k, dtype=torch.float64))  # zeros stay exact
    # the runtime layout holds the same grid
    torch.testing.assert_close(dequantize_int4(pack_int4(codes), scales.double(), None if sym else zeros.double(), group_size), deq)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_default_weight_error_below_rtn_on_every_linear(arch, group_size, sym):
    """Tiny Llama and Qwen2 through quantize(): on every swapped linear the default's weight error
    (plain squared error, and the weighted error it minimizes) is below min/max RTN's."""
    model, _ = model_and_sites(arch)
    spec = {"quant_method": "int4", "group_size": group_size, "sym": sym}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = pymllm_fx.quantize(copy.deepcopy(model), spec, progress=False)
        rtn = pymllm_fx.quantize(copy.deepcopy(model), {**spec, "rtn": True}, progress=False)
    swapped = [name for name, m in default.named_modules() if isinstance(m, ReplicatedLinear)]
    assert len(swapped) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name in swapped:
        w = model.get_submodule(name).weight.detach()
        errors = {}
        for label, quantized in (("default", default), ("rtn", rtn)):
            layer = quantized.get_submodule(name)
            assert layer.quant_method.rtn == (label == "rtn")
            deq = dequantize_int4(layer.qweight, layer.scales.double(),
                                  None if layer.zeros is None else layer.zeros.double(), group_size)
            errors[label] = (group_errors(w, deq, group_size, False).sum(), group_errors(w, deq, group_size, True).sum())
        for i, kind in enumerate(("squared", "weighted")):
            assert errors["default"][i] < errors["rtn"][i], f"{arch} {name}: {kind} error not below RTN's"


def test_rtn_config_key_is_checked():
    assert resolve({"quant_method": "int4"}).rtn is False
    assert resolve({"quant_method": "int4", "rtn": False}).rtn is False
    with pytest.raises(ValueError, match=r"int4: quantization_config\['rtn'\] must be true or false"):
        resolve({"quant_method": "int4", "rtn": "yes"})
    assert resolve({"quant_method": "int4", "rtn": True}).experts_method().rtn is True
