"""``"compressed-tensors"``: load llm-compressor checkpoints (the ``compressed-tensors`` format).

The ``quantization_config`` holds ``config_groups``, each a scheme (``weights`` and
``input_activations`` arguments) applied to the layers its ``targets`` name, an ``ignore`` list of
layers left in float, and the storage ``format`` (top level, or per group when "mixed-precision").
One :class:`CompressedTensorsLinearMethod` serves the whole model: ``create_weights`` matches the
layer's module path (``layer.prefix``) and class against the targets as compressed-tensors does
(exact name first, then ``re:<regex>`` names, then class names, ``"Linear"`` naming every
pymllm_fx linear layer; ``ignore`` wins over all) and hands the layer to that group's scheme, kept
on the layer as ``layer.scheme``. Every later call goes to that scheme.

Schemes and their checkpoint tensors (N = out features, K = in features):

``pack-quantized`` int weights, 4 or 8 bits, activations left in float (``PackedIntLinearMethod``):

- ``weight_packed`` int32 ``(N, ceil(K / f))``, ``f = 32 / bits`` values per word. The signed
  value ``q`` (-8..7 or -128..127) is stored as ``q + 2**(bits-1)``; value j of word i is input
  feature ``f*i + j`` at bits ``bits*j ..`` (``pack_to_int32`` in compressed-tensors'
  ``compressors/quantized_compressors/pack_quantized.py``), the tail padded with zeros.
- ``weight_scale`` ``(N, ceil(K / group_size))`` for strategy "group", ``(N, 1)`` for "channel".
- ``weight_zero_point`` (asymmetric only) int32 ``(ceil(N / f), G)``: signed zero points offset
  and packed the same way, but along the output dim.
- ``weight_shape`` ``[N, K]``. The weight is ``(q - zero_point) * scale``.
- ``weight_g_idx`` int32 ``(K,)`` (4-bit ``actorder: "group"`` only): the group of each input; the
  inputs are sorted by it at load (a stable sort gives the groups in scale-column order) and the
  activations permuted the same way per call, as GPTQ act-order.

In merged and tensor-parallel layers a slice must be whole words and whole groups: a row-parallel
rank's in features a multiple of ``32 / bits`` and of ``group_size``; with asymmetric zero points
(packed along N, last word padded) each logical weight's and each rank's out features a multiple
of ``32 / bits``. ``create_weights`` refuses other sizes before anything loads.

4-bit runs on ``w4a16_linear``: its symmetric zero point 8 is the format's offset, so each stored
``q + 8`` is the runtime code, repacked into the runtime layout's 64-feature tiles; asymmetric zero
points become ``zero_point + 8``. A "channel" scale is
repeated over groups of 128 (exact). 8-bit symmetric "channel" runs on ``w8a16_linear``.

``float-quantized`` (or ``naive-quantized``) e4m3 weights with e4m3 activations: see
``fp8_checkpoint.py`` (``weight``, ``weight_scale`` per tensor or channel, ``input_scale`` when
static; strategy "block" (the FP8_BLOCK preset): ``weight_scale`` one per ``block_structure``
block, activations dynamic per token and group of the block's K size).

``int-quantized`` int8 weights with int8 activations (the W8A8 preset; dynamic per-token or
static per-tensor activations, symmetric or, static only, with ``input_zero_point``): see
``w8a8.py`` (``weight`` int8, ``weight_scale``, ``input_scale``, ``input_zero_point``).

``float-quantized`` e4m3 weights without ``input_activations`` (fp8 weight-only; "tensor" or
"channel" scales) run on ``w8a16_linear``, activations left in float (``fp8_checkpoint.py``).

Anything else (asymmetric dynamic int8 activations, tensor-group strategies, sparsity,
transforms, kv-cache schemes) raises NotImplementedError naming it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from pymllm_fx.kernels.w4a16 import PACK_FACTOR, SYMMETRIC_ZERO, num_groups, pack_int4, pack_words, unpack_words
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import CheckpointMoEMethod, FusedMoEMethodBase
from pymllm_fx.layers.parameter import (
    default_weight_loader,
    load_expert,
    rank_share,
    register_param,
    replace_parameters,
    set_weight_attrs,
    unaligned_output,
)
from pymllm_fx.layers.quantize_base import LinearMethodBase, UnquantizedLinearMethod
from pymllm_fx.loading.formats import Site, refuse
from pymllm_fx.methods.common import check_dequantized_range, check_finite, config_pattern, exact_in, read_int4
from pymllm_fx.methods.config_keys import COMPRESSED_TENSORS_KEYS, check_producer_keys
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod, Fp8WeightOnlyLinearMethod, explain_errors
from pymllm_fx.methods.gptq import _g_idx_loader
from pymllm_fx.methods.int4 import GROUP_SIZES
from pymllm_fx.methods.w8a8 import W8A8CheckpointLinearMethod

# The w4a16 group size a "channel" scale is repeated over: exact, and a tile size the kernels have.
CHANNEL_RUNTIME_GROUP = 128
# The compressed-tensors release whose format the writer follows; compressed-tensors drops the key
# when it loads a config.
COMPRESSED_TENSORS_VERSION = "0.12.2"
STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")
ARGS_KEYS = (
    "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
    "observer", "observer_kwargs", "scale_dtype", "zp_dtype",
)
GROUP_KEYS = ("targets", "weights", "input_activations", "output_activations", "format")
TOP_KEYS = (
    "config_groups", "format", "ignore", "kv_cache_scheme", "quantization_status", "global_compression_ratio",
    "sparsity_config", "transform_config", "version", "run_compressed",
)


# --- the format's packing --------------------------------------------------------------------


def unpack_from_int32(packed: torch.Tensor, bits: int, size: int, dim: int) -> torch.Tensor:
    """Signed int32 values from words packed along ``dim`` (0 or 1), ``size`` of them along it."""
    values = unpack_words(packed if dim == 1 else packed.t(), bits, size) - (1 << (bits - 1))
    return values if dim == 1 else values.t()


# --- pack-quantized int weights --------------------------------------------------------------


@dataclass
class PackedIntLinearMethod(LinearMethodBase):
    """compressed-tensors ``pack-quantized`` weights (4 or 8 bits, group or channel); float activations."""

    num_bits: int = 4
    strategy: str = "group"
    group_size: Optional[int] = 128  # None for "channel"
    symmetric: bool = True
    actorder: bool = False  # actorder "group": weight_g_idx numbers each input's group (4-bit groups)

    name = "compressed-tensors"

    def __post_init__(self) -> None:
        if self.num_bits not in (4, 8):
            raise ValueError(
                f"compressed-tensors: num_bits={self.num_bits} is not supported; pack-quantized weights load "
                f"with 4 or 8 bits"
            )
        if self.strategy not in ("group", "channel"):
            raise NotImplementedError(
                f"compressed-tensors: int weight strategy {self.strategy!r} is not supported; "
                f"use 'group' or 'channel'"
            )
        if self.strategy == "group" and self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"compressed-tensors: group_size {self.group_size} is not supported; the w4a16 kernels take "
                f"{', '.join(map(str, GROUP_SIZES))} (or strategy 'channel')"
            )
        if self.actorder and (self.num_bits != 4 or self.strategy != "group"):
            raise NotImplementedError("compressed-tensors: actorder 'group' loads only with 4-bit 'group' weights")
        if self.num_bits == 8 and (self.strategy != "channel" or not self.symmetric):
            raise NotImplementedError(
                "compressed-tensors: 8-bit weights load only as symmetric 'channel' (w8a16_linear has one "
                f"symmetric scale per output row); this scheme is "
                f"{'' if self.symmetric else 'asymmetric '}{self.strategy!r}"
            )

    @property
    def per_word(self) -> int:
        return 32 // self.num_bits

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: List[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        where = getattr(layer, "prefix", "") or "layer"
        n, k = sum(output_partition_sizes), input_size_per_partition
        in_split = input_size != input_size_per_partition
        out_split = n != output_size or len(output_partition_sizes) > 1
        fix = "use a smaller tensor-parallel size or add this layer to skip" if in_split or out_split else "add this layer to skip"
        if self.num_bits == 4 and k % PACK_FACTOR:
            raise ValueError(
                f"{where}: 4-bit weights run on w4a16_linear, which packs {PACK_FACTOR} input features per int32, "
                f"but {rank_share(layer, 'in_features', k, in_split)} is not a multiple of {PACK_FACTOR}; {fix}"
            )
        # A row-parallel rank narrows weight_packed by whole words and weight_scale by whole groups: a
        # word or a group that straddles two ranks cannot be split.
        if in_split and k % self.per_word:
            raise ValueError(
                f"{where}: weight_packed holds {self.per_word} input features per int32, but "
                f"{rank_share(layer, 'in_features', k, True)} is not a multiple of {self.per_word}; {fix}"
            )
        if in_split and self.strategy == "group" and k % self.group_size:
            raise ValueError(
                f"{where}: row-parallel layers give each rank whole groups of weight_scale, but "
                f"{rank_share(layer, 'in_features', k, True)} is not a multiple of group_size={self.group_size}; "
                f"use a tensor-parallel size that divides in_features={input_size} into multiples of "
                f"{self.group_size}, or add this layer to skip"
            )
        # weight_zero_point packs per_word output rows per int32 (padding the last word), so a merged
        # shard or a rank's slice must be whole words.
        unaligned = unaligned_output(output_partition_sizes, self.per_word)
        if not self.symmetric and out_split and unaligned:
            raise ValueError(
                f"{where}: asymmetric weight_zero_point packs {self.per_word} output features per int32, "
                f"but {rank_share(layer, *unaligned, n != output_size)} is not a multiple of "
                f"{self.per_word}, so it cannot be split into shards or ranks; {fix}"
            )
        if in_split and self.actorder:  # as GPTQ act-order: each rank would hold part of every group
            raise NotImplementedError(
                f"{where}: actorder 'group' (weight_g_idx) numbers groups over a permutation of all {input_size} "
                f"inputs, so a row-parallel rank's slice of {k} mixes members of every group, which the W4A16 "
                f"kernel's contiguous groups cannot express; keep this layer unsplit"
            )
        groups = num_groups(k, self.group_size) if self.strategy == "group" else 1
        loader = extra_weight_attrs.get("weight_loader", default_weight_loader)
        bits = f"{self.num_bits}-bit"

        def register(name: str, data: torch.Tensor, attrs: dict, hint: str) -> None:
            register_param(layer, name, data, {"weight_loader": explain_errors(where, loader, hint), **attrs}, extra_weight_attrs)

        register(
            "weight_packed", torch.empty(n, -(-k // self.per_word), dtype=torch.int32),
            dict(input_dim=1, output_dim=0, packed_dim=1, packed_factor=self.per_word),
            f"{bits} weights pack {self.per_word} values per int32, so in_features={k} needs "
            f"{-(-k // self.per_word)} columns: the checkpoint's num_bits differs from config_groups' num_bits",
        )
        scale_hint = (
            f"group_size={self.group_size} gives {groups} scales per row for in_features={k}: the checkpoint "
            f"was quantized with another group_size than config_groups says"
            if self.strategy == "group" else "strategy 'channel' has one scale per output row, shape (N, 1)"
        )
        group_dim = dict(input_dim=1) if self.strategy == "group" else {}
        register("weight_scale", torch.full((n, groups), float("nan")), dict(output_dim=0, **group_dim), scale_hint)
        if not self.symmetric:
            register(
                "weight_zero_point", torch.empty(-(-n // self.per_word), groups, dtype=torch.int32),
                dict(output_dim=0, packed_dim=0, packed_factor=self.per_word, **group_dim),
                f"asymmetric zero points are packed {self.per_word} per int32 along the output dim, "
                f"shape (ceil(N / {self.per_word}), groups); {scale_hint}",
            )
        if self.actorder:  # -1: not loaded yet; merged shards share one input, so one g_idx
            register_param(layer, "weight_g_idx", torch.full((k,), -1, dtype=torch.int32),
                           {"input_dim": 0, "weight_loader": _g_idx_loader(where, loader)}, extra_weight_attrs)
        shape = torch.nn.Parameter(torch.empty(2, dtype=torch.int64), requires_grad=False)
        set_weight_attrs(shape, {"weight_loader": _weight_shape_loader(output_size, input_size)})
        layer.register_parameter("weight_shape", shape)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        where = getattr(layer, "prefix", "") or "layer"
        n, k = layer.weight_packed.shape[0], layer.input_size_per_partition
        scales = layer.weight_scale.data
        check_finite(where, "weight_scale", scales)
        check_dequantized_range(where, scales, 128 if self.num_bits == 8 else 15, getattr(layer, "params_dtype", scales.dtype))
        scales = exact_in(scales, getattr(layer, "params_dtype", scales.dtype))
        remove = ("weight_packed", "weight_scale", "weight_shape")
        if self.num_bits == 8:
            codes = unpack_from_int32(layer.weight_packed.data, 8, k, dim=1).to(torch.int8)
            replace_parameters(
                layer, remove, {"qweight": codes.contiguous(), "scales": scales.reshape(n).contiguous()}
            )
            return
        codes = unpack_words(layer.weight_packed.data, 4, k)
        perm = None
        if self.actorder:  # the runtime layout holds each group's inputs side by side, x is permuted to match
            perm = _act_order(where, layer.weight_g_idx.data, k, self.group_size, scales.shape[1])
            codes = codes.index_select(1, perm)
            remove += ("weight_g_idx",)
        zeros = None
        if not self.symmetric:
            zero_points = unpack_from_int32(layer.weight_zero_point.data, 4, n, dim=0)
            zeros = (zero_points + SYMMETRIC_ZERO).to(scales.dtype)
            remove += ("weight_zero_point",)
        if self.strategy == "channel":
            # One scale per row is a run of equal per-group scales: exact.
            repeat = num_groups(k, CHANNEL_RUNTIME_GROUP)
            scales = scales.expand(n, repeat)
            zeros = None if zeros is None else zeros.expand(n, repeat)
        replace_parameters(
            layer, remove,
            {
                # The stored q + 8 is the runtime code; the runtime layout orders it in 64-feature tiles.
                "qweight": pack_int4(codes),
                "scales": scales.contiguous(),
                "zeros": None if zeros is None else zeros.contiguous(),
            },
        )
        if self.actorder:
            layer.register_buffer("perm", perm)

    def _runtime_group(self) -> int:
        return self.group_size if self.strategy == "group" else CHANNEL_RUNTIME_GROUP

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.num_bits == 8:
            return torch.ops.pymllm_fx.w8a16_linear(x, layer.qweight, layer.scales, bias)
        if self.actorder:
            x = x.index_select(-1, layer.perm)
        return torch.ops.pymllm_fx.w4a16_linear(
            x, layer.qweight, layer.scales, layer.zeros, self._runtime_group(), bias
        )

    def experts_method(self) -> "PackedIntMoEMethod":
        return PackedIntMoEMethod(self)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        if self.num_bits == 8:
            return Quantized("int8", layer.qweight.data, layer.scales.data)
        if self.strategy == "group":  # actorder "group": the runtime permutation gives back weight_g_idx
            return read_int4(layer, where, self.group_size, self.group_size, per_row=False,
                             perm=getattr(layer, "perm", None))
        return read_int4(layer, where, layer.input_size_per_partition, CHANNEL_RUNTIME_GROUP, per_row=True)

    def describe(self, layer: torch.nn.Module) -> str:
        group = f"g{self.group_size}" if self.strategy == "group" else "per-channel"
        return f"W{self.num_bits}A16 {group} {'sym' if self.symmetric else 'asym'}" + (" act-order" if self.actorder else "")


def _act_order(where: str, g_idx: torch.Tensor, k: int, group_size: int, groups: int) -> torch.Tensor:
    """The input permutation that sorts ``weight_g_idx`` (stable), checked to give equal groups of
    ``group_size`` in scale-column order (compressed-tensors quantizes group i of the sorted inputs
    with scale column i)."""
    g_idx = g_idx.long()
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(
            f"{where}: tensor 'weight_g_idx' has group indices in [{int(g_idx.min())}, {int(g_idx.max())}] but the "
            f"layer has {groups} groups; it was never loaded, or does not match weight_scale"
        )
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // group_size):
        raise ValueError(
            f"{where}: tensor 'weight_g_idx' does not split the {k} inputs into groups of {group_size} (group sizes "
            f"{torch.bincount(g_idx, minlength=groups).tolist()[:8]}...); check group_size against the checkpoint"
        )
    return perm.to(torch.int32)


@dataclass
class PackedIntMoEMethod(CheckpointMoEMethod):
    """Experts of a ``pack-quantized`` checkpoint (each expert's projection: ``weight_packed``,
    ``weight_scale``, ``weight_zero_point`` when asymmetric, ``weight_shape``), stacked as stored.
    4-bit: the stored words are already the int4 experts layout (eight ``q + 8`` codes per int32
    along K, low bits first), so they run as loaded; 8-bit symmetric channel runs on ``moe_w8``."""

    scheme: PackedIntLinearMethod

    name = "compressed-tensors"

    @property
    def group_size(self) -> int:
        return self.scheme.group_size if self.scheme.strategy == "group" else -1

    def projection(self, where, which, k, n, part, params_dtype):
        scheme, f = self.scheme, self.scheme.per_word
        if scheme.num_bits == 4 and k % PACK_FACTOR:
            raise ValueError(f"{where}: 4-bit experts pack {PACK_FACTOR} input features per int32, but {which} has "
                             f"{k}; load the float model and call quantize(model, 'int8')")
        if not scheme.symmetric and part % f and part != n:
            raise ValueError(f"{where}: asymmetric weight_zero_point packs {f} output rows per int32, but {which} "
                             f"stacks projections of {part} rows; load the float model and call quantize(model, 'int8')")
        groups = num_groups(k, scheme.group_size) if scheme.strategy == "group" else 1
        tensors = {
            "weight_packed": ((n, -(-k // f)), torch.int32, dict(output_dim=0)),
            "weight_scale": ((n, groups), torch.float32, dict(output_dim=0)),
            "weight_shape": ((2,), torch.int64, dict(weight_loader=_expert_shape_loader(part, k))),
        }
        if not scheme.symmetric:
            tensors["weight_zero_point"] = ((-(-n // f), groups), torch.int32,
                                            dict(output_dim=0, packed_dim=0, packed_factor=f))
        return tensors

    def runtime(self, where, which, stacks, params_dtype):
        scheme = self.scheme
        packed, scales = stacks["weight_packed"], stacks["weight_scale"]
        experts, n, words = packed.shape
        check_finite(where, f"{which}_weight_scale", scales)
        check_dequantized_range(where, scales, 128 if scheme.num_bits == 8 else 15, params_dtype)
        if scheme.num_bits == 8:
            k = int(stacks["weight_shape"][0, 1])  # checked by its loader; the last word may be padding
            codes = unpack_words(packed.reshape(experts * n, words), 8, k) - 128
            return {which + "_qweight": codes.to(torch.int8).view(experts, n, k).contiguous(),
                    which + "_scales": scales.float().reshape(experts, n).contiguous()}
        scales = exact_in(scales, params_dtype)
        zeros = None
        if not scheme.symmetric:
            zp = stacks["weight_zero_point"]  # (E, ceil(N / 8), G), packed along the outputs
            groups = zp.shape[2]
            # Stored as zero_point + 8, which is the runtime's zero point (its codes are q + 8 too).
            values = unpack_words(zp.transpose(1, 2).reshape(experts * groups, -1), 4, n)
            zeros = values.view(experts, groups, n).transpose(1, 2).to(scales.dtype).contiguous()
        return {which + "_qweight": packed.contiguous(), which + "_scales": scales.contiguous(), which + "_zeros": zeros}

    def describe(self, layer: torch.nn.Module) -> str:
        return f"{self.scheme.describe(layer)}, {layer.num_experts} experts"


def _expert_shape_loader(rows: int, cols: int):
    """``weight_shape`` of one expert's projection must say ``[rows, cols]``; a mismatch means a wrong
    checkpoint. Each projection's copy fills the expert's slot."""

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.dtype.is_floating_point or loaded.numel() != 2:
            raise ValueError(f"weight_shape must be two integers [out, in], found {loaded.dtype} of shape "
                             f"{tuple(loaded.shape)}")
        found = [int(v) for v in loaded.reshape(2)]
        if found != [rows, cols]:
            raise ValueError(f"weight_shape says the checkpoint weight is {found}, but this expert projection is "
                             f"[out={rows}, in={cols}]; the checkpoint is for another model")
        load_expert(param, loaded.reshape(2).to(param.dtype), shard_id)

    return load


class _RefusedExperts(FusedMoEMethodBase):
    """Experts a checkpoint's config gives no loadable scheme: refused when the layer is built."""

    name = "compressed-tensors"
    prequantized = True

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def create_weights(self, layer, *args, **kwargs) -> None:
        raise NotImplementedError(f"{getattr(layer, 'prefix', '') or 'experts'}: {self.reason}; load the float model "
                                  f"and call quantize(model, method)")

    def apply(self, layer, x, topk_ids, topk_weights) -> torch.Tensor:
        raise NotImplementedError(self.reason)


