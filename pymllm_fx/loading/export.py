"""``save_quantized``: write a quantized model as a checkpoint that other tools load.

The inverse of loading: every quantized layer's runtime tensors (the W4A16 / W8A16 / fp8 layouts
of ``kernels/``) are turned back into one checkpoint format's tensors, the other tensors are
written as they are, and ``config.json`` gets the ``quantization_config`` the format's own tools
write. A layer the asked format cannot hold exactly is refused with a ValueError naming the layer
and the format to use instead: nothing is ever rounded to fit.

Formats, each checked against the tool that writes it:

- ``"awq"``: AutoAWQ GEMM (``awq/modules/linear/gemm.py``, ``awq/models/_config.py``
  ``to_transformers_dict``). 4-bit, one ``group_size`` dividing every layer's inputs, no act-order.
  ``zero_point`` is always true: AutoAWQ's GEMM layout always carries ``qzeros`` (its symmetric
  mode cannot even be packed), so symmetric layers are written with zero points 8, which is exact.
- ``"gptq"``: GPTQModel / AutoGPTQ (``nn_modules/qlinear/__init__.py`` ``pack``,
  ``quantization/config.py`` ``to_dict``). 4-bit (any group size, tail groups, act-order via
  ``g_idx``) or 8-bit per-channel symmetric (``int8`` layers), not both in one model.
  ``checkpoint_format`` is "gptq" (v1, zero points stored minus one) when every layer is symmetric,
  else "gptq_v2" (zero points as they are): a v1 zero point 0 wraps below zero, which per-value
  readers (vLLM) decode wrongly, and GPTQModel refuses v1 asymmetric checkpoints it did not write.
  Skipped linears other than ``lm_head`` are listed as GPTQModel ``dynamic`` "-:" (skip) rules.
- ``"compressed-tensors"``: llm-compressor (``compressors/quantized_compressors/pack_quantized.py``
  ``pack_to_int32``, ``quantization/quant_config.py``, ``ModelCompressor.update_config``).
  int4 / int8 ``pack-quantized`` (group or channel), W8A8 int8 ``int-quantized`` (``weight`` int8,
  ``weight_scale``, static ``input_scale`` / ``input_zero_point``) and fp8 ``float-quantized`` (tensor, channel or
  block weight scales; dynamic per-token / per-tensor / per-group or static activations); one config group per
  distinct scheme, targets ``["Linear"]`` when there is a single scheme (and no GPT-2 ``Conv1D``,
  whose class is not "Linear"), else the module names.
- ``"fp8"``: vLLM's serialized fp8 as AutoFP8 writes it (``quant_method: "fp8"``,
  ``activation_scheme``, ``ignored_layers``; ``weight_scale`` and ``input_scale`` 0-dim float32):
  one weight scale per weight, so per-channel fp8 layers must go to compressed-tensors (or be
  quantized with ``{"quant_method": "fp8", "weight_strategy": "tensor"}``). Block-scaled layers are
  written DeepSeek-V3 style (``weight_block_size``, ``weight_scale_inv``). A dynamic fp8 checkpoint
  says nothing of the activation granularity: pymllm_fx reads it as per token (as it runs), vLLM
  quantizes activations per tensor; per-tensor dynamic layers go to compressed-tensors.

How a layer is recognised: by its quant method's class and fields (``layer.quant_method``, or
``layer.scheme`` for compressed-tensors), read in :func:`read_layer`. The runtime tensors alone do
not say the checkpoint's group size (AWQ / GPTQ groups of 256 run as runtime groups of 128) nor
how activations are quantized, and reading fields keeps the seed interface
(``create_weights`` / ``apply`` / ``process_weights_after_loading``) untouched. A new method needs
one branch there.

Quantized experts (``FusedMoE``) are written one linear per expert and projection, named as
transformers' ``save_pretrained`` names the float experts (``renames.expert_checkpoint_names``);
:func:`read_expert` reads one expert's stack in checkpoint terms, and every format's writer takes
it as it takes a linear layer.

Merged layers (``MergedColumnParallelLinear`` / ``QKVParallelLinear``) are written split into the
checkpoint names given by ``merged_layers``. GPT-2 ``Conv1D`` sites keep their original names and
their ``(in, out)`` float / fp8 ``weight`` layout (what ``api.quantize``'s loader transposes back);
packed int tensors have one layout for every module. Tied weights are written once, under the
name ``save_pretrained`` keeps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE
from pymllm_fx.kernels.w4a16 import SYMMETRIC_ZERO, num_groups, pack_words, unpack_int4, unpack_words
from pymllm_fx.layers.fused_moe import FusedMoE
from pymllm_fx.layers.linear import LinearBase
from pymllm_fx.layers.quantize_base import UnquantizedLinearMethod
from pymllm_fx.loading.renames import expert_checkpoint_names
from pymllm_fx.methods.awq import AWQ_ORDER, AWQLinearMethod
from pymllm_fx.methods.common import checkpoint_group, expand_groups, is_float_layer, runtime_group
from pymllm_fx.methods.compressed_tensors import (
    CHANNEL_RUNTIME_GROUP,
    CompressedTensorsLinearMethod,
    PackedIntLinearMethod,
    exact_in,
)
from pymllm_fx.methods.fp8 import Fp8LinearMethod
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod, Fp8CheckpointMoEMethod, Fp8WeightOnlyLinearMethod
from pymllm_fx.methods.gptq import GPTQLinearMethod
from pymllm_fx.methods.int4 import Int4LinearMethod
from pymllm_fx.methods.int8 import Int8LinearMethod
from pymllm_fx.methods.w8a8 import W8A8CheckpointLinearMethod, W8A8LinearMethod
from pymllm_fx.passes import is_linear_module

FORMATS = ("awq", "gptq", "compressed-tensors", "fp8")
# The compressed-tensors release whose format this writer follows; compressed-tensors drops the
# key when it loads a config.
COMPRESSED_TENSORS_VERSION = "0.12.2"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|\.pymllm_fx-shard-\d{5}\.tmp")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# --- a layer in checkpoint terms --------------------------------------------------------------------


@dataclass
class Quantized:
    """One layer's (or shard's) quantized weight in checkpoint terms, before a format packs it."""

    kind: str  # "int4", "int8" (weight-only), "w8a8" (int8 weights and activations) or "fp8"
    # int4: codes 0..15 int32 (N, K) in checkpoint column order; int8, w8a8: int8 (N, K); fp8: e4m3 (N, K)
    weight: torch.Tensor
    # int4: (N, G), one per checkpoint group; int8, w8a8 and fp8: (N,), one per output row;
    # fp8 block: float32 (ceil(N / bn), ceil(K / bk)), one per weight block
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None  # int4 asymmetric: int32 (N, G) zero points 0..15; None: 8
    group_size: int = -1  # int4: inputs per group (the last may be shorter); -1: one group per row
    g_idx: Optional[torch.Tensor] = None  # int4 act-order: int32 (K,) group of each input, unsorted
    activation: str = "token"  # fp8, w8a8: "token" / "tensor" (dynamic), "static", "group" (fp8 block), "none" (fp8 weight-only)
    input_scale: Optional[torch.Tensor] = None  # fp8, w8a8 static: float (1,)
    input_zero_point: Optional[torch.Tensor] = None  # w8a8 static asymmetric: int32 (1,)
    weight_strategy: str = "channel"  # fp8, w8a8: "channel", "tensor" or "block", as calibration or the checkpoint declared
    block_size: Optional[Tuple[int, int]] = None  # fp8 block: (bn, bk) weight rows and columns per scale

    def rows(self, start: int, stop: int) -> "Quantized":
        """Output rows ``start:stop`` (one logical weight of a merged layer)."""

        def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[start:stop]

        scales = cut(self.scales)
        if self.block_size is not None:  # block rows; the layer made shards start on block boundaries
            bn = self.block_size[0]
            scales = self.scales[start // bn: -(-stop // bn)]
        return replace(self, weight=cut(self.weight), scales=scales, zeros=cut(self.zeros))


def read_layer(layer: nn.Module, where: str = "") -> Optional[Quantized]:
    """The quantized weight of a pymllm_fx linear layer in checkpoint terms, or None if it is float."""
    where = where or getattr(layer, "prefix", "") or "layer"
    method = layer.quant_method
    if isinstance(method, CompressedTensorsLinearMethod):
        method = layer.scheme
    if isinstance(method, UnquantizedLinearMethod) or is_float_layer(layer):
        return None
    k = layer.input_size_per_partition
    if isinstance(method, Int4LinearMethod):  # GPTQ-calibrated int4 may hold an act-order ``perm``
        return _read_int4(layer, where, method.group_size, method.group_size, per_row=False, perm=getattr(layer, "perm", None))
    if isinstance(method, AWQLinearMethod):
        group = checkpoint_group(method.group_size, k)
        return _read_int4(layer, where, group, runtime_group(method.group_size), method.group_size == -1)
    if isinstance(method, GPTQLinearMethod):
        if method.bits == 8:
            return Quantized("int8", layer.qweight.data, layer.scales.data)
        group = checkpoint_group(method.group_size, k)
        return _read_int4(layer, where, group, runtime_group(method.group_size), method.group_size == -1, layer.perm)
    if isinstance(method, PackedIntLinearMethod):
        if method.num_bits == 8:
            return Quantized("int8", layer.qweight.data, layer.scales.data)
        if method.strategy == "group":  # actorder "group": the runtime permutation gives back weight_g_idx
            return _read_int4(layer, where, method.group_size, method.group_size, per_row=False,
                              perm=getattr(layer, "perm", None))
        return _read_int4(layer, where, k, CHANNEL_RUNTIME_GROUP, per_row=True)
    if isinstance(method, Int8LinearMethod):
        return Quantized("int8", layer.qweight.data, layer.scales.data)
    if isinstance(method, (W8A8LinearMethod, W8A8CheckpointLinearMethod)):
        # Scales run in float32; a checkpoint's bf16 / fp16 scales are written back in their own dtype.
        dtype = getattr(layer, "params_dtype", torch.float32)
        static = getattr(method, "activation_scheme", "dynamic") == "static"
        zero = getattr(layer, "input_zero_point", None)
        return Quantized(
            "w8a8", layer.qweight.data, exact_in(layer.weight_scale.data, dtype),
            activation="static" if static else "token",
            input_scale=exact_in(layer.input_scale.data, dtype) if static else None,
            input_zero_point=None if zero is None else zero.data,
            weight_strategy=getattr(method, "weight_strategy", "channel"),
        )
    if isinstance(method, Fp8LinearMethod):
        return Quantized("fp8", layer.weight.data, layer.weight_scale.data, weight_strategy=method.weight_strategy)
    if isinstance(method, Fp8WeightOnlyLinearMethod):
        return Quantized("fp8", layer.qweight.data, layer.scales.data, activation="none",
                         weight_strategy=method.weight_strategy)
    if isinstance(method, Fp8CheckpointLinearMethod):
        if layer.weight.dtype != FP8_DTYPE:
            return None  # a layer the checkpoint left in float
        if method.weight_strategy == "block":
            return Quantized(
                "fp8", layer.weight.data, getattr(layer, method.block_scale_name).data, activation="group",
                weight_strategy="block", block_size=tuple(method.weight_block_size),
            )
        static = method.activation_scheme == "static"
        return Quantized(
            "fp8", layer.weight.data, layer.weight_scale.data, weight_strategy=method.weight_strategy,
            activation="static" if static else method.activation_strategy,
            input_scale=layer.input_scale.data.reshape(1) if static else None,
        )
    raise ValueError(
        f"{where}: save_quantized does not know how to export layers quantized with {type(method).__name__}; "
        f"skip this layer when quantizing, or add the method to pymllm_fx/loading/export.py read_layer"
    )


def _read_int4(layer, where: str, group: int, runtime: int, per_row: bool, perm=None) -> Quantized:
    """W4A16 runtime tensors -> codes in checkpoint order, one scale / zero per checkpoint group."""
    k = layer.input_size_per_partition
    codes = unpack_int4(layer.qweight.data, k).to(torch.int32)
    scales = _collapse(layer.scales.data, group, runtime, k, where, "scales")
    zeros = None
    if layer.zeros is not None:
        zeros = _zero_points(_collapse(layer.zeros.data, group, runtime, k, where, "zeros"), where, "zeros")
    g_idx = None
    if perm is not None:  # act-order: runtime column j is checkpoint column perm[j]
        perm = perm.long()
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
        g_idx = torch.empty(k, dtype=torch.int32, device=perm.device)
        g_idx[perm] = (torch.arange(k, device=perm.device) // group).to(torch.int32)
    return Quantized("int4", codes, scales, zeros, -1 if per_row else group, g_idx)


def _zero_points(z: torch.Tensor, where: str, name: str) -> Optional[torch.Tensor]:
    """Float runtime zero points -> int32 0..15, or None when all are the symmetric 8 (an AWQ
    zero_point checkpoint of a symmetric model)."""
    zeros = z.round().to(torch.int32)
    if not torch.equal(zeros.to(z.dtype), z) or int(zeros.min()) < 0 or int(zeros.max()) > 15:
        raise ValueError(f"{where}: tensor {name!r} holds values that are not integer zero points 0..15")
    return None if bool((zeros == SYMMETRIC_ZERO).all()) else zeros


def read_expert(layer: FusedMoE, which: str, expert: int, where: str = "") -> Quantized:
    """One expert's ``which`` ("w13": gate and up rows, "w2": down) of a quantized experts layer in
    checkpoint terms. The experts layouts keep the checkpoint's groups (int4) and scales (8-bit), so
    this reads them as they are."""
    where = where or layer.prefix or "experts"
    method = layer.quant_method
    qweight, scales = getattr(layer, which + "_qweight").data[expert], getattr(layer, which + "_scales").data[expert]
    if qweight.dtype == torch.int32:  # the int4 experts layout: codes packed along K, plain order
        group = method.group_size  # Int4MoEMethod and the 4-bit checkpoints' experts; -1: one group per row
        zeros = getattr(layer, which + "_zeros")
        zeros = None if zeros is None else _zero_points(zeros.data[expert], where, which + "_zeros")
        return Quantized("int4", unpack_words(qweight, 4), scales, zeros, group)
    if qweight.dtype == torch.int8:
        return Quantized("int8", qweight, scales)
    if isinstance(method, Fp8CheckpointMoEMethod) and method.linear.weight_strategy == "block":
        return Quantized("fp8", qweight, scales, activation="group", weight_strategy="block", block_size=method.block)
    strategy = method.linear.weight_strategy if isinstance(method, Fp8CheckpointMoEMethod) else "channel"
    return Quantized("fp8", qweight, scales, weight_strategy=strategy)


def _collapse(t: torch.Tensor, group: int, runtime: int, k: int, where: str, name: str) -> torch.Tensor:
    """Runtime ``(N, ceil(K / runtime))`` -> one column per checkpoint group of ``group`` inputs."""
    if group == runtime:
        return t
    starts = torch.arange(num_groups(k, group), device=t.device) * group
    picked = t.index_select(1, starts // runtime)
    if not torch.equal(expand_groups(picked, group, runtime, k), t):
        raise ValueError(
            f"{where}: tensor {name!r} changes inside a checkpoint group of {group} inputs, so it has no "
            f"exact checkpoint form; the layer was not loaded by its own method"
        )
    return picked


# --- per-site facts the formats decide on -------------------------------------------------------------


@dataclass
class _Site:
    """One checkpoint module to write: a whole layer, or one shard of a merged layer."""

    name: str
    q: Quantized
    conv1d: bool = False
    expert: bool = False  # one expert's projection of an experts layer

    @property
    def n(self) -> int:
        return self.q.weight.shape[0]

    @property
    def k(self) -> int:
        return self.q.weight.shape[1]

    @property
    def group(self) -> int:
        """The int4 checkpoint group in inputs (the whole row for -1)."""
        return self.k if self.q.group_size == -1 else self.q.group_size

    @property
    def per_tensor(self) -> bool:
        """fp8: every row has the same scale (block scales never count: they change along K)."""
        return self.q.block_size is None and bool((self.q.scales == self.q.scales.reshape(-1)[0]).all())


def _what(q: Quantized) -> str:
    if q.kind == "int4":
        group = "per-channel" if q.group_size == -1 else f"group_size {q.group_size}"
        order = ", act-order" if q.g_idx is not None else ""
        return f"an int4 layer ({group}, {'symmetric' if q.zeros is None else 'asymmetric'}{order})"
    if q.kind == "int8":
        return "an int8 per-channel layer"
    if q.kind == "w8a8":
        acts = "static" if q.activation == "static" else "per-token dynamic"
        return f"a W8A8 int8 layer ({acts} int8 activations)"
    if q.block_size is not None:
        return f"an fp8 layer ({q.block_size[0]}x{q.block_size[1]} block weight scales)"
    if q.activation == "none":
        return f"an fp8 weight-only layer (per-{'tensor' if q.weight_strategy == 'tensor' else 'channel'} weight scale)"
    return f"an fp8 layer (per-{'tensor' if q.weight_strategy == 'tensor' else 'channel'} weight scale)"


def _refuse(site: _Site, fmt: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{site.name}: cannot write {_what(site.q)} as {fmt!r}: {problem}; {fix}")


def _one_value(sites: List[_Site], key, fmt: str, what: str, fix: str):
    """The single value ``key(site)`` shared by every site; a format-wide setting cannot differ."""
    values: Dict[object, str] = {}
    for site in sites:
        values.setdefault(key(site), site.name)
    if len(values) > 1:
        found = ", ".join(f"{value} ({name})" for value, name in values.items())
        raise ValueError(f"cannot write {fmt!r}: it has one {what} for the whole model, but the layers have {found}; {fix}")
    return next(iter(values), None)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy: safetensors refuses tensors that share memory (views, tied weights)."""
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)


