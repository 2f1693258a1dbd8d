"""``"gptq"``: load GPTQ checkpoints (AutoGPTQ / GPTQModel; 4- or 8-bit) into W4A16 or W8A16.

Checkpoint layout (K = in features, N = out features, b = bits, f = 32 // b values per int32,
G = ceil(K / group_size) groups, or 1 when ``group_size`` is -1):

- ``qweight`` int32 ``(K // f, N)``: packed along K, low bits first: bits ``b*j .. b*j+b-1`` of
  word ``[r, n]`` are the code of input feature ``f*r + j`` for output feature n.
- ``qzeros`` int32 ``(G, N // f)``: packed along N the same way (value j of word c is column
  ``f*c + j``). ``checkpoint_format`` "gptq" (v1) stores every zero point minus one, and the
  subtraction was applied to the whole packed word (GPTQModel subtracts 0x11111111 for 4 bits,
  0x01010101 for 8); "gptq_v2" stores the zero points as they are.
- ``scales`` ``(G, N)``; ``g_idx`` int32 ``(K,)``: the group of each input feature.
- The weight is ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]``.

With act-order (``desc_act``) ``g_idx`` is not sorted: the W4A16 kernel needs each group's inputs
side by side, so at load the K dimension is permuted to sort ``g_idx`` (``perm``, kept as a
buffer) and ``apply`` permutes the activations the same way: ``x[..., perm] @ W[:, perm].T`` is
``x @ W.T``. 4-bit runs ``torch.ops.pymllm_fx.w4a16_linear``; 8-bit symmetric with one group per
row runs ``torch.ops.pymllm_fx.w8a16_linear`` (codes ``q - 128``, one scale per output row).

Merged and tensor-parallel layers: column-parallel ranks slice N of every tensor; each logical
weight of a merged layer brings its own ``g_idx``, and they must be equal (they share the input).
Row-parallel ranks take whole groups of K, so ``in_features / tp_size`` must be a multiple of
``group_size`` (refused at ``create_weights`` otherwise). Act-order with the inputs split is
refused too: its permutation spans the whole K, so each rank's contiguous slice holds part of every
group in unequal numbers, which equal W4A16 groups cannot express exactly. ``static_groups``
checkpoints keep ``g_idx`` sorted and split fine.
"""

from __future__ import annotations

from dataclasses import dataclass
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from pymllm_fx.kernels.w4a16 import SYMMETRIC_ZERO, num_groups, pack_int4, pack_words
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import CheckpointMoEMethod
from pymllm_fx.layers.parameter import (
    default_weight_loader,
    rank_share,
    register_param,
    replace_parameters,
    unaligned_output,
)
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.loading.formats import Site, one_value, refuse
from pymllm_fx.methods.common import (
    check_dequantized_range,
    config_bool,
    config_int,
    config_pattern,
    config_str,
    checkpoint_group,
    expand_groups,
    is_float_layer,
    leave_float,
    read_int4,
    runtime_group,
    supported_group_size,
)
from pymllm_fx.methods.config_keys import GPTQ_KEYS, check_producer_keys