def _weight_shape_loader(output_size: int, input_size: int):
    """``weight_shape`` is not used at run time, but a mismatch means a wrong checkpoint: refuse it."""

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        if loaded.dtype.is_floating_point or loaded.numel() != 2:
            raise ValueError(
                f"weight_shape must be two integers [out, in], found {loaded.dtype} of shape {tuple(loaded.shape)}"
            )
        found = [int(v) for v in loaded.reshape(2)]
        # A shard of a merged layer has its own row count; only the input size is the layer's.
        if found[1] != input_size or (shard_id is None and found[0] != output_size):
            raise ValueError(
                f"weight_shape says the checkpoint weight is {found}, but this layer is [out={output_size}, "
                f"in={input_size}]; the checkpoint is for another model or layer"
            )
        with torch.no_grad():
            param.copy_(loaded.reshape(2).to(param.dtype))

    return load


# --- the whole-model method ---------------------------------------------------------------------


class _Unquantized(UnquantizedLinearMethod):
    """A layer the config leaves in float: the checkpoint holds its plain ``weight``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def describe(self, layer: torch.nn.Module) -> str:
        return f"unquantized ({self.reason})"


def _name_matches(path: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], path) is not None
    return path == target


def _class_matches(layer: torch.nn.Module, target: str) -> bool:
    names = {cls.__name__ for cls in type(layer).__mro__}
    return target in names or (target == "Linear" and "LinearBase" in names)


@dataclass
class CompressedTensorsLinearMethod(LinearMethodBase):
    """Every layer of a compressed-tensors checkpoint, each with the scheme its config group gives it."""

    # target -> (config group name, scheme), in the config's order; a target listed by two groups
    # keeps its first position and the later group's scheme, as compressed-tensors does.
    targets: Dict[str, Tuple[str, LinearMethodBase]] = field(default_factory=dict)
    ignore: Tuple[str, ...] = ()

    name = "compressed-tensors"
    prequantized = True  # loads a checkpoint; quantize() without weights= is refused

    def scheme_for(self, layer: torch.nn.Module) -> Tuple[str, LinearMethodBase]:
        """``(config group name or "", scheme)`` for ``layer``, by its module path and class."""
        path = getattr(layer, "prefix", "")
        for entry in self.ignore:
            if _name_matches(path, entry) or _class_matches(layer, entry):
                return "", _Unquantized(f"compressed-tensors ignore {entry!r}")
        exact = [t for t in self.targets if not t.startswith("re:") and path == t]
        regex = [t for t in self.targets if t.startswith("re:") and _name_matches(path, t)]
        by_class = [t for t in self.targets if _class_matches(layer, t)]
        for target in exact + regex + by_class:
            return self.targets[target]
        return "", _Unquantized("no compressed-tensors config group targets it")

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: List[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        group, scheme = self.scheme_for(layer)
        layer.scheme = scheme
        layer.scheme_group = group
        scheme.create_weights(
            layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype,
            **extra_weight_attrs,
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.scheme.process_weights_after_loading(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return layer.scheme.apply(layer, x, bias)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Optional[Quantized]:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        scheme = layer.scheme  # the group's scheme answers, as it runs the layer
        if isinstance(scheme, UnquantizedLinearMethod):
            return None
        view = getattr(scheme, "checkpoint_view", None)
        if view is None:
            raise ValueError(f"{where}: save_quantized does not know how to export layers quantized with "
                             f"{type(scheme).__name__}; skip this layer when quantizing, or give the scheme a "
                             f"checkpoint_view (pymllm_fx/layers/quantize_base.py)")
        return view(layer, where)

    def describe(self, layer: torch.nn.Module) -> str:
        text = layer.scheme.describe(layer)
        return f"{layer.scheme_group}: {text}" if layer.scheme_group else text

    def experts_method(self) -> FusedMoEMethodBase:
        """Experts take the scheme of the config group that targets ``Linear`` (every per-expert
        projection is a Linear to the tools that wrote the checkpoint), as vLLM chooses it."""
        if "Linear" not in self.targets:
            return _RefusedExperts(
                f"no compressed-tensors config group targets 'Linear' (targets: {sorted(self.targets)[:4]}), and "
                f"pymllm_fx gives experts the 'Linear' group's scheme")
        group, scheme = self.targets["Linear"]
        make = getattr(scheme, "experts_method", None)
        if make is None:
            return _RefusedExperts(f"config group {group!r} ({type(scheme).__name__}) has no experts layout here")
        method = make()
        method.name, method.ignore = self.name, self.ignore
        return method

    @classmethod
    def from_config(cls, config: dict) -> "CompressedTensorsLinearMethod":
        check_producer_keys(cls.name, config, TOP_KEYS, COMPRESSED_TENSORS_KEYS)
        if config.get("kv_cache_scheme") is not None:
            raise NotImplementedError(
                "compressed-tensors: kv_cache_scheme is not supported (its k/v scales have no home here); "
                "use a checkpoint exported without kv-cache quantization"
            )
        sparsity = config.get("sparsity_config") or {}
        if sparsity and sparsity.get("format", "dense") != "dense":
            raise NotImplementedError(
                f"compressed-tensors: sparsity format {sparsity.get('format')!r} is not supported"
            )
        if config.get("transform_config"):
            raise NotImplementedError("compressed-tensors: transform_config (rotations) is not supported")
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors: quantization_config has no config_groups")
        targets: Dict[str, Tuple[str, LinearMethodBase]] = {}
        for group_name, group in groups.items():
            scheme = _scheme_from_group(group_name, group, config.get("format"))
            for target in group["targets"]:
                targets[target] = (group_name, scheme)
        ignore = config.get("ignore") or ()
        if isinstance(ignore, str):
            ignore = (ignore,)
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(i, str) for i in ignore):
            raise ValueError(f"compressed-tensors: 'ignore' must be a list of module names or 're:' patterns, found {ignore!r}")
        for where, pattern in [("ignore", i) for i in ignore] + [("targets", t) for t in targets]:
            if pattern.startswith("re:"):
                config_pattern(cls.name, f"quantization_config {where} entry", pattern[3:])
        return cls(targets=targets, ignore=tuple(ignore))

    # --- writing (the checkpoint-writer extension of quantize_base.py) ---
    # llm-compressor (``compressors/quantized_compressors/pack_quantized.py`` ``pack_to_int32``,
    # ``quantization/quant_config.py``, ``ModelCompressor.update_config``): int4 / int8 ``pack-quantized``
    # (group or channel), W8A8 int8 ``int-quantized`` (``weight`` int8, ``weight_scale``, static
    # ``input_scale`` / ``input_zero_point``) and fp8 ``float-quantized`` (tensor, channel or block weight
    # scales; dynamic per-token / per-tensor / per-group or static activations). One config group per
    # distinct scheme, targets ``["Linear"]`` when there is a single scheme (and no GPT-2 ``Conv1D``,
    # whose class is not "Linear"), else the module names.

    @classmethod
    def checkpoint_config(cls, sites: List[Site], floats: List[str]) -> dict:
        """llm-compressor's ``quantization_config``: one config group per distinct scheme."""
        fmt = cls.name
        groups: Dict[str, Tuple[dict, List[str]]] = {}
        for site in sites:
            scheme = _written_scheme(site)
            groups.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(site.name)
        by_name = len(groups) > 1 or any(site.conv1d for site in sites)
        experts = {site.name for site in sites if site.expert}
        with_experts = [i for i, (_, names) in enumerate(groups.values()) if experts & set(names)]
        if len(with_experts) > 1:
            raise ValueError(f"cannot write {fmt!r}: its readers give every expert the scheme of the group that "
                             f"targets 'Linear', but these experts have {len(with_experts)} schemes; use format='gptq' "
                             f"or 'awq'")
        config_groups = {}
        for i, (scheme, names) in enumerate(groups.values()):
            # Experts are matched by class ("Linear"), the other layers by name when there are several schemes.
            targets = [name for name in names if name not in experts] + (["Linear"] if i in with_experts else [])
            config_groups[f"group_{i}"] = {**scheme, "targets": targets if by_name else ["Linear"]}
        formats = {scheme["format"] for scheme, _ in groups.values()}
        return {
            "quant_method": "compressed-tensors", "version": COMPRESSED_TENSORS_VERSION,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": list(floats),
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
        }

    @staticmethod
    def checkpoint_tensors(site: Site, config: dict) -> Dict[str, torch.Tensor]:
        """``pack-quantized`` (``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``),
        ``int-quantized`` or ``float-quantized`` (``weight``, ``weight_scale``, ``input_scale``)."""
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