# --- the formats ------------------------------------------------------------------------------------


class _AWQ:
    """AutoAWQ GEMM: ``qweight`` (K, N/8) and ``qzeros`` (K/g, N/8) packed along N in AWQ_ORDER,
    ``scales`` (K/g, N)."""

    fmt = "awq"

    def __init__(self, sites: List[_Site], floats: List[str]) -> None:
        for site in sites:
            q = site.q
            if q.kind != "int4":
                fix = {"int8": "use format='gptq' (8-bit per-channel) or 'compressed-tensors'",
                       "w8a8": "use format='compressed-tensors'"}.get(q.kind, "use format='compressed-tensors' or 'fp8'")
                raise _refuse(site, self.fmt, "AutoAWQ GEMM checkpoints hold 4-bit weights only", fix)
            if q.g_idx is not None:
                raise _refuse(site, self.fmt, "AWQ has no g_idx to record the act-order input permutation",
                              "use format='gptq'")
            if site.k % site.group:
                raise _refuse(site, self.fmt, f"in_features={site.k} is not a multiple of group_size "
                              f"{site.group} (a tail group), which AutoAWQ requires", "use format='gptq' or 'compressed-tensors'")
            if site.n % 8:
                raise _refuse(site, self.fmt, f"out_features={site.n} is not a multiple of 8 (qzeros packs 8 outputs "
                              f"per int32)", "use format='compressed-tensors'")
        group = _one_value(sites, lambda s: s.q.group_size, self.fmt, "group_size",
                           "use format='compressed-tensors', which has one config group per scheme")
        for skipped in floats:  # transformers and vLLM match modules_to_not_convert as substrings
            hit = next((s.name for s in sites if skipped in s.name), None)
            if hit is not None:
                raise ValueError(
                    f"{skipped}: cannot write 'awq': this float layer must be listed in modules_to_not_convert, "
                    f"which loaders match as a substring, and it would also leave the quantized {hit} in float; "
                    f"use format='compressed-tensors'"
                )
        self.config = {
            "quant_method": "awq", "zero_point": True, "group_size": -1 if group is None else group, "bits": 4,
            "version": "gemm", "modules_to_not_convert": list(floats) or None,
        }

    def tensors(self, site: _Site) -> Dict[str, torch.Tensor]:
        q = site.q
        zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, SYMMETRIC_ZERO, dtype=torch.int32)

        def awq_pack(values: torch.Tensor) -> torch.Tensor:  # (R, C) -> (R, C/8), nibble i = column AWQ_ORDER[i]
            rows, cols = values.shape
            return pack_words(values.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols), 4)

        return {"qweight": awq_pack(q.weight.t()), "qzeros": awq_pack(zeros.t()), "scales": q.scales.t()}


