"""GPTQ (AutoGPTQ / GPTQModel) checkpoints: golden tensors packed here by the format's own definition.

The packers below follow GPTQModel's ``PackableQuantLinear.pack_original``
(gptqmodel/nn_modules/qlinear/__init__.py): ``qweight[row] |= intweight[row * f + j] << (bits * j)``
(packed along K) and ``qzeros[:, col] |= zeros[:, col * f + j] << (bits * j)`` (along N). A "gptq"
(v1) checkpoint is the v2 one after GPTQModel's ``convert_gptq_v2_to_v1_format_module``
(gptqmodel/utils/model.py): ``qzeros -= 0x11111111`` (4-bit) / ``0x01010101`` (8-bit) on the packed
int32 words. They share no code with the method's unpacking.
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

import pymllm_fx
from pymllm_fx.kernels.w4a16 import dequantize_int4
from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.methods.gptq import GPTQLinearMethod
from checks import build_layer, rel_err, seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
V1_OFFSET = {4: 0b00010001000100010001000100010001, 8: 0b00000001000000010000000100000001}


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits (two's complement wrap)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``(K, N)`` -> int32 ``(K // f, N)``: value j of word row r is row ``r * f + j``."""
    f = 32 // bits
    packed = torch.zeros(intweight.shape[0] // f, intweight.shape[1], dtype=torch.int64)
    for row in range(packed.shape[0]):
        for j in range(f):
            packed[row] |= intweight[row * f + j].long() << (bits * j)
    return to_int32(packed)


def pack_cols(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``(G, N)`` -> int32 ``(G, N // f)``: value j of word column c is column ``c * f + j``."""
    f = 32 // bits
    packed = torch.zeros(zeros.shape[0], zeros.shape[1] // f, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for j in range(f):
            packed[:, col] |= zeros[:, col * f + j].long() << (bits * j)
    return to_int32(packed)


def make_gptq(k, n, group_size, bits=4, sym=False, fmt="gptq_v2", act_order=False, scale_dtype=torch.float16):
    """Known codes/zeros/scales/g_idx, their checkpoint tensors, and the float64 weight they encode."""
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (k, n))
    z = torch.full((groups, n), 1 << (bits - 1)) if sym else torch.randint(0, top + 1, (groups, n))
    if not sym:
        z[0, :2] = 0  # zero point 0: the v1 word arithmetic must carry exactly
    s = (torch.rand(groups, n) * 0.02 + 0.001).to(scale_dtype)
    if act_order:
        # GPTQ quantizes columns in the order ``order``; the i-th one processed lands in group i // g.
        order = torch.randperm(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // g).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // g).to(torch.int32)
    qzeros = pack_cols(z, bits)
    if fmt == "gptq":
        qzeros = to_int32(qzeros.long() - V1_OFFSET[bits])
    tensors = {"qweight": pack_rows(q, bits), "qzeros": qzeros, "scales": s, "g_idx": g_idx}
    return tensors, q, z, s, g_idx.long()


def reference_weight(q, z, s, g_idx, dtype):
    """W_ref (N, K) in float64, ``(q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``, scales as stored in ``dtype``."""
    s = s.to(dtype).double()
    return ((q.double() - z.double()[g_idx]) * s[g_idx]).t()


def check_layer(layer, w_ref, bias, k, n, dtype):
    x = torch.randn(3, 2, k).to(dtype)
    out = layer(x)
    ref = x.double() @ w_ref.t() + (0 if bias is None else bias.double())
    assert out.shape == (3, 2, n) and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]


def runtime_weight(layer):
    """The float64 weight (N, K) the layer's runtime tensors encode, in the checkpoint's K order."""
    qm = layer.quant_method
    if qm.bits == 8:
        w = layer.qweight.double() * layer.scales.double()[:, None]
    else:
        group = qm.group_size if qm.group_size in (32, 64) else 128
        zeros = None if layer.zeros is None else layer.zeros.double()
        w = dequantize_int4(layer.qweight, layer.scales.double(), zeros, group)
    if layer.perm is not None:  # runtime column j is checkpoint column perm[j]
        w = torch.empty_like(w).index_copy_(1, layer.perm.long(), w)
    return w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k, n, group_size", [(256, 64, 32), (256, 48, 64), (384, 32, 128), (200, 16, -1), (320, 24, 128)])
def test_gptq_4bit_golden(k, n, group_size, sym, fmt, dtype):
    seed(k, n, group_size, sym, fmt, dtype)
    tensors, q, z, s, g_idx = make_gptq(k, n, group_size, 4, sym, fmt)
    bias = torch.randn(n).to(dtype) if sym else None
    layer = build_layer(GPTQLinearMethod(4, group_size, sym, False, fmt), k, n, tensors, bias, dtype)
    layer.quant_method.process_weights_after_loading(layer)

    expected = {"qweight": torch.int32, "scales": dtype} | ({} if sym else {"zeros": dtype})
    expected |= {"bias": dtype} if bias is not None else {}
    assert {name: p.dtype for name, p in layer.named_parameters()} == expected
    assert layer.perm is None and not hasattr(layer, "qzeros") and not hasattr(layer, "g_idx")
    w_ref = reference_weight(q, z, s, g_idx, dtype)
    assert torch.equal(runtime_weight(layer), w_ref)
    check_layer(layer, w_ref, bias, k, n, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k, n, group_size", [(256, 32, 32), (256, 16, 64), (384, 24, 128), (320, 16, 128)])
def test_gptq_act_order_shuffled_g_idx(k, n, group_size, sym, dtype):
    seed("act", k, n, group_size, sym, dtype)
    tensors, q, z, s, g_idx = make_gptq(k, n, group_size, 4, sym, "gptq", act_order=True)
    assert not torch.equal(g_idx, g_idx.sort().values)  # really shuffled
    layer = build_layer(GPTQLinearMethod(4, group_size, sym, True, "gptq"), k, n, tensors, None, dtype)
    layer.quant_method.process_weights_after_loading(layer)

    perm = layer.perm
    assert perm is not None and dict(layer.named_buffers()) == {"perm": perm}
    assert perm.dtype == torch.int32 and torch.equal(g_idx[perm.long()], torch.arange(k) // group_size)  # runtime columns are in group order
    w_ref = reference_weight(q, z, s, g_idx, dtype)
    assert torch.equal(runtime_weight(layer), w_ref)
    check_layer(layer, w_ref, None, k, n, dtype)
    assert layer.quant_method.describe(layer) == f"GPTQ W4A16 g{group_size} {'sym' if sym else 'asym'} act-order"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("k, n, group_size, act_order", [(128, 32, -1, False), (100, 16, -1, True), (64, 8, 128, False)])
def test_gptq_8bit_per_channel(k, n, group_size, act_order, fmt, dtype):
    seed("int8", k, n, group_size, fmt, dtype)
    tensors, q, z, s, g_idx = make_gptq(k, n, group_size, 8, True, fmt, act_order=act_order)
    bias = torch.randn(n).to(dtype)
    layer = build_layer(GPTQLinearMethod(8, group_size, True, act_order, fmt), k, n, tensors, bias, dtype)
    layer.quant_method.process_weights_after_loading(layer)

    assert {name: (p.dtype, tuple(p.shape)) for name, p in layer.named_parameters()} == {
        "qweight": (torch.int8, (n, k)), "scales": (dtype, (n,)), "bias": (dtype, (n,))
    }
    assert layer.perm is None  # one group: nothing to permute
    w_ref = reference_weight(q, z, s, g_idx, dtype)
    assert torch.equal(layer.qweight.long(), (q - 128).t())
    assert torch.equal(runtime_weight(layer), w_ref)
    check_layer(layer, w_ref, bias, k, n, dtype)
    assert layer.quant_method.describe(layer) == "GPTQ W8A16 per-channel sym"


def test_gptq_v1_words_carry_between_values():
    """A v1 word whose stored value wrapped below zero: the word-level +0x11111111 restores every zero."""
    zeros = torch.tensor([[0, 15, 0, 3, 0, 0, 9, 1]])
    v1 = to_int32(pack_cols(zeros, 4).long() - V1_OFFSET[4])
    tensors = {"qweight": pack_rows(torch.zeros(8, 8, dtype=torch.long), 4), "qzeros": v1,
               "scales": torch.ones(1, 8, dtype=torch.float16), "g_idx": torch.zeros(8, dtype=torch.int32)}
    layer = build_layer(GPTQLinearMethod(4, -1, False, False, "gptq"), 8, 8, tensors, None, torch.float32)
    layer.quant_method.process_weights_after_loading(layer)
    assert torch.equal(layer.zeros[:, 0], zeros[0].float())


def test_gptq_quantize_tiny_llama_from_safetensors(tmp_path):
    """quantize(llama, GPTQLinearMethod, weights=dir) with act-order checkpoint tensors in GPTQ names; the
    quantized model matches a float model holding the dequantized weights, eager and compiled."""
    from hf_models import build_model

    torch.manual_seed(0)
    model = build_model("llama")
    reference = build_model("llama")
    reference.load_state_dict(model.state_dict())
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            n, k = module.weight.shape
            tensors, q, z, s, g_idx = make_gptq(k, n, 32, 4, False, "gptq", act_order=True)
            del state[f"{name}.weight"]
            state |= {f"{name}.{key}": t for key, t in tensors.items()}
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(reference_weight(q, z, s, g_idx, torch.float32))
    save_file(state, str(tmp_path / "model.safetensors"))

    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True,
              "checkpoint_format": "gptq", "damp_percent": 0.01, "static_groups": False, "true_sequential": True}
    pymllm_fx.quantize(model, GPTQLinearMethod.from_config(config), weights=tmp_path, progress=False)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = reference(ids).logits
        assert rel_err(model(ids).logits, expected) <= 1e-5
        compiled = torch.compile(model, fullgraph=True)
        assert rel_err(compiled(ids).logits, expected) <= 1e-5


# --- config --------------------------------------------------------------------------------------


def test_gptq_from_configs():
    m = GPTQLinearMethod.from_config({"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True,
                                      "desc_act": True, "checkpoint_format": "gptq_v2", "pack_dtype": "int32"})
    assert (m.bits, m.group_size, m.sym, m.desc_act, m.checkpoint_format) == (8, -1, True, True, "gptq_v2")
    assert GPTQLinearMethod.from_config({"format": "GPTQ"}).checkpoint_format == "gptq"
    assert GPTQLinearMethod.from_config({}) == GPTQLinearMethod()


def test_gptq_from_transformers_gptq_config_dict():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTQConfig(bits=4, group_size=64, desc_act=True, sym=False).to_dict()
    config = {key: getattr(value, "value", value) for key, value in config.items()}  # enums -> plain strings
    method = GPTQLinearMethod.from_config(config)
    assert (method.bits, method.group_size, method.sym, method.desc_act, method.checkpoint_format) == (4, 64, False, True, "gptq")


@pytest.mark.parametrize(
    "config, pattern",
    [
        ({"bits": 3}, "bits=3 is not supported"),
        ({"bits": 2}, "bits=2 is not supported"),
        ({"group_size": 16}, "group_size 16 is not supported"),
        ({"group_size": 0}, "group_size 0 is not supported"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
        ({"checkpoint_format": "gptq", "format": "gptq_v2"}, "conflicting"),
        ({"is_marlin_format": True}, "Marlin"),
        ({"pack_dtype": "int16"}, "pack_dtype"),
        ({"dynamic": {r"+:.*mlp.*": {"bits": 8}}}, r"dynamic.*overrides.*only .-:. rules"),
        ({"method": "qqq"}, "method 'qqq'"),
    ],
)
def test_gptq_bad_config(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        GPTQLinearMethod.from_config(config)


# --- bad shapes and bad tensors: clear errors naming the layer, nothing changed ---------------------


@pytest.mark.parametrize(
    "k, n, method, error, pattern",
    [
        (100, 16, GPTQLinearMethod(4, -1), ValueError, r"blk\.proj.*in_features=100.*multiple of 8"),
        (128, 12, GPTQLinearMethod(4, 32), ValueError, r"blk\.proj.*out_features=12.*multiple of 8"),
        (128, 6, GPTQLinearMethod(8, -1), ValueError, r"blk\.proj.*out_features=6.*multiple of 4"),
        (66, 8, GPTQLinearMethod(8, -1), ValueError, r"blk\.proj.*8-bit packs 4 input features.*in_features=66"),
        (256, 16, GPTQLinearMethod(8, 128), NotImplementedError, r"blk\.proj.*8-bit grouped GPTQ.*not supported yet"),
        (256, 16, GPTQLinearMethod(8, -1, sym=False), NotImplementedError, r"blk\.proj.*8-bit asymmetric"),
    ],
)
def test_gptq_shape_errors_name_the_layer(k, n, method, error, pattern):
    with pytest.raises(error, match=pattern):
        ReplicatedLinear(k, n, quant_method=method, prefix="blk.proj")


def _snapshot(layer):
    return {name: t.clone() for name, t in layer.state_dict().items()}


def _assert_unchanged(layer, snap):
    now = layer.state_dict()
    assert list(now) == list(snap)
    for name in snap:
        torch.testing.assert_close(now[name], snap[name], rtol=0, atol=0, equal_nan=True)


def _failing_layer(method, change, k=128, n=16, group_size=32, fmt="gptq_v2", sym=False, act_order=False):
    seed("bad", k, n, group_size, fmt, sym)
    tensors, *_ = make_gptq(k, n, group_size, 4, sym, fmt, act_order=act_order)
    change(tensors)
    return build_layer(method, k, n, tensors, None, torch.float16)


@pytest.mark.parametrize(
    "method, change, kwargs, pattern",
    [
        (GPTQLinearMethod(4, 32, False, False, "gptq_v2"), lambda t: t["scales"].__setitem__((2, 5), float("nan")), {},
         r"blk\.proj.*'scales' holds NaN or Inf.*\[2, 5\]"),
        (GPTQLinearMethod(4, 32, False, False, "gptq_v2"), lambda t: t["scales"].__setitem__((0, 0), float("-inf")), {},
         r"blk\.proj.*'scales' holds NaN or Inf"),
        (GPTQLinearMethod(4, 32, False, True, "gptq_v2"), lambda t: t["g_idx"].__setitem__(7, 4), {},
         r"blk\.proj.*'g_idx'.*\[0, 4\].*4 groups.*\[0, 4\)"),
        (GPTQLinearMethod(4, 32, False, True, "gptq_v2"), lambda t: t["g_idx"].__setitem__(7, -1), {},
         r"blk\.proj.*'g_idx'.*\[-1, 3\]"),
        (GPTQLinearMethod(4, 32, False, True, "gptq_v2"), lambda t: t["g_idx"].__setitem__(7, 3), {},
         r"blk\.proj.*'g_idx' does not split the 128 inputs into groups of 32"),
        # A v2 checkpoint (zeros 8) read as v1 decodes to 9: the error points at checkpoint_format.
        (GPTQLinearMethod(4, 32, True, False, "gptq"), lambda t: None, {"sym": True},
         r"blk\.proj.*sym=true.*other than 8.*checkpoint_format='gptq_v2'"),
    ],
    ids=["nan-scale", "inf-scale", "g_idx-too-big", "g_idx-negative", "g_idx-uneven-groups", "v2-read-as-v1"],
)
def test_gptq_bad_tensors(method, change, kwargs, pattern):
    layer = _failing_layer(method, change, **kwargs)
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match=pattern):
        layer.quant_method.process_weights_after_loading(layer)
    _assert_unchanged(layer, snap)


def test_gptq_8bit_zero_points_not_128():
    seed("int8-zeros")
    tensors, *_ = make_gptq(64, 8, -1, 8, True, "gptq_v2")
    tensors["qzeros"] = pack_cols(torch.full((1, 8), 100), 8)
    layer = build_layer(GPTQLinearMethod(8, -1, True, False, "gptq_v2"), 64, 8, tensors, None, torch.float16)
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match=r"blk\.proj.*other than 128"):
        layer.quant_method.process_weights_after_loading(layer)
    _assert_unchanged(layer, snap)


# --- loader attributes: the checkpoint tensors shard like vLLM's (output_dim / input_dim / packed_dim) -----


def test_gptq_merged_column_layer_loads_each_shard():
    """q/k/v stored as three checkpoint weights load into one QKVParallelLinear (qzeros packed along N)."""
    from pymllm_fx.layers.linear import QKVParallelLinear

    seed("qkv")
    parts = {shard: make_gptq(128, n, 32, 4, False, "gptq", act_order=True) for shard, n in (("q", 64), ("k", 32), ("v", 32))}
    layer = QKVParallelLinear(128, 16, 4, 2, bias=False, params_dtype=torch.float32,
                              quant_method=GPTQLinearMethod(4, 32, False, True, "gptq"))
    # One g_idx serves the fused layer: the three weights share their input (and so its act order).
    g_idx = parts["q"][0]["g_idx"]
    layer.g_idx.weight_loader(layer.g_idx, g_idx)
    for shard, (tensors, *_) in parts.items():
        for name in ("qweight", "qzeros", "scales"):
            getattr(layer, name).weight_loader(getattr(layer, name), tensors[name], shard)
    layer.quant_method.process_weights_after_loading(layer)
    w_ref = torch.cat([reference_weight(q, z, s, g_idx.long(), torch.float32) for _, q, z, s, _ in parts.values()])
    x = torch.randn(3, 128)
    assert rel_err(layer(x), x.double() @ w_ref.t()) <= 1e-5


@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_row_parallel_ranks_sum_to_the_whole(group_size):
    """Each rank of a RowParallelLinear (tp=2) takes its slice of K (g_idx counts the whole layer's
    groups); the partial outputs sum to x @ W.T."""
    from pymllm_fx.layers.linear import RowParallelLinear

    seed("row", group_size)
    tensors, q, z, s, g_idx = make_gptq(256, 16, group_size, 4, False, "gptq")
    x = torch.randn(3, 256)
    total = 0
    for rank in range(2):
        layer = RowParallelLinear(256, 16, bias=False, params_dtype=torch.float32,
                                  quant_method=GPTQLinearMethod(4, group_size, False, False, "gptq"), tp_rank=rank, tp_size=2)
        for name, tensor in tensors.items():
            getattr(layer, name).weight_loader(getattr(layer, name), tensor)
        layer.quant_method.process_weights_after_loading(layer)
        total = total + layer(x[:, rank * 128:(rank + 1) * 128]).double()
    assert rel_err(total, x.double() @ reference_weight(q, z, s, g_idx, torch.float32).t()) <= 1e-5