FORMATS = ("gptq", "gptq_v2")
# Added to each packed qzeros word of a "gptq" (v1) checkpoint: one per packed value, carries
# included, which exactly undoes GPTQModel's v2 -> v1 subtraction.
V1_ZERO_OFFSET = {4: 0x11111111, 8: 0x01010101}
# The keys read here; the rest of what GPTQ tools write is listed in config_keys.GPTQ_KEYS.
READ_KEYS = (
    "bits", "group_size", "sym", "desc_act", "static_groups", "checkpoint_format", "format", "method",
    "pack_dtype", "dynamic", "is_marlin_format", "lm_head",
)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``(R, C)`` packed along R -> int32 codes ``(R * 32 // bits, C)``, low bits first."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    values = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # (R, f, C)
    return values.reshape(packed.shape[0] * per_word, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``(R, C)`` packed along C -> int32 codes ``(R, C * 32 // bits)``, low bits first."""
    return unpack_rows(packed.t(), bits).t()


@dataclass
class GPTQLinearMethod(LinearMethodBase):
    """GPTQ 4-bit (W4A16) or 8-bit per-channel symmetric (W8A16) weights; activations stay float."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    # With act-order, static groups keep g_idx sorted (groups are fixed in the original input order),
    # which is what lets such a layer split its inputs across tensor-parallel ranks.
    static_groups: bool = False
    # GPTQModel "dynamic" skip rules ("-:<regex>"): module paths the checkpoint left in float.
    skip_patterns: Tuple[str, ...] = ()

    name = "gptq"
    # Loads an already-quantized checkpoint: there is no float weight to calibrate from, so
    # quantize() needs weights=<checkpoint path>.
    prequantized = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"gptq: bits={self.bits} is not supported; use a 4-bit or 8-bit GPTQ checkpoint")
        if not supported_group_size(self.group_size):
            raise ValueError(
                f"gptq: group_size {self.group_size} is not supported; use 32, 64, a multiple of 128, or -1 "
                f"(one group per output row)"
            )
        self.checkpoint_format = str(self.checkpoint_format).lower()
        if self.checkpoint_format not in FORMATS:
            raise ValueError(
                f"gptq: checkpoint_format {self.checkpoint_format!r} is not supported; use one of {FORMATS} "
                f"(other GPTQ formats, such as marlin, repack the weights differently)"
            )

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

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
        if any(re.match(pattern, getattr(layer, "prefix", "")) for pattern in self.skip_patterns):
            leave_float(layer, "a GPTQ dynamic skip rule", input_size_per_partition, output_partition_sizes,
                        input_size, output_size, params_dtype, **extra_weight_attrs)
            return
        where = getattr(layer, "prefix", "") or "layer"
        k, n, f = input_size_per_partition, sum(output_partition_sizes), self.pack_factor
        groups = num_groups(k, checkpoint_group(self.group_size, k))
        in_split = input_size != input_size_per_partition
        out_split = n != output_size or len(output_partition_sizes) > 1
        fix = "use a smaller tensor-parallel size or skip this layer" if in_split or out_split else "skip this layer"
        if self.bits == 8 and groups > 1:
            raise NotImplementedError(
                f"{where}: 8-bit grouped GPTQ (group_size={self.group_size}, {groups} groups over {k} inputs) is "
                f"not supported yet; only 8-bit with one group per output row (group_size=-1) runs, as W8A16. "
                f"Skip this layer or use a 4-bit checkpoint"
            )
        if self.bits == 8 and not self.sym:
            raise NotImplementedError(
                f"{where}: 8-bit asymmetric GPTQ (sym=false) is not supported yet: the W8A16 kernel has no zero "
                f"points. Skip this layer or use a symmetric or 4-bit checkpoint"
            )
        if k % f:
            raise ValueError(
                f"{where}: gptq {self.bits}-bit packs {f} input features per int32, but "
                f"{rank_share(layer, 'in_features', k, in_split)} is not a multiple of {f}; {fix}"
            )
        unaligned = unaligned_output(output_partition_sizes, f)
        if unaligned:
            raise ValueError(
                f"{where}: gptq {self.bits}-bit packs {f} zero points per int32 along the outputs (qzeros), but "
                f"{rank_share(layer, *unaligned, out_split)} is not a multiple of {f}; {fix}"
            )
        if in_split and self.group_size != -1 and k % self.group_size:
            raise ValueError(
                f"{where}: row-parallel gptq gives each rank whole groups of scales and zeros, but "
                f"{rank_share(layer, 'in_features', k, True)} is not a multiple of group_size={self.group_size}; "
                f"use a tensor-parallel size that divides in_features={input_size} into multiples of "
                f"{self.group_size}, or skip this layer"
            )
        if in_split and self.desc_act and self.group_size != -1 and not self.static_groups:
            # Act-order numbers the groups in a permutation of the whole K: this rank's contiguous slice
            # of inputs holds a few members of nearly every group, in runs of unequal length, and the
            # W4A16 layout (each rank's inputs sorted into equal groups) cannot hold that exactly.
            raise NotImplementedError(
                f"{where}: act-order GPTQ (desc_act=true, group_size={self.group_size}) cannot be split along "
                f"its inputs (row-parallel, tp_size={getattr(layer, 'tp_size', '?')}): its g_idx permutes all "
                f"{input_size} inputs, so each rank's slice of {k} inputs mixes members of every group in "
                f"unequal numbers, which the W4A16 kernel's equal contiguous groups cannot express. Keep this "
                f"layer unsplit (tp_size=1 / replicated), or use a checkpoint made with desc_act=false or "
                f"static_groups=true"
            )
        # One group per row is the same on every tensor-parallel rank: no input_dim to split along.
        group_input_dim = None if self.group_size == -1 else 0

        def register(name: str, data: torch.Tensor, attrs: dict) -> None:
            register_param(layer, name, data, attrs, extra_weight_attrs)

        register("qweight", torch.empty(k // f, n, dtype=torch.int32),
                 dict(input_dim=0, output_dim=1, packed_dim=0, packed_factor=f))
        register("qzeros", torch.empty(groups, n // f, dtype=torch.int32),
                 dict(input_dim=group_input_dim, output_dim=1, packed_dim=1, packed_factor=f))
        register("scales", torch.empty(groups, n, dtype=params_dtype), dict(input_dim=group_input_dim, output_dim=1))
        # -1: not loaded yet (a real group index is >= 0).
        loader = _g_idx_loader(where, extra_weight_attrs.get("weight_loader", default_weight_loader))
        register("g_idx", torch.full((k,), -1, dtype=torch.int32), dict(input_dim=0, weight_loader=loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if is_float_layer(layer):
            return
        # Everything is computed and checked first; the layer changes only at the end.
        where = getattr(layer, "prefix", "") or "layer"
        bits, scales = self.bits, layer.scales.data
        k = layer.g_idx.shape[0]
        group = checkpoint_group(self.group_size, k)
        stored_groups = scales.shape[0]
        if not torch.isfinite(scales).all():
            bad = (~torch.isfinite(scales)).nonzero()[0].tolist()
            raise ValueError(
                f"{where}: tensor 'scales' holds NaN or Inf (first at [group, out] = {bad}); the checkpoint "
                f"is corrupt or was not saved from a finished GPTQ run"
            )
        check_dequantized_range(where, scales, (1 << bits) - 1, getattr(layer, "params_dtype", scales.dtype))

        # g_idx: which group each input feature belongs to. On a tensor-parallel rank it counts groups
        # of the whole layer, so this rank's first group is subtracted.
        g_idx = layer.g_idx.data.long()
        split_note = ""
        if self.group_size != -1 and input_is_split(layer):
            first = layer.tp_rank * stored_groups
            g_idx = g_idx - first
            split_note = (
                f" (tensor-parallel rank {layer.tp_rank} of {layer.tp_size} holds the layer's groups [{first}, "
                f"{first + stored_groups}); an act-order g_idx reaches outside them and cannot be split along "
                f"the inputs: keep this layer unsplit)"
            )
        if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= stored_groups):
            raise ValueError(
                f"{where}: tensor 'g_idx' has group indices in [{int(g_idx.min())}, {int(g_idx.max())}] but the "
                f"layer has {stored_groups} groups (valid range [0, {stored_groups})){split_note}; the checkpoint's "
                f"g_idx does not match its scales, or group_size={self.group_size} is not the one it was made with"
            )
        perm = torch.sort(g_idx, stable=True).indices
        expected = torch.arange(k, device=g_idx.device) // group
        if not torch.equal(g_idx[perm], expected):
            raise ValueError(
                f"{where}: tensor 'g_idx' does not split the {k} inputs into groups of {group} (group sizes "
                f"{torch.bincount(g_idx, minlength=stored_groups).tolist()[:8]}...){split_note}; the W4A16 layout "
                f"needs equal groups: check group_size={self.group_size} against the checkpoint"
            )
        if torch.equal(perm, torch.arange(k, device=perm.device)):
            perm = None  # groups already in order (no act-order, or static groups)
        else:
            perm = perm.to(torch.int32)

        codes = unpack_rows(layer.qweight.data, bits)  # (K, N)
        qzeros = layer.qzeros.data
        if self.checkpoint_format == "gptq":
            words = (qzeros.long() + V1_ZERO_OFFSET[bits]) & 0xFFFFFFFF
            qzeros = (words - ((words >> 31) << 32)).to(torch.int32)
        zeros = unpack_cols(qzeros, bits).t()  # (N, G)
        if perm is not None:
            codes = codes.index_select(0, perm)
        codes = codes.t()  # (N, K) in runtime (sorted-group) order

        mid = 1 << (bits - 1)  # the symmetric zero point: 8 for 4 bits, 128 for 8 bits
        if self.sym and not bool((zeros == mid).all()):
            other = "gptq_v2" if self.checkpoint_format == "gptq" else "gptq"
            raise ValueError(
                f"{where}: quantization_config has sym=true, but tensor 'qzeros' decodes (as "
                f"checkpoint_format={self.checkpoint_format!r}) to zero points other than {mid}; the checkpoint "
                f"is probably checkpoint_format={other!r}, or sym should be false"
            )
        if bits == 8:
            runtime = {
                "qweight": (codes - mid).to(torch.int8).contiguous(),
                "scales": scales[0].contiguous(),
            }
        else:
            runtime_size = runtime_group(self.group_size)
            runtime = {
                "qweight": pack_int4(codes),
                "scales": expand_groups(scales.t(), group, runtime_size, k),
                "zeros": None if self.sym else expand_groups(zeros.to(scales.dtype), group, runtime_size, k),
            }
        replace_parameters(layer, ("qweight", "qzeros", "scales", "g_idx"), runtime)
        layer.register_buffer("perm", perm)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if is_float_layer(layer):
            return layer.left_float.apply(layer, x, bias)
        if layer.perm is not None:
            x = x.index_select(-1, layer.perm)
        if self.bits == 8:
            return torch.ops.pymllm_fx.w8a16_linear(x, layer.qweight, layer.scales, bias)
        return torch.ops.pymllm_fx.w4a16_linear(
            x, layer.qweight, layer.scales, layer.zeros, runtime_group(self.group_size), bias
        )

    def experts_method(self) -> "GPTQMoEMethod":
        return GPTQMoEMethod(self)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        if self.bits == 8:
            return Quantized("int8", layer.qweight.data, layer.scales.data)
        group = checkpoint_group(self.group_size, layer.input_size_per_partition)
        return read_int4(layer, where, group, runtime_group(self.group_size), self.group_size == -1, layer.perm)

    def describe(self, layer: torch.nn.Module) -> str:
        if is_float_layer(layer):
            return layer.left_float.describe(layer)
        if self.bits == 8:
            return "GPTQ W8A16 per-channel sym"
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        text = f"GPTQ W4A16 {group} {'sym' if self.sym else 'asym'}"
        return text + (" act-order" if getattr(layer, "perm", None) is not None else "")

    @classmethod
    def from_config(cls, config: dict) -> "GPTQLinearMethod":
        """From an HF ``quantization_config`` or AutoGPTQ / GPTQModel ``quantize_config.json`` dict."""
        check_producer_keys(cls.name, config, READ_KEYS, GPTQ_KEYS)
        family = config_str(cls.name, config, "method", "gptq")
        if family.lower() != "gptq":
            raise ValueError(
                f"gptq: quantization_config says quant_method 'gptq' but method {family!r}; the checkpoint is "
                f"not a GPTQ one (GPTQModel writes both, equal)"
            )
        config_bool(cls.name, config, "lm_head", False)  # a quantized lm_head is read from its tensors
        if config_bool(cls.name, config, "is_marlin_format", False):
            raise ValueError("gptq: is_marlin_format=true checkpoints use the Marlin layout, which is not supported")
        if config_str(cls.name, config, "pack_dtype", "int32") not in ("int32", "torch.int32"):
            raise ValueError(f"gptq: pack_dtype {config['pack_dtype']!r} is not supported; only int32-packed checkpoints load")
        dynamic = config.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ValueError(f"gptq: quantization_config['dynamic'] must be an object of module patterns, found {dynamic!r}")
        for key in dynamic:
            config_pattern(cls.name, "quantization_config['dynamic']", key[2:] if key.startswith(("-:", "+:")) else key)
        overrides = [key for key in dynamic if not str(key).startswith("-:")]
        if overrides:
            raise ValueError(
                f"gptq: per-module 'dynamic' overrides {overrides[:3]} are not supported yet (only '-:' rules, "
                f"which leave a module unquantized)"
            )
        formats = {config_str(cls.name, config, key, None).lower() for key in ("checkpoint_format", "format")
                   if config.get(key) is not None}
        if len(formats) > 1:
            raise ValueError(f"gptq: quantization_config has conflicting checkpoint_format and format: {sorted(formats)}")
        return cls(
            bits=config_int(cls.name, config, "bits", 4),
            group_size=config_int(cls.name, config, "group_size", 128),
            sym=config_bool(cls.name, config, "sym", True),
            desc_act=config_bool(cls.name, config, "desc_act", False),
            checkpoint_format=next(iter(formats), "gptq"),
            static_groups=config_bool(cls.name, config, "static_groups", False),
            skip_patterns=tuple(str(key)[2:] for key in dynamic),
        )

    # --- writing (the checkpoint-writer extension of quantize_base.py) ---
    # GPTQModel / AutoGPTQ (``nn_modules/qlinear/__init__.py`` ``pack``, ``quantization/config.py``
    # ``to_dict``): 4-bit (any group size, tail groups, act-order via ``g_idx``) or 8-bit per-channel
    # symmetric (``int8`` layers), not both in one model. ``checkpoint_format`` is "gptq" (v1, zero
    # points stored minus one) when every layer is symmetric, else "gptq_v2" (zero points as they are):
    # a v1 zero point 0 wraps below zero, which per-value readers (vLLM) decode wrongly, and GPTQModel
    # refuses v1 asymmetric checkpoints it did not write. Skipped linears other than ``lm_head`` are
    # listed as GPTQModel ``dynamic`` "-:" (skip) rules.

    @classmethod
    def checkpoint_config(cls, sites: List[Site], floats: List[str]) -> dict:
        """GPTQModel's ``quantization_config``; refuses what GPTQ cannot hold exactly."""
        fmt = cls.name
        for site in sites:
            if site.q.kind == "fp8":
                raise refuse(site, fmt, "GPTQ holds integer weights", "use format='compressed-tensors' or 'fp8'")
            if site.q.kind == "w8a8":
                raise refuse(site, fmt, "GPTQ holds weight-only layers and would drop the int8 activations",
                             "use format='compressed-tensors'")
            if site.expert and site.q.kind != "int4":
                raise refuse(site, fmt, "GPTQ experts load back only as 4-bit", "use format='compressed-tensors'")
        bits = one_value(sites, lambda s: 8 if s.q.kind == "int8" else 4, fmt, "bit width",
                         "use format='compressed-tensors', which has one config group per scheme") or 4
        f = 32 // bits
        for site in sites:
            if site.k % f or site.n % f:
                raise refuse(site, fmt, f"{bits}-bit GPTQ packs {f} values per int32 along both the inputs "
                             f"and the outputs, but the layer is [out={site.n}, in={site.k}]", "use format='compressed-tensors'")
        if bits == 8:
            group, sym = -1, True
        else:
            group = one_value(sites, lambda s: s.q.group_size, fmt, "group_size",
                              "use format='compressed-tensors', which has one config group per scheme")
            sym = all(site.q.zeros is None for site in sites)
        config = {
            "quant_method": "gptq", "bits": bits, "group_size": -1 if group is None else group,
            "desc_act": any(site.q.g_idx is not None for site in sites), "sym": sym,
            "lm_head": any(_is_lm_head(site.name) for site in sites),
            "checkpoint_format": "gptq" if sym else "gptq_v2", "pack_dtype": "int32",
        }
        # GPTQ quantizes every linear but lm_head: the others left in float are GPTQModel / vLLM skip rules.
        skip = {f"-:^{re.escape(name)}$": {} for name in floats if not _is_lm_head(name)}
        if skip:
            config["dynamic"] = skip
        return config

    @staticmethod
    def checkpoint_tensors(site: Site, config: dict) -> Dict[str, torch.Tensor]:
        """``qweight`` (K/f, N) packed along K, ``qzeros`` (G, N/f) along N, ``scales`` (G, N), ``g_idx``
        (K,); f = 32 / bits."""
        q, k, bits = site.q, site.k, config["bits"]
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
        if config["checkpoint_format"] == "gptq":
            zeros = zeros - 1  # every zero point is at least 1 here (symmetric), so no word borrows
        return {
            "qweight": pack_words(codes, bits).t(),
            "qzeros": pack_words(zeros.t(), bits),
            "scales": scales.t(),
            "g_idx": g_idx,
        }


def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def _g_idx_loader(where: str, layer_loader):
    """``g_idx`` runs along the input, which the logical weights of a merged layer share: each shard's
    copy (``q_proj.g_idx``, ``k_proj.g_idx``, ...) loads whole and must equal the ones before it."""

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
        before = param.data.clone()
        layer_loader(param, loaded)  # no shard id: row-parallel layers narrow it to this rank's inputs
        if shard_id is not None and bool((before >= 0).all()) and not torch.equal(before, param.data):
            param.data.copy_(before)
            raise ValueError(
                f"{where}: tensor 'g_idx' of shard {shard_id!r} differs from the g_idx of a shard loaded "
                f"before it; the fused layer has one input order, so its weights must share one act-order "
                f"(they were quantized with different orders). Load them as separate, unfused layers"
            )

    return load


def input_is_split(layer: torch.nn.Module) -> bool:
    """Whether this layer holds one tensor-parallel slice of the inputs (a RowParallelLinear, tp > 1)."""
    return getattr(layer, "input_size", None) != getattr(layer, "input_size_per_partition", None)


@dataclass
class GPTQMoEMethod(CheckpointMoEMethod):
    """Experts of a 4-bit GPTQ checkpoint (each expert's ``w1``/``w3``/``w2`` or
    ``gate_proj``/``up_proj``/``down_proj`` stored as a GPTQ linear), stacked as stored and
    turned into the int4 experts layout after loading."""

    linear: GPTQLinearMethod

    name = "gptq"

    @property
    def group_size(self) -> int:
        return self.linear.group_size

    def projection(self, where, which, k, n, part, params_dtype):
        cfg = self.linear
        if cfg.bits != 4 or cfg.desc_act:
            raise NotImplementedError(
                f"{where}: GPTQ experts load only as 4-bit, without act-order (this checkpoint: bits={cfg.bits}, "
                f"desc_act={cfg.desc_act}); load the float model and call quantize(model, 'int4') instead")
        if k % 8 or part % 8:
            raise ValueError(f"{where}: gptq packs 8 values per int32 along inputs and outputs, but {which} is "
                             f"[out={part} per projection, in={k}]; load the float model and call quantize(model, 'int8')")
        groups = num_groups(k, checkpoint_group(cfg.group_size, k))
        return {
            "qweight": ((k // 8, n), torch.int32, dict(output_dim=1, packed_dim=0, packed_factor=8)),
            "qzeros": ((groups, n // 8), torch.int32, dict(output_dim=1, packed_dim=1, packed_factor=8)),
            "scales": ((groups, n), params_dtype, dict(output_dim=1)),
            "g_idx": ((k,), torch.int32, {}),  # no output dim: each projection's copy fills the expert's slot
        }

    def runtime(self, where, which, stacks, params_dtype):
        cfg = self.linear
        qweight, scales, g_idx = stacks["qweight"], stacks["scales"], stacks["g_idx"]
        k = qweight.shape[1] * 8
        group = checkpoint_group(cfg.group_size, k)
        if not torch.equal(g_idx.long(), (torch.arange(k, device=g_idx.device) // group).expand_as(g_idx)):
            raise ValueError(f"{where}: a {which} g_idx does not number the {k} inputs in groups of {group}; "
                             f"check group_size={cfg.group_size} against the checkpoint")
        if not torch.isfinite(scales).all():
            raise ValueError(f"{where}: tensor '{which}_scales' holds NaN or Inf; the checkpoint is corrupt")
        check_dequantized_range(where, scales, 15, params_dtype)
        qzeros = stacks["qzeros"]
        if cfg.checkpoint_format == "gptq":
            words = (qzeros.long() + V1_ZERO_OFFSET[4]) & 0xFFFFFFFF
            qzeros = (words - ((words >> 31) << 32)).to(torch.int32)
        zeros = torch.stack([unpack_cols(z, 4) for z in qzeros])  # (E, G, N)
        if cfg.sym and not bool((zeros == 8).all()):
            raise ValueError(f"{where}: sym=true, but {which} qzeros decode to zero points other than 8 (as "
                             f"checkpoint_format={cfg.checkpoint_format!r})")
        return {
            which + "_qweight": qweight.transpose(1, 2).contiguous(),  # (E, N, K/8): packed along K
            which + "_scales": scales.transpose(1, 2).contiguous(),
            which + "_zeros": None if cfg.sym else zeros.transpose(1, 2).to(scales.dtype).contiguous(),
        }

    def describe(self, layer: torch.nn.Module) -> str:
        group = "per-channel" if self.linear.group_size == -1 else f"g{self.linear.group_size}"
        return f"GPTQ W4A16 {group} {'sym' if self.linear.sym else 'asym'}, {layer.num_experts} experts"