def _written_scheme(site: Site) -> dict:
    """The config group (less its targets) that holds ``site`` exactly; refuses a site none holds."""
    q, fmt = site.q, CompressedTensorsLinearMethod.name
    if q.kind == "int4":
        if q.zeros is not None and q.group_size != -1 and site.k % q.group_size:
            raise refuse(site, fmt, f"in_features={site.k} is not a multiple of group_size {q.group_size}, "
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


def _ct_args(bits: int, kind: str, symmetric: bool, strategy: str, group_size: Optional[int], dynamic: bool = False) -> dict:
    """compressed-tensors ``QuantizationArgs`` as ``model_dump`` writes them."""
    return {
        "num_bits": bits, "type": kind, "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
        "block_structure": None, "dynamic": dynamic, "actorder": None,
        "observer": None if dynamic else "minmax", "observer_kwargs": {},
    }


# --- config parsing -------------------------------------------------------------------------------


def _scheme_from_group(group_name: str, group: Any, default_format: Optional[str]) -> LinearMethodBase:
    where = f"compressed-tensors config_groups[{group_name!r}]"
    if not isinstance(group, dict):
        raise NotImplementedError(
            f"{where} is {group!r}, a preset scheme name with its targets; write the scheme out in full "
            f"(targets, weights, input_activations) as a saved checkpoint's config.json does"
        )
    unknown = sorted(set(group) - set(GROUP_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; accepted keys: {sorted(GROUP_KEYS)}")
    targets = group.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
        raise ValueError(
            f"{where}: 'targets' must be a non-empty list of module names, 're:' patterns or class names"
        )
    if group.get("output_activations") is not None:
        raise NotImplementedError(f"{where}: output_activations quantization is not supported")
    fmt = group.get("format") or default_format
    if fmt is None or fmt == "mixed-precision":
        raise ValueError(f"{where}: no storage format; set 'format' on the group or at the top level")
    if group.get("weights") is None:
        raise NotImplementedError(f"{where}: activation-only quantization (no 'weights') is not supported")
    weights = _parse_args(f"{where}.weights", group["weights"])
    acts = group.get("input_activations")
    acts = None if acts is None else _parse_args(f"{where}.input_activations", acts)

    if weights["type"] == "int" and acts is not None:
        return _w8a8_scheme(where, fmt, weights, acts)
    if weights["type"] == "int":
        if fmt != "pack-quantized":
            raise NotImplementedError(f"{where}: int weights load from format 'pack-quantized', not {fmt!r}")
        # actorder "group" (alias "dynamic", or true) stores weight_g_idx for group strategies only.
        actorder = weights["actorder"] in ("group", "dynamic", True) and weights["strategy"] == "group"
        if weights["dynamic"]:
            raise NotImplementedError(f"{where}: dynamic weight quantization is not supported")
        return PackedIntLinearMethod(
            num_bits=weights["num_bits"], strategy=weights["strategy"],
            group_size=int(weights["group_size"]) if weights["strategy"] == "group" else None,
            symmetric=weights["symmetric"], actorder=actorder,
        )

    if fmt not in ("float-quantized", "naive-quantized"):
        raise NotImplementedError(f"{where}: float weights load from format 'float-quantized', not {fmt!r}")
    if weights["num_bits"] != 8 or not weights["symmetric"] or weights["dynamic"]:
        raise NotImplementedError(f"{where}: float weights load only as static symmetric 8-bit (e4m3)")
    if weights["strategy"] not in ("tensor", "channel", "block"):
        raise NotImplementedError(
            f"{where}: fp8 weight strategy {weights['strategy']!r} is not supported; use 'tensor', 'channel' or 'block'"
        )
    if acts is None:
        if weights["strategy"] not in ("tensor", "channel"):
            raise NotImplementedError(f"{where}: fp8 weight-only weights load with strategy 'tensor' or 'channel', "
                                      f"not {weights['strategy']!r}")
        return Fp8WeightOnlyLinearMethod(weight_strategy=weights["strategy"])
    if acts["type"] != "float" or acts["num_bits"] != 8 or not acts["symmetric"]:
        raise NotImplementedError(f"{where}: fp8 weights need symmetric 8-bit float input_activations")
    if weights["strategy"] == "block":
        method = Fp8CheckpointLinearMethod.for_blocks(weights["block_structure"], scale_name="weight_scale")
        group = method.weight_block_size[1]
        if not acts["dynamic"] or acts["strategy"] != "group" or acts["group_size"] != group:
            raise NotImplementedError(
                f"{where}: block-wise fp8 weights (block_structure {weights['block_structure']}) run with dynamic "
                f"input_activations of strategy 'group', group_size {group} (the FP8_BLOCK scheme); this scheme has "
                f"strategy {acts['strategy']!r}, group_size {acts['group_size']}, dynamic={acts['dynamic']}"
            )
        return method
    if acts["dynamic"] and acts["strategy"] in ("token", "tensor"):
        scheme, strategy = "dynamic", acts["strategy"]
    elif not acts["dynamic"] and acts["strategy"] == "tensor":
        scheme, strategy = "static", "tensor"
    else:
        raise NotImplementedError(
            f"{where}: input_activations strategy {acts['strategy']!r} (dynamic={acts['dynamic']}) is not "
            f"supported; use dynamic 'token' or 'tensor', or static 'tensor'"
        )
    return Fp8CheckpointLinearMethod(
        activation_scheme=scheme, activation_strategy=strategy, weight_strategy=weights["strategy"]
    )


def _w8a8_scheme(where: str, fmt: str, weights: Dict[str, Any], acts: Dict[str, Any]) -> W8A8CheckpointLinearMethod:
    """int8 weights with int8 input activations (the W8A8 preset, ``int-quantized``)."""
    scheme = f"W{weights['num_bits']}A{acts['num_bits']} ({weights['type']} weights, {acts['type']} activations)"
    if fmt not in ("int-quantized", "naive-quantized"):
        raise NotImplementedError(f"{where}: {scheme} loads from format 'int-quantized', not {fmt!r}")
    if weights["num_bits"] != 8 or acts["num_bits"] != 8 or acts["type"] != "int":
        raise NotImplementedError(f"{where}: {scheme} is not supported; int weights with quantized activations "
                                  f"load as W8A8 int8 (8-bit int weights and 8-bit int input_activations)")
    if not weights["symmetric"] or weights["dynamic"] or weights["actorder"] not in (None, False, "weight", "static"):
        raise NotImplementedError(f"{where}: W8A8 int8 weights load only as static symmetric weights without "
                                  f"activation ordering (the W8A8 preset)")
    if weights["strategy"] not in ("channel", "tensor"):
        raise NotImplementedError(f"{where}: W8A8 int8 weight strategy {weights['strategy']!r} is not supported; "
                                  f"use 'channel' (the W8A8 preset) or 'tensor'")
    if acts["dynamic"] is True and acts["strategy"] == "token":
        if not acts["symmetric"]:
            raise NotImplementedError(
                f"{where}: asymmetric dynamic int8 input_activations (a scale and zero point per token from its "
                f"min and max) are not supported; use symmetric dynamic (the W8A8 preset) or static activations"
            )
        scheme_name = "dynamic"
    elif acts["dynamic"] is False and acts["strategy"] == "tensor":
        scheme_name = "static"
    else:
        raise NotImplementedError(
            f"{where}: W8A8 int8 input_activations strategy {acts['strategy']!r} (dynamic={acts['dynamic']}) is not "
            f"supported; use dynamic 'token' (the W8A8 preset) or static 'tensor'"
        )
    return W8A8CheckpointLinearMethod(
        activation_scheme=scheme_name, input_symmetric=acts["symmetric"], weight_strategy=weights["strategy"]
    )


def _parse_args(where: str, args: Any) -> Dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` with their defaults filled and the strategy inferred."""
    if not isinstance(args, dict):
        raise ValueError(f"{where} must be a dict of quantization arguments, got {args!r}")
    unknown = sorted(set(args) - set(ARGS_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; accepted keys: {sorted(ARGS_KEYS)}")
    for key, kinds in (("num_bits", int), ("type", str), ("symmetric", bool), ("dynamic", (bool, str)),
                       ("strategy", str), ("group_size", int), ("actorder", (bool, str))):
        value = args.get(key)
        if value is not None and (not isinstance(value, kinds) or (kinds is int and isinstance(value, bool))):
            raise ValueError(f"{where}: {key!r} must be {getattr(kinds, '__name__', 'bool or str')}, found {value!r}")
    out = {
        "num_bits": int(args.get("num_bits", 8)),
        "type": str(args.get("type", "int")).lower(),
        "symmetric": bool(args.get("symmetric", True)),
        "group_size": args.get("group_size"),
        "strategy": args.get("strategy"),
        "block_structure": args.get("block_structure"),
        "dynamic": args.get("dynamic", False),
        "actorder": args.get("actorder"),
    }
    if out["type"] not in ("int", "float"):
        raise ValueError(f"{where}: type {out['type']!r} is not 'int' or 'float'")
    group_size = out["group_size"]
    if out["strategy"] is None:  # inferred from group_size, as compressed-tensors does
        out["strategy"] = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    out["strategy"] = str(out["strategy"]).lower()
    if out["strategy"] not in STRATEGIES:
        raise ValueError(
            f"{where}: unknown strategy {out['strategy']!r}; compressed-tensors strategies are "
            f"{', '.join(STRATEGIES)}"
        )
    if out["strategy"] == "group" and (group_size is None or int(group_size) <= 0):
        raise ValueError(f"{where}: strategy 'group' needs a positive group_size, got {group_size!r}")
    if isinstance(out["actorder"], str):
        out["actorder"] = out["actorder"].lower()
    return out
