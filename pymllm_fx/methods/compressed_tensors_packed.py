"""The compressed-tensors ``pack-quantized`` scheme: int weights, activations left in float.

``compressed_tensors.py`` matches layers to schemes and writes the format; this scheme's runtime
method lives here, as ``w8a8.py`` and ``fp8_checkpoint.py`` hold the other schemes'.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from pymllm_fx.kernels.w4a16 import PACK_FACTOR, SYMMETRIC_ZERO, num_groups, pack_int4, unpack_words
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import CheckpointMoEMethod
from pymllm_fx.layers.parameter import (
    default_weight_loader,
    load_expert,
    rank_share,
    register_param,
    replace_parameters,
    set_weight_attrs,
    unaligned_output,
)
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.methods.common import check_dequantized_range, check_finite, exact_in, read_int4
from pymllm_fx.methods.fp8_checkpoint import explain_errors
from pymllm_fx.methods.gptq import _g_idx_loader
from pymllm_fx.methods.int4 import GROUP_SIZES

# The w4a16 group size a "channel" scale is repeated over: exact, and a tile size the kernels have.
CHANNEL_RUNTIME_GROUP = 128


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