class _GPTQ:
    """GPTQ: ``qweight`` (K/f, N) packed along K, ``qzeros`` (G, N/f) along N, ``scales`` (G, N),
    ``g_idx`` (K,); f = 32 / bits."""

    fmt = "gptq"

    def __init__(self, sites: List[_Site], floats: List[str]) -> None:
        for site in sites:
            if site.q.kind == "fp8":
                raise _refuse(site, self.fmt, "GPTQ holds integer weights", "use format='compressed-tensors' or 'fp8'")
            if site.q.kind == "w8a8":
                raise _refuse(site, self.fmt, "GPTQ holds weight-only layers and would drop the int8 activations",
                              "use format='compressed-tensors'")
            if site.expert and site.q.kind != "int4":
                raise _refuse(site, self.fmt, "GPTQ experts load back only as 4-bit", "use format='compressed-tensors'")
        bits = _one_value(sites, lambda s: 8 if s.q.kind == "int8" else 4, self.fmt, "bit width",
                          "use format='compressed-tensors', which has one config group per scheme")
        self.bits = bits or 4
        f = 32 // self.bits
        for site in sites:
            if site.k % f or site.n % f:
                raise _refuse(site, self.fmt, f"{self.bits}-bit GPTQ packs {f} values per int32 along both the inputs "
                              f"and the outputs, but the layer is [out={site.n}, in={site.k}]", "use format='compressed-tensors'")
        if self.bits == 8:
            group, sym = -1, True
        else:
            group = _one_value(sites, lambda s: s.q.group_size, self.fmt, "group_size",
                               "use format='compressed-tensors', which has one config group per scheme")
            sym = all(site.q.zeros is None for site in sites)
        self.v1 = sym
        quantized_head = any(_is_lm_head(site.name) for site in sites)
        self.config = {
            "quant_method": "gptq", "bits": self.bits, "group_size": -1 if group is None else group,
            "desc_act": any(site.q.g_idx is not None for site in sites), "sym": sym, "lm_head": quantized_head,
            "checkpoint_format": "gptq" if self.v1 else "gptq_v2", "pack_dtype": "int32",
        }
        # GPTQ quantizes every linear but lm_head: the others left in float are GPTQModel / vLLM skip rules.
        skip = {f"-:^{re.escape(name)}$": {} for name in floats if not _is_lm_head(name)}
        if skip:
            self.config["dynamic"] = skip

    def tensors(self, site: _Site) -> Dict[str, torch.Tensor]:
        q, k = site.q, site.k
        if q.kind == "int8":
            codes = q.weight.to(torch.int32) + 128
            zeros = torch.full((site.n, 1), 128, dtype=torch.int32, device=codes.device)
            scales = q.scales.reshape(site.n, 1)
            g_idx = torch.zeros(k, dtype=torch.int32)
        else:
            codes = q.weight
            zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, SYMMETRIC_ZERO, dtype=torch.int32)
            scales = q.scales
            g_idx = q.g_idx if q.g_idx is not None else (torch.arange(k) // site.group).to(torch.int32)
        if self.v1:
            zeros = zeros - 1  # every zero point is at least 1 here (symmetric), so no word borrows
        return {
            "qweight": pack_words(codes, self.bits).t(),
            "qzeros": pack_words(zeros.t(), self.bits),
            "scales": scales.t(),
            "g_idx": g_idx,
        }


def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


class _CompressedTensors:
    """compressed-tensors: ``pack-quantized`` (``weight_packed``, ``weight_scale``, ``weight_zero_point``,
    ``weight_shape``) or ``float-quantized`` (``weight``, ``weight_scale``, ``input_scale``)."""

    fmt = "compressed-tensors"

    def __init__(self, sites: List[_Site], floats: List[str]) -> None:
        groups: Dict[str, Tuple[dict, List[str]]] = {}
        for site in sites:
            scheme = self._scheme(site)
            groups.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(site.name)
        by_name = len(groups) > 1 or any(site.conv1d for site in sites)
        experts = {site.name for site in sites if site.expert}
        with_experts = [i for i, (_, names) in enumerate(groups.values()) if experts & set(names)]
        if len(with_experts) > 1:
            raise ValueError(f"cannot write {self.fmt!r}: its readers give every expert the scheme of the group that "
                             f"targets 'Linear', but these experts have {len(with_experts)} schemes; use format='gptq' "
                             f"or 'awq'")
        config_groups = {}
        for i, (scheme, names) in enumerate(groups.values()):
            # Experts are matched by class ("Linear"), the other layers by name when there are several schemes.
            targets = [name for name in names if name not in experts] + (["Linear"] if i in with_experts else [])
            config_groups[f"group_{i}"] = {**scheme, "targets": targets if by_name else ["Linear"]}
        formats = {scheme["format"] for scheme, _ in groups.values()}
        self.config = {
            "quant_method": "compressed-tensors", "version": COMPRESSED_TENSORS_VERSION,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": list(floats),
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
        }

    def _scheme(self, site: _Site) -> dict:
        q = site.q
        if q.kind == "int4":
            if q.zeros is not None and q.group_size != -1 and site.k % q.group_size:
                raise _refuse(site, self.fmt, f"in_features={site.k} is not a multiple of group_size {q.group_size}, "
                              f"and compressed-tensors sizes asymmetric zero points by whole groups", "use format='gptq'")
            strategy = "channel" if q.group_size == -1 else "group"
            weights = _ct_args(4, "int", q.zeros is None, strategy, None if strategy == "channel" else q.group_size)
            if q.g_idx is not None:  # act-order: the group of each input in weight_g_idx
                weights["actorder"] = "group"
            return {"weights": weights, "input_activations": None, "output_activations": None, "format": "pack-quantized"}
        if q.kind == "int8":
            weights = _ct_args(8, "int", True, "channel", None)
            return {"weights": weights, "input_activations": None, "output_activations": None, "format": "pack-quantized"}
        if q.kind == "w8a8":  # the W8A8 preset (dynamic) or its static variant
            strategy = "tensor" if q.weight_strategy == "tensor" and site.per_tensor else "channel"
            if q.activation == "static":
                acts = _ct_args(8, "int", q.input_zero_point is None, "tensor", None, dynamic=False)
                if q.input_zero_point is not None:
                    acts["zp_dtype"] = "torch.int8"  # what compressed-tensors serializes for asymmetric int8
            else:
                acts = _ct_args(8, "int", True, "token", None, dynamic=True)
            return {"weights": _ct_args(8, "int", True, strategy, None), "input_activations": acts,
                    "output_activations": None, "format": "int-quantized"}
        if q.block_size is not None:  # the FP8_BLOCK scheme
            weights = {**_ct_args(8, "float", True, "block", None), "block_structure": list(q.block_size)}
            acts = _ct_args(8, "float", True, "group", q.block_size[1], dynamic=True)
            return {"weights": weights, "input_activations": acts, "output_activations": None, "format": "float-quantized"}
        strategy = "tensor" if q.weight_strategy == "tensor" and site.per_tensor else "channel"
        if q.activation == "none":  # fp8 weight-only
            return {"weights": _ct_args(8, "float", True, strategy, None), "input_activations": None,
                    "output_activations": None, "format": "float-quantized"}
        if q.activation == "static":
            acts = _ct_args(8, "float", True, "tensor", None, dynamic=False)
        else:
            acts = _ct_args(8, "float", True, q.activation, None, dynamic=True)
        return {"weights": _ct_args(8, "float", True, strategy, None), "input_activations": acts,
                "output_activations": None, "format": "float-quantized"}

    def tensors(self, site: _Site) -> Dict[str, torch.Tensor]:
        q, n, k = site.q, site.n, site.k
        if q.kind == "fp8":
            out = {"weight": q.weight.t() if site.conv1d else q.weight}
            tensor = q.weight_strategy == "tensor" and site.per_tensor
            if q.block_size is not None:
                out["weight_scale"] = q.scales.float()
            else:
                out["weight_scale"] = q.scales.float()[:1] if tensor else q.scales.float().reshape(n, 1)
            if q.input_scale is not None:
                out["input_scale"] = q.input_scale.float().reshape(1)
            return out
        if q.kind == "w8a8":
            tensor = q.weight_strategy == "tensor" and site.per_tensor
            out = {"weight": q.weight.t() if site.conv1d else q.weight,
                   "weight_scale": q.scales[:1] if tensor else q.scales.reshape(n, 1)}
            if q.input_scale is not None:
                out["input_scale"] = q.input_scale.reshape(1)
            if q.input_zero_point is not None:
                out["input_zero_point"] = q.input_zero_point.to(torch.int8).reshape(1)
            return out
        if q.kind == "int8":
            packed, scale = pack_words(q.weight.to(torch.int32) + 128, 8), q.scales.reshape(n, 1)
        else:
            packed, scale = pack_words(q.weight, 4), q.scales  # the stored value q + 8 is the runtime code
        out = {"weight_packed": packed, "weight_scale": scale}
        if q.kind == "int4" and q.zeros is not None:  # zero_point + 8, packed along the outputs
            out["weight_zero_point"] = pack_words(q.zeros.t(), 4).t()
        if q.kind == "int4" and q.g_idx is not None:
            out["weight_g_idx"] = q.g_idx
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        return out


def _ct_args(bits: int, kind: str, symmetric: bool, strategy: str, group_size: Optional[int], dynamic: bool = False) -> dict:
    """compressed-tensors ``QuantizationArgs`` as ``model_dump`` writes them."""
    return {
        "num_bits": bits, "type": kind, "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
        "block_structure": None, "dynamic": dynamic, "actorder": None,
        "observer": None if dynamic else "minmax", "observer_kwargs": {},
    }


class _Fp8:
    """vLLM / AutoFP8 ``fp8``: ``weight`` e4m3, ``weight_scale`` and (static) ``input_scale`` 0-dim float32;
    with ``weight_block_size`` (DeepSeek-V3 / transformers FP8), ``weight_scale_inv`` one per block."""

    fmt = "fp8"

    def __init__(self, sites: List[_Site], floats: List[str]) -> None:
        for site in sites:
            q = site.q
            if q.kind != "fp8":
                raise _refuse(site, self.fmt, "the fp8 format holds e4m3 weights only",
                              "use format='compressed-tensors'" if q.kind == "w8a8" else
                              "use format='awq', 'gptq' or 'compressed-tensors'")
            if q.block_size is not None:
                continue
            if not site.per_tensor:
                raise _refuse(site, self.fmt, "its rows have different scales and the fp8 format stores one "
                              "weight_scale per weight", "use format='compressed-tensors' (float-quantized, strategy "
                              "channel), or quantize with {'quant_method': 'fp8', 'weight_strategy': 'tensor'}")
            if q.activation == "none":
                raise _refuse(site, self.fmt, "its activations stay in float, and an fp8 checkpoint quantizes them",
                              "use format='compressed-tensors'")
            if q.activation == "tensor":
                raise _refuse(site, self.fmt, "its activations are quantized per tensor at run time, and a dynamic "
                              "fp8 checkpoint loads with per-token activation scales", "use format='compressed-tensors'")
        scheme = _one_value(sites, lambda s: "static" if s.q.activation == "static" else "dynamic", self.fmt,
                            "activation_scheme", "use format='compressed-tensors', which has one config group per scheme")
        block = _one_value(sites, lambda s: s.q.block_size, self.fmt, "weight_block_size (or none)",
                           "use format='compressed-tensors', which has one config group per scheme")
        self.config = {"quant_method": "fp8", "activation_scheme": scheme or "dynamic", "ignored_layers": list(floats)}
        if block is not None:
            self.config["weight_block_size"] = list(block)

    def tensors(self, site: _Site) -> Dict[str, torch.Tensor]:
        q = site.q
        weight = q.weight.t() if site.conv1d else q.weight
        if q.block_size is not None:
            return {"weight": weight, "weight_scale_inv": q.scales.float()}
        out = {"weight": weight, "weight_scale": q.scales.float()[0].clone()}
        if q.input_scale is not None:
            out["input_scale"] = q.input_scale.float().reshape(())
        return out


_WRITERS = {"awq": _AWQ, "gptq": _GPTQ, "compressed-tensors": _CompressedTensors, "fp8": _Fp8}


# --- a model's layers, split and named as the checkpoint names them -----------------------------------


@dataclass
class _Layer:
    layer: LinearBase
    names: List[str]  # one checkpoint module name per logical weight (output partition)
    conv1d: bool


@dataclass
class _Experts:
    """A quantized experts layer, written as one linear per expert and projection."""

    layer: FusedMoE
    names: Dict[Tuple[str, int, int], str]  # (stack, expert, first row) -> checkpoint module name

    def sites(self, path: str) -> Iterator[_Site]:
        part = {"w13": self.layer.intermediate_size_per_partition, "w2": self.layer.hidden_size}
        for (which, expert, first), name in self.names.items():
            q = read_expert(self.layer, which, expert, path)
            yield _Site(name, q.rows(first, first + part[which]), expert=True)


def _shards(layer: _Layer, q: Optional[Quantized]) -> Iterator[Tuple[str, Optional[Quantized], int, int]]:
    """(checkpoint name, its rows of ``q``, first row, end row) for each logical weight of the layer."""
    start = 0
    for name, size in zip(layer.names, layer.layer.output_partition_sizes):
        yield name, None if q is None else q.rows(start, start + size), start, start + size
        start += size


class _Export:
    """One format's plan for a set of layers: checks every layer first, then yields tensors."""

    def __init__(self, fmt: str, layers: Dict[str, _Layer], floats: List[str]) -> None:
        fmt = str(fmt).lower()
        if fmt not in _WRITERS:
            raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.layers = layers
        floats = list(floats)
        sites = []
        for path, entry in layers.items():
            if isinstance(entry, _Experts):
                sites.extend(entry.sites(path))
                continue
            q = read_layer(entry.layer, path)
            for name, part, _, _ in _shards(entry, q):
                if part is None:
                    floats.append(name)
                else:
                    sites.append(_Site(name, part, entry.conv1d))
        self.floats = floats
        self.quantized = len(sites)
        self.writer = _WRITERS[fmt](sites, floats)
        self.config = self.writer.config

    def tensors(self, path: str) -> Iterator[Tuple[str, torch.Tensor]]:
        entry = self.layers[path]
        if isinstance(entry, _Experts):
            for site in entry.sites(path):
                for key, tensor in self.writer.tensors(site).items():
                    yield f"{site.name}.{key}", _cpu(tensor)
            return
        layer = entry.layer
        q = read_layer(layer, path)
        bias = layer.bias.data if layer.bias is not None else None
        for name, part, start, stop in _shards(entry, q):
            if part is None:
                weight = layer.weight.data[start:stop]
                tensors = {"weight": weight.t() if entry.conv1d else weight}
            else:
                tensors = self.writer.tensors(_Site(name, part, entry.conv1d))
            if bias is not None:
                tensors["bias"] = bias[start:stop]
            for key, tensor in tensors.items():
                yield f"{name}.{key}", _cpu(tensor)


def _check_layer(path: str, layer: LinearBase, names: Sequence[str]) -> None:
    if layer.tp_size != 1:
        raise ValueError(
            f"{path}: this layer holds tensor-parallel rank {layer.tp_rank} of {layer.tp_size}, not the whole "
            f"weight; export from a model built with tp_size=1"
        )
    sizes = layer.output_partition_sizes
    if len(names) != len(sizes):
        raise ValueError(
            f"{path}: this layer holds {len(sizes)} merged weights (output sizes {sizes}) but {len(names)} "
            f"checkpoint name(s) were given ({list(names)}); pass merged_layers={{{path!r}: [one name per weight]}}"
        )


def export_layer(layer: LinearBase, format: str, names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """One layer's checkpoint tensors in ``format``, named ``<name>.<tensor>``.

    ``names``: the checkpoint module names of a merged layer's weights (``[q_proj, k_proj, v_proj]``);
    default ``[layer.prefix]``. Format-wide choices (GPTQ v1 or v2, ...) are made for this layer alone.
    """
    path = getattr(layer, "prefix", "") or "layer"
    names = list(names) if names is not None else [path]
    _check_layer(path, layer, names)
    export = _Export(format, {path: _Layer(layer, names, False)}, [])
    return dict(export.tensors(path))


# --- the whole model ----------------------------------------------------------------------------------


def save_quantized(
    model: nn.Module,
    path: Union[str, Path],
    format: str = "awq",
    *,
    max_shard_size: Union[int, str] = "5GB",
    progress: bool = True,
    merged_layers: Optional[Mapping[str, Sequence[str]]] = None,
) -> Path:
    """Write a model quantized by ``pymllm_fx.quantize`` to the directory ``path``, as a ``format`` checkpoint.

    ``format``: ``"awq"``, ``"gptq"``, ``"compressed-tensors"`` or ``"fp8"``. Writes ``config.json``
    (the model's HF config with the format's ``quantization_config``) and ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_size`` (bytes, or "5GB",
    "500MiB", ...) with ``model.safetensors.index.json``. ``merged_layers`` maps a merged layer's
    path to the checkpoint names of its weights. Every layer is checked before anything is written:
    one the format cannot hold exactly raises ValueError naming it and the format to use instead.
    Returns the directory.
    """
    fmt = str(format).lower()
    if fmt not in _WRITERS:
        raise ValueError(f"unknown checkpoint format {format!r}; use one of {', '.join(FORMATS)}")
    max_bytes = parse_size(max_shard_size)
    merged = {key: list(value) for key, value in (merged_layers or {}).items()}
    modules = dict(model.named_modules())
    unknown = sorted(name for name in merged if not isinstance(modules.get(name), LinearBase))
    if unknown:
        raise ValueError(
            f"merged_layers names {unknown}, which are not pymllm_fx linear layers of this model; use the paths "
            f"of its merged layers (MergedColumnParallelLinear / QKVParallelLinear)"
        )
    layers: Dict[str, Union[_Layer, _Experts]] = {}
    floats: List[str] = []
    for name, module in modules.items():
        if isinstance(module, FusedMoE):
            layers[name] = _Experts(module, _expert_names(model, name, module))
        elif isinstance(module, LinearBase):
            names = merged.get(name, [name])
            _check_layer(name, module, names)
            layers[name] = _Layer(module, names, module.checkpoint_transposed)
        elif is_linear_module(module):
            floats.append(name)
    export = _Export(fmt, layers, floats)  # raises before anything is written
    if not export.quantized:
        raise ValueError(
            f"{type(model).__name__} has no quantized layers; quantize it first, e.g. "
            f"pymllm_fx.quantize(model, 'int4'), then save it"
        )
    config = _config_json(model, export.config)

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; pass a directory to write the checkpoint into")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # a previous save's weights would mix with these
        if old.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.fullmatch(old.name):
            old.unlink()
    bar = tqdm(total=len(layers), desc="saving", unit="layer", disable=not progress)
    with bar:
        _write_shards(out, _model_tensors(model, layers, export, bar), max_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n")
    return out


def _expert_names(model: nn.Module, path: str, layer: FusedMoE) -> Dict[Tuple[str, int, int], str]:
    """Each expert projection's checkpoint name, as transformers saves the float model; refuses
    experts it cannot write one linear per expert for."""
    fix = "quantize it with skip=['lm_head', '*.experts'] to save it (its experts then stay float)"
    if layer.tp_size != 1:
        raise ValueError(f"{path}: this experts layer holds tensor-parallel rank {layer.tp_rank} of {layer.tp_size}, "
                         f"not the whole experts; export from a model built with tp_size=1")
    if layer.w13_bias is not None or layer.w2_bias is not None:
        raise ValueError(f"{path}: the checkpoint formats store experts as one linear per expert, but these experts "
                         f"have stacked biases, which such checkpoints do not hold; {fix}")
    names = expert_checkpoint_names(model, path, layer.num_experts, layer.has_gate, layer.intermediate_size_per_partition)
    if not names:
        raise ValueError(f"{path}: transformers' rules for {type(model).__name__} keep these experts stacked in "
                         f"checkpoints (no per-expert names), and the quantized formats store one linear per expert "
                         f"and projection; {fix}")
    return names


def _model_tensors(model: nn.Module, layers: Dict[str, _Layer], export: _Export, bar) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor to write, in state_dict order; a pymllm_fx layer's tensors where its first one was."""
    state = model.state_dict()
    duplicates = _tied_duplicates(model, state, layers)
    done: Set[str] = set()
    for name, tensor in state.items():
        owner = name.rpartition(".")[0]
        if owner in layers:
            if owner not in done:
                done.add(owner)
                yield from export.tensors(owner)
                bar.update(1)
            continue
        if name not in duplicates:
            yield name, _cpu(tensor)


def _tied_duplicates(model: nn.Module, state: Dict[str, torch.Tensor], layers: Dict[str, _Layer]) -> Set[str]:
    """Names of state_dict entries that are another entry's tensor (tied weights), to leave out.

    Of each tied set, the name save_pretrained keeps is kept: not a key of ``_tied_weights_keys``.
    """
    tied = getattr(model, "_tied_weights_keys", None) or ()
    targets = set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()
    kept: Dict[tuple, str] = {}
    drop: Set[str] = set()
    for name, t in state.items():
        if name.rpartition(".")[0] in layers:
            continue
        if t.device.type == "meta":
            raise ValueError(f"{name}: the tensor is on the meta device (never loaded); load the model's weights first")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        first = kept.get(key)
        if first is None:
            kept[key] = name
        elif first in targets and name not in targets:
            kept[key] = name
            drop.add(first)
        else:
            drop.add(name)
    return drop


def _write_shards(out: Path, tensors: Iterator[Tuple[str, torch.Tensor]], max_bytes: int) -> None:
    """Write ``model.safetensors``, or shards of at most ``max_bytes`` (a bigger tensor gets its own)
    plus the index, as save_pretrained names them."""
    files: List[Tuple[Path, List[str]]] = []
    current: Dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        temp = out / f".pymllm_fx-shard-{len(files):05d}.tmp"
        save_file(current, str(temp), metadata={"format": "pt"})
        files.append((temp, list(current)))
        current.clear()

    seen: Set[str] = set()
    try:
        for name, tensor in tensors:
            if name in seen:
                raise ValueError(f"{name}: two tensors would be written under this name; check merged_layers")
            seen.add(name)
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_bytes:
                flush()
                size = 0
            current[name] = tensor
            size += nbytes
            total += nbytes
        if current or not files:
            flush()
    except BaseException:
        for temp, _ in files:
            temp.unlink(missing_ok=True)
        raise
    if len(files) == 1:
        files[0][0].replace(out / WEIGHTS_NAME)
        return
    weight_map = {}
    for i, (temp, names) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        temp.replace(out / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "5GB" (10**9) or "500MiB" (2**20), as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size; use bytes or a string such as '5GB' or '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _config_json(model: nn.Module, quantization_config: dict) -> dict:
    """The model's HF config as save_pretrained writes it, plus ``quantization_config``."""
    config = getattr(model, "config", None)
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config) if isinstance(config, dict) else {}
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    for key in ("dtype", "torch_dtype"):  # save_pretrained records the float weights' dtype
        if key in data and data[key] is None:
            data[key] = str(_float_dtype(model)).rpartition(".")[2]
    data["quantization_config"] = quantization_config
    return data


def _float_dtype(model: nn.Module) -> torch.dtype:
    plain = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    return next((p.dtype for p in model.parameters() if p.dtype in plain), torch.float32)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).rpartition(".")[2]
    raise TypeError(f"config.json cannot hold a {type(value).__name__} ({value!r})")
