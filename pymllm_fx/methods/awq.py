"""``"awq"``: load AutoAWQ GEMM checkpoints (4-bit, per-group scales and zero points) into W4A16.

Checkpoint layout (AutoAWQ ``WQLinear_GEMM``; K = in features, N = out features, g = group size):

- ``qweight`` int32 ``(K, N // 8)``: packed along N. Word ``c`` of row k holds the codes of output
  features ``8c .. 8c+7`` in the interleaved order ``AWQ_ORDER``: nibble i (bits ``4i .. 4i+3``)
  is output feature ``8c + AWQ_ORDER[i]``.
- ``qzeros`` int32 ``(K // g, N // 8)``: integer zero points, packed exactly like ``qweight``.
- ``scales`` float16 ``(K // g, N)``.
- The weight is ``W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]``.

``zero_point: false`` (symmetric) checkpoints still carry ``qzeros`` (every consumer of this layout
reads them); they must all be 8, and the layer then runs with the symmetric zero of the runtime.

In merged and tensor-parallel layers every slice must be whole words and whole groups: each
logical weight's (and each rank's) out features a multiple of 8, a row-parallel rank's in features
a multiple of the group size; ``create_weights`` refuses other sizes before anything loads.

``process_weights_after_loading`` unpacks, transposes and repacks everything into the W4A16 runtime
layout (``kernels/w4a16.py``) and deletes the checkpoint tensors; ``apply`` runs
``torch.ops.pymllm_fx.w4a16_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from pymllm_fx.kernels.w4a16 import PACK_FACTOR, SYMMETRIC_ZERO, pack_int4, pack_words
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import CheckpointMoEMethod
from pymllm_fx.layers.parameter import rank_share, register_param, replace_parameters, unaligned_output
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.loading.formats import Site, one_value, refuse
from pymllm_fx.methods.common import (
    check_dequantized_range,
    config_bool,
    config_int,
    config_names,
    config_str,
    checkpoint_group,
    expand_groups,
    is_float_layer,
    leave_float,
    read_int4,
    runtime_group,
    supported_group_size,
)
from pymllm_fx.methods.config_keys import AWQ_KEYS, check_producer_keys

# Nibble i of a packed word holds the value of column AWQ_ORDER[i] of its group of eight, so column
# p sits in nibble AWQ_REVERSE_ORDER[p] (AutoAWQ awq/utils/packing_utils.py).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
# The keys read here; the rest of what AWQ tools write is listed in config_keys.AWQ_KEYS.
READ_KEYS = (
    "bits", "w_bit", "group_size", "q_group_size", "zero_point", "version", "format", "checkpoint_format",
    "desc_act", "modules_to_not_convert", "method", "backend",
)
# AutoAWQ's GEMM packing; transformers' "exllama" and "ipex" versions load that same layout and repack it.
GEMM_VERSIONS = ("gemm", "exllama", "ipex")


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``(R, N // 8)`` in AutoAWQ's interleaved order -> int32 codes ``(R, N)`` in column order."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (R, N // 8, 8), nibble order
    reverse = torch.tensor(AWQ_REVERSE_ORDER, device=packed.device)
    return nibbles.index_select(-1, reverse).reshape(packed.shape[0], -1)


@dataclass
class AWQLinearMethod(LinearMethodBase):
    """AutoAWQ GEMM 4-bit weights, repacked into the W4A16 layout; activations stay float."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    # Module names the checkpoint left unquantized (from quantization_config): a layer whose path
    # contains one (matched as transformers and vLLM match it) holds a plain float weight.
    modules_to_not_convert: Tuple[str, ...] = ()

    name = "awq"
    # Loads an already-quantized checkpoint: there is no float weight to calibrate from, so
    # quantize() needs weights=<checkpoint path>.
    prequantized = True

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"awq: bits={self.bits} is not supported; AutoAWQ GEMM checkpoints are 4-bit (bits=4)")
        if not supported_group_size(self.group_size):
            raise ValueError(
                f"awq: group_size {self.group_size} is not supported; use 32, 64, a multiple of 128, or -1 "
                f"(one group per output row)"
            )
        if str(self.version).lower() not in GEMM_VERSIONS:
            raise ValueError(
                f"awq: version {self.version!r} is not supported; only AutoAWQ's 'gemm' layout is loaded "
                f"(re-export the model with version='gemm')"
            )
        self.version = "gemm"
        self.modules_to_not_convert = tuple(self.modules_to_not_convert or ())

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
        if any(name in getattr(layer, "prefix", "") for name in self.modules_to_not_convert):
            leave_float(layer, "AWQ modules_to_not_convert", input_size_per_partition, output_partition_sizes,
                        input_size, output_size, params_dtype, **extra_weight_attrs)
            return
        where = getattr(layer, "prefix", "") or "layer"
        k, n = input_size_per_partition, sum(output_partition_sizes)
        in_split = input_size != input_size_per_partition
        out_split = n != output_size or len(output_partition_sizes) > 1
        fix = "use a smaller tensor-parallel size or skip this layer" if in_split or out_split else "skip this layer"
        group = checkpoint_group(self.group_size, k)
        if k % group:
            raise ValueError(
                f"{where}: awq needs in_features divisible by group_size (each rank takes whole groups of scales "
                f"and zeros), but {rank_share(layer, 'in_features', k, in_split)} and group_size={group}; "
                f"{fix}, or use a checkpoint with a group size that divides {k}"
            )
        if k % PACK_FACTOR:
            raise ValueError(
                f"{where}: awq runs with {PACK_FACTOR} input features per int32, but "
                f"{rank_share(layer, 'in_features', k, in_split)} is not a multiple of {PACK_FACTOR}; {fix}"
            )
        # qweight / qzeros words hold 8 interleaved output features: a slice must be whole words.
        unaligned = unaligned_output(output_partition_sizes, PACK_FACTOR)
        if unaligned:
            raise ValueError(
                f"{where}: awq packs {PACK_FACTOR} output features per int32 (qweight, qzeros), but "
                f"{rank_share(layer, *unaligned, out_split)} is not a multiple of {PACK_FACTOR}; {fix}"
            )
        # One group per row is the same on every tensor-parallel rank: no input_dim to split along.
        group_input_dim = None if self.group_size == -1 else 0

        packed_n = dict(output_dim=1, packed_dim=1, packed_factor=PACK_FACTOR)
        qweight = torch.empty(k, n // PACK_FACTOR, dtype=torch.int32)
        register_param(layer, "qweight", qweight, dict(input_dim=0, **packed_n), extra_weight_attrs)
        qzeros = torch.empty(k // group, n // PACK_FACTOR, dtype=torch.int32)
        register_param(layer, "qzeros", qzeros, dict(input_dim=group_input_dim, **packed_n), extra_weight_attrs)
        scales = torch.empty(k // group, n, dtype=params_dtype)
        register_param(layer, "scales", scales, dict(input_dim=group_input_dim, output_dim=1), extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if is_float_layer(layer):
            return
        # Everything is computed and checked first; the layer changes only at the end.
        where = getattr(layer, "prefix", "") or "layer"
        k = layer.qweight.shape[0]
        group = checkpoint_group(self.group_size, k)
        scales = layer.scales.data
        if not torch.isfinite(scales).all():
            bad = (~torch.isfinite(scales)).nonzero()[0].tolist()
            raise ValueError(
                f"{where}: tensor 'scales' holds NaN or Inf (first at [group, out] = {bad}); the checkpoint "
                f"is corrupt or was not saved from a finished AWQ run"
            )
        check_dequantized_range(where, scales, 15, getattr(layer, "params_dtype", scales.dtype))
        codes = unpack_awq(layer.qweight.data).t()  # (N, K)
        zeros = unpack_awq(layer.qzeros.data).t()  # (N, K // g)
        runtime_size = runtime_group(self.group_size)
        if not self.zero_point:
            if not bool((zeros == SYMMETRIC_ZERO).all()):
                raise ValueError(
                    f"{where}: quantization_config has zero_point=false (symmetric), but tensor 'qzeros' holds "
                    f"zero points other than {SYMMETRIC_ZERO}; set zero_point=true for this checkpoint"
                )
            runtime_zeros = None
        else:
            runtime_zeros = expand_groups(zeros.to(scales.dtype), group, runtime_size, k)
        replace_parameters(
            layer,
            ("qweight", "qzeros", "scales"),
            {
                "qweight": pack_int4(codes),
                "scales": expand_groups(scales.t(), group, runtime_size, k),
                "zeros": runtime_zeros,
            },
        )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if is_float_layer(layer):
            return layer.left_float.apply(layer, x, bias)
        return torch.ops.pymllm_fx.w4a16_linear(
            x, layer.qweight, layer.scales, layer.zeros, runtime_group(self.group_size), bias
        )

    def experts_method(self) -> "AWQMoEMethod":
        return AWQMoEMethod(self)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        group = checkpoint_group(self.group_size, layer.input_size_per_partition)
        return read_int4(layer, where, group, runtime_group(self.group_size), self.group_size == -1)

    def describe(self, layer: torch.nn.Module) -> str:
        if is_float_layer(layer):
            return layer.left_float.describe(layer)
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"AWQ W4A16 {group} {'asym' if self.zero_point else 'sym'}"

    @classmethod
    def from_config(cls, config: dict) -> "AWQLinearMethod":
        """From an HF ``quantization_config`` (``bits``, ``group_size``) or AutoAWQ's ``quant_config.json``
        (``w_bit``, ``q_group_size``) dict."""
        check_producer_keys(cls.name, config, READ_KEYS, AWQ_KEYS)
        family = config_str(cls.name, config, "method", "awq")
        if family.lower() != "awq":
            raise ValueError(f"awq: quantization_config says quant_method 'awq' but method {family!r}")
        backend = config_str(cls.name, config, "backend", None)
        if backend is not None and backend.lower() == "llm-awq":
            raise NotImplementedError(
                "awq: backend 'llm-awq' stores the original llm-awq layout (int16 words, another order); "
                "only AutoAWQ's GEMM layout loads"
            )
        if config_bool(cls.name, config, "desc_act", False):
            raise ValueError("awq: desc_act=true does not apply to AWQ checkpoints (they have no g_idx); remove it")
        bits = _one_of(config, ("bits", "w_bit"), 4)
        group_size = _one_of(config, ("group_size", "q_group_size"), 128)
        version = _one_of(config, ("version", "format", "checkpoint_format"), "gemm")
        return cls(
            bits=config_int(cls.name, {"bits": bits}, "bits", 4),
            group_size=config_int(cls.name, {"group_size": group_size}, "group_size", 128),
            zero_point=config_bool(cls.name, config, "zero_point", True),
            version=config_str(cls.name, {"version": version}, "version", "gemm"),
            modules_to_not_convert=config_names(cls.name, config, "modules_to_not_convert"),
        )

    # --- writing (the checkpoint-writer extension of quantize_base.py) ---
    # AutoAWQ GEMM, as ``awq/modules/linear/gemm.py`` packs it and ``to_transformers_dict`` configures
    # it: 4-bit, one group_size dividing every layer's inputs, no act-order. ``zero_point`` is always
    # true: AutoAWQ's GEMM layout always carries ``qzeros`` (its symmetric mode cannot even be packed),
    # so symmetric layers are written with zero points 8, which is exact.

    @classmethod
    def checkpoint_config(cls, sites: List[Site], floats: List[str]) -> dict:
        """AutoAWQ's ``quantization_config``; refuses what AutoAWQ GEMM cannot hold exactly."""
        fmt = cls.name
        for site in sites:
            q = site.q
            if q.kind != "int4":
                fix = {"int8": "use format='gptq' (8-bit per-channel) or 'compressed-tensors'",
                       "w8a8": "use format='compressed-tensors'"}.get(q.kind, "use format='compressed-tensors' or 'fp8'")
                raise refuse(site, fmt, "AutoAWQ GEMM checkpoints hold 4-bit weights only", fix)
            if q.g_idx is not None:
                raise refuse(site, fmt, "AWQ has no g_idx to record the act-order input permutation", "use format='gptq'")
            if site.k % site.group:
                raise refuse(site, fmt, f"in_features={site.k} is not a multiple of group_size {site.group} (a tail "
                             f"group), which AutoAWQ requires", "use format='gptq' or 'compressed-tensors'")
            if site.n % 8:
                raise refuse(site, fmt, f"out_features={site.n} is not a multiple of 8 (qzeros packs 8 outputs "
                             f"per int32)", "use format='compressed-tensors'")
        group = one_value(sites, lambda s: s.q.group_size, fmt, "group_size",
                          "use format='compressed-tensors', which has one config group per scheme")
        for skipped in floats:  # transformers and vLLM match modules_to_not_convert as substrings
            hit = next((s.name for s in sites if skipped in s.name), None)
            if hit is not None:
                raise ValueError(
                    f"{skipped}: cannot write 'awq': this float layer must be listed in modules_to_not_convert, "
                    f"which loaders match as a substring, and it would also leave the quantized {hit} in float; "
                    f"use format='compressed-tensors'"
                )
        return {
            "quant_method": "awq", "zero_point": True, "group_size": -1 if group is None else group, "bits": 4,
            "version": "gemm", "modules_to_not_convert": list(floats) or None,
        }

    @staticmethod
    def checkpoint_tensors(site: Site, config: dict) -> Dict[str, torch.Tensor]:
        """``qweight`` (K, N/8) and ``qzeros`` (K/g, N/8) packed along N in AWQ_ORDER, ``scales`` (K/g, N)."""
        q = site.q
        zeros = q.zeros if q.zeros is not None else torch.full_like(q.scales, SYMMETRIC_ZERO, dtype=torch.int32)

        def awq_pack(values: torch.Tensor) -> torch.Tensor:  # (R, C) -> (R, C/8), nibble i = column AWQ_ORDER[i]
            rows, cols = values.shape
            return pack_words(values.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)].reshape(rows, cols), 4)

        return {"qweight": awq_pack(q.weight.t()), "qzeros": awq_pack(zeros.t()), "scales": q.scales.t()}


@dataclass
class AWQMoEMethod(CheckpointMoEMethod):
    """Experts of an AutoAWQ GEMM checkpoint (each expert's ``w1``/``w3``/``w2`` or
    ``gate_proj``/``up_proj``/``down_proj`` a ``WQLinear_GEMM``: ``qweight`` (K, N/8) and
    ``qzeros`` (K/g, N/8) in AWQ's nibble order, ``scales`` (K/g, N)), stacked as stored and
    repacked into the int4 experts layout after loading."""

    linear: AWQLinearMethod

    name = "awq"

    @property
    def group_size(self) -> int:
        return self.linear.group_size

    def left_float(self, where: str):
        name = next((name for name in self.linear.modules_to_not_convert if name in where), None)
        return None if name is None else f"modules_to_not_convert {name!r}"

    def projection(self, where, which, k, n, part, params_dtype):
        group = checkpoint_group(self.linear.group_size, k)
        if k % group or k % PACK_FACTOR or part % PACK_FACTOR:
            raise ValueError(
                f"{where}: awq packs {PACK_FACTOR} outputs per int32 and needs whole groups of {group} inputs, but "
                f"{which} is [out={part} per projection, in={k}]; load the float model and call quantize(model, 'int8')")
        packed = dict(output_dim=1, packed_dim=1, packed_factor=PACK_FACTOR)
        return {
            "qweight": ((k, n // PACK_FACTOR), torch.int32, packed),
            "qzeros": ((k // group, n // PACK_FACTOR), torch.int32, packed),
            "scales": ((k // group, n), params_dtype, dict(output_dim=1)),
        }

    def runtime(self, where, which, stacks, params_dtype):
        qweight, qzeros, scales = stacks["qweight"], stacks["qzeros"], stacks["scales"]
        experts, k, words = qweight.shape
        n, groups = words * PACK_FACTOR, qzeros.shape[1]
        if not torch.isfinite(scales).all():
            raise ValueError(f"{where}: tensor '{which}_scales' holds NaN or Inf; the checkpoint is corrupt")
        check_dequantized_range(where, scales, 15, params_dtype)
        codes = unpack_awq(qweight.reshape(experts * k, words)).view(experts, k, n).transpose(1, 2)  # (E, N, K)
        zeros = unpack_awq(qzeros.reshape(experts * groups, words)).view(experts, groups, n).transpose(1, 2)
        if not self.linear.zero_point and not bool((zeros == SYMMETRIC_ZERO).all()):
            raise ValueError(f"{where}: quantization_config has zero_point=false (symmetric), but {which} qzeros hold "
                             f"zero points other than {SYMMETRIC_ZERO}; set zero_point=true for this checkpoint")
        return {
            which + "_qweight": pack_words(codes.reshape(experts * n, k), 4).view(experts, n, k // PACK_FACTOR),
            which + "_scales": scales.transpose(1, 2).contiguous(),
            which + "_zeros": zeros.to(scales.dtype).contiguous() if self.linear.zero_point else None,
        }

    def describe(self, layer: torch.nn.Module) -> str:
        group = "per-channel" if self.linear.group_size == -1 else f"g{self.linear.group_size}"
        return f"AWQ W4A16 {group} {'asym' if self.linear.zero_point else 'sym'}, {layer.num_experts} experts"


def _one_of(config: dict, keys: Tuple[str, ...], default: Any) -> Any:
    """The value under any of synonymous keys; refuses them when they disagree."""
    found = {key: config[key] for key in keys if config.get(key) is not None}
    normalized = {str(value).lower() if isinstance(value, str) else repr(value) for value in found.values()}
    if len(normalized) > 1:
        raise ValueError(f"awq: quantization_config has conflicting {' and '.join(f'{k}={v!r}' for k, v in found.items())}")
    return next(iter(found.values()), default)
