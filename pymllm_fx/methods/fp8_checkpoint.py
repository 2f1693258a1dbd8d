"""Load serialized FP8 checkpoints: e4m3 weights with the checkpoint's own scales.

Reads what vLLM's ``fp8`` method (``quantization_config`` ``{"quant_method": "fp8",
"activation_scheme": "dynamic" | "static"}``) and compressed-tensors' ``float-quantized`` format
store for each linear layer (N = out features, K = in features):

- ``weight`` float8_e4m3fn ``(N, K)``.
- ``weight_scale`` float: one scale per logical weight (``()`` or ``(1,)``; a merged q/k/v layer
  gets one per shard), or one per output row (``(N, 1)``, compressed-tensors ``channel``).
  The weight is ``weight * weight_scale``.
- ``input_scale`` float ``()`` or ``(1,)``, static scheme only: activations are quantized with
  this fixed scale, ``e4m3(clamp(x / input_scale))``, instead of one computed per token.

``process_weights_after_loading`` expands a per-tensor weight scale to one per output row, which
is exact (the e4m3 values do not change), so the layer runs ``torch.ops.pymllm_fx.fp8_linear``
(per-token dynamic activations). Activations quantized per tensor (static, or dynamic per tensor)
have no op yet: they run :func:`fp8_linear_per_tensor_act`, plain torch with the op's reference
numerics (exact in float32; compiles without graph breaks, but on a GPU it dequantizes the
weight on every call).

Block-wise checkpoints (DeepSeek-V3 style, ``weight_block_size`` ``[128, 128]``, dynamic
activations only) store, instead of ``weight_scale``:

- ``weight_scale_inv`` float32 ``(ceil(N/128), ceil(K/128))``, one scale per 128x128 weight block;
  despite the name it multiplies: the weight is ``weight[n, k] * weight_scale_inv[n//128, k//128]``.
  compressed-tensors' ``block`` strategy stores the same tensor as ``weight_scale``.

They run ``torch.ops.pymllm_fx.fp8_block_linear`` (activations quantized per token per group of
128 along K). A scale row covers 128 output rows, so a merged layer's shards and a
tensor-parallel rank's slice must start on a block boundary: ``create_weights`` refuses sizes
that are not multiples of the block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from pymllm_fx.kernels.fp8_block import block_scale_shape, check_block_size
from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE, FP8_MAX
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import CheckpointMoEMethod
from pymllm_fx.layers.parameter import (
    create_float_weight,
    default_weight_loader,
    load_expert,
    register_param,
    replace_parameters,
)
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.loading.formats import Site, one_value, refuse
from pymllm_fx.methods.common import check_finite, config_names, config_str
from pymllm_fx.methods.config_keys import FP8_KEYS, check_producer_keys

_MIN_SCALE = 1e-12  # the op's floor for a dynamic scale (kernels/fp8_w8a8.py)
# Shard ids of merged layers (linear.py): integers for gate/up, letters for q/k/v.
_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}
# Just after a "." or just before one (or the end): where one module name ends.
_MODULE_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def fp8_linear_per_tensor_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x`` quantized to e4m3 with one scale for the whole tensor, then the fp8 product in float32.

    ``input_scale=None`` computes that scale from ``x`` (dynamic per tensor); otherwise it is the
    checkpoint's static scale, and values beyond ``448 * input_scale`` clamp.
    """
    xf = x.float()
    if input_scale is None:
        input_scale = (xf.abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE)
    xq = (xf / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    out = torch.matmul(xq.float(), weight.float().t()) * input_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def per_tensor_scale_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Load one scale (``()`` or ``(1,)``) into entry ``shard_id`` of ``param`` (all entries if None)."""
    if loaded.numel() != 1:
        raise ValueError(f"expected one per-tensor scale (shape () or (1,)), found shape {tuple(loaded.shape)}")
    if not loaded.dtype.is_floating_point:
        raise TypeError(f"expected a float scale, found dtype {loaded.dtype}")
    index = slice(None) if shard_id is None else _SHARD_INDEX.get(shard_id, shard_id)
    with torch.no_grad():
        param.data[index] = loaded.reshape(()).to(param.dtype)


def explain_errors(where: str, loader, hint: str):
    """Wrap a weight loader so that a shape error names the layer and says what the shape means."""

    def load(param: torch.Tensor, loaded: torch.Tensor, *shard_id: Any) -> None:
        try:
            loader(param, loaded, *shard_id)
        except ValueError as err:
            raise ValueError(f"{where}: {err}; {hint}") from None

    return load


def parse_block_size(value: Any) -> Tuple[int, int]:
    """``[rows, cols]`` (HF ``weight_block_size``, compressed-tensors ``block_structure``) or the
    older compressed-tensors string ``"128x128"``, checked as the block op needs it."""
    if isinstance(value, str) and re.fullmatch(r"\d+x\d+", value):
        value = [int(v) for v in value.split("x")]
    return check_block_size("fp8 checkpoint: weight_block_size", value)


def check_fp8_codes(where: str, name: str, weight: torch.Tensor) -> None:
    """e4m3 (float8_e4m3fn) has no infinities; its NaN is every code with all exponent and
    mantissa bits set (0x7F, 0xFF). A weight holding one is refused, naming the first."""
    nan = (weight.view(torch.uint8) & 0x7F) == 0x7F
    if bool(nan.any()):
        raise ValueError(
            f"{where}: tensor {name!r} holds the e4m3 NaN code (first at index {nan.nonzero()[0].tolist()}); "
            f"the checkpoint is corrupt"
        )


def matches_module(path: str, patterns: Sequence[str]) -> Optional[str]:
    """The first pattern that leaves ``path`` unconverted, by transformers' ``modules_to_not_convert`` rule.

    A pattern is a regex matched from the start of the path up to a module boundary (``layers.1``
    names ``layers.1.mlp`` but not ``layers.11.mlp``), or a plain suffix of the path (``lm_head``).
    """
    for pattern in patterns:
        if path.endswith(pattern) or re.match(f"(?:{pattern}){_MODULE_BOUNDARY}", path):
            return pattern
    return None


@dataclass
class Fp8CheckpointLinearMethod(LinearMethodBase):
    """e4m3 weights and scales read from a checkpoint; activations quantized to e4m3 at run time."""

    # "dynamic": a scale per token at run time (the op); "static": the checkpoint's input_scale.
    activation_scheme: str = "dynamic"
    # "token" (dynamic only: the op) or "tensor" (one scale for the whole input); None picks
    # "tensor" for static and "token" for dynamic activations ("group" with block scales).
    activation_strategy: Optional[str] = None
    # "tensor": one weight scale per logical weight; "channel": one per output row; "block" is
    # set from weight_block_size.
    weight_strategy: str = "tensor"
    # (rows, cols) of the weight blocks that share one scale; None: per-tensor or per-channel scales.
    weight_block_size: Optional[Tuple[int, int]] = None
    # The checkpoint's name for the block scales: "weight_scale_inv" (HF/DeepSeek), "weight_scale"
    # (compressed-tensors).
    block_scale_name: str = "weight_scale_inv"
    # Layers the checkpoint left in float (vLLM ignored_layers, transformers modules_to_not_convert).
    ignored_layers: Tuple[str, ...] = ()

    name = "fp8-checkpoint"
    prequantized = True  # loads a checkpoint; quantize() without weights= is refused

    def __post_init__(self) -> None:
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(
                f"fp8 checkpoint: activation_scheme {self.activation_scheme!r} is not 'dynamic' or 'static'"
            )
        self.ignored_layers = tuple(self.ignored_layers or ())
        if self.weight_block_size is not None:
            self._check_block_config()
            return
        if self.activation_strategy is None:
            self.activation_strategy = "tensor" if self.activation_scheme == "static" else "token"
        if self.activation_strategy not in ("token", "tensor"):
            raise ValueError(
                f"fp8 checkpoint: activation_strategy {self.activation_strategy!r} is not 'token' or 'tensor'"
            )
        if self.activation_scheme == "static" and self.activation_strategy != "tensor":
            raise ValueError(
                "fp8 checkpoint: static activation scales are per tensor; use activation_strategy='tensor'"
            )
        if self.weight_strategy not in ("tensor", "channel"):
            raise ValueError(f"fp8 checkpoint: weight_strategy {self.weight_strategy!r} is not 'tensor' or 'channel'")

    def _check_block_config(self) -> None:
        """Block scales pair with per-token-group dynamic activations, the only scheme such
        checkpoints are saved with (vLLM refuses the others too)."""
        self.weight_block_size = parse_block_size(self.weight_block_size)
        block = list(self.weight_block_size)
        if self.activation_scheme != "dynamic":
            raise ValueError(
                f"fp8 checkpoint: block-wise weight scales (weight_block_size={block}) run with dynamic "
                f"activations, one scale per token per {block[1]} input features, but activation_scheme is "
                f"{self.activation_scheme!r}; set activation_scheme 'dynamic' (block-wise checkpoints have no input_scale)"
            )
        if self.activation_strategy not in (None, "group"):
            raise ValueError(
                f"fp8 checkpoint: block-wise weight scales (weight_block_size={block}) quantize activations per "
                f"token group; activation_strategy {self.activation_strategy!r} must be 'group' or None"
            )
        if self.weight_strategy not in ("tensor", "block"):  # "tensor" is the field's default
            raise ValueError(
                f"fp8 checkpoint: weight_block_size={block} means one weight scale per block; "
                f"weight_strategy {self.weight_strategy!r} contradicts it (use 'block')"
            )
        self.activation_strategy, self.weight_strategy = "group", "block"

    @classmethod
    def for_blocks(cls, block_size: Any, scale_name: str = "weight_scale_inv") -> "Fp8CheckpointLinearMethod":
        """Block-wise fp8 layers with dynamic per-token-group activations, e.g. compressed-tensors'
        strategy "block" (its ``block_structure``, ``scale_name="weight_scale"``)."""
        return cls(activation_scheme="dynamic", weight_block_size=block_size, block_scale_name=scale_name)

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
        if matches_module(getattr(layer, "prefix", ""), self.ignored_layers):
            # The checkpoint holds this layer's plain float weight.
            create_float_weight(
                layer, input_size_per_partition, output_partition_sizes, params_dtype, extra_weight_attrs
            )
            return
        n, k = sum(output_partition_sizes), input_size_per_partition
        shards = len(output_partition_sizes)

        def register(name: str, data: torch.Tensor, attrs: dict) -> None:
            register_param(layer, name, data, attrs, extra_weight_attrs)

        per_tensor = {"weight_loader": per_tensor_scale_loader}
        register("weight", torch.empty(n, k, dtype=FP8_DTYPE), {"input_dim": 1, "output_dim": 0})
        if self.weight_strategy == "block":
            self._check_block_shards(layer, k, output_partition_sizes, input_size, output_size)
            self._register_block_scale(layer, n, k, extra_weight_attrs)
            return
        # Scales start as NaN, so an entry no checkpoint tensor filled is caught after loading.
        if self.weight_strategy == "tensor":
            register("weight_scale", torch.full((shards,), float("nan")), per_tensor)
        else:
            register("weight_scale", torch.full((n, 1), float("nan")), {"output_dim": 0})
        if self.activation_scheme == "static":
            register("input_scale", torch.full((shards,), float("nan")), per_tensor)

    def _register_block_scale(self, layer, n: int, k: int, extra_weight_attrs: dict) -> None:
        """The ``(ceil(n/bn), ceil(k/bk))`` block scales, NaN until loaded, with a loader whose
        shape errors say what the shape means."""
        bn, bk = self.weight_block_size
        rows, cols = block_scale_shape(n, k, self.weight_block_size)
        hint = (
            f"{self.block_scale_name!r} holds one scale per {bn}x{bk} weight block, shape "
            f"(ceil(N/{bn}), ceil(K/{bk})) = ({rows}, {cols}) for this layer's ({n}, {k}) weight: the checkpoint's "
            f"weight_block_size differs from the config's, or the tensor is not a block scale"
        )
        loader = extra_weight_attrs.get("weight_loader", default_weight_loader)
        where = getattr(layer, "prefix", "") or "layer"
        # bn output rows share a scale row: as a "packed" dim, the merged-layer loaders turn a
        # shard's row offset and size into block rows (_check_block_shards made them divide).
        attrs = {"output_dim": 0, "input_dim": 1, "packed_dim": 0, "packed_factor": bn}
        attrs["weight_loader"] = explain_errors(where, loader, hint)
        register_param(layer, self.block_scale_name, torch.full((rows, cols), float("nan")), attrs, extra_weight_attrs)

    def _check_block_shards(self, layer, k: int, output_partition_sizes: List[int], input_size: int, output_size: int) -> None:
        """A merged layer's shards and a tensor-parallel slice must start on a block boundary: each
        loads whole rows (or columns) of the block scales. One unsplit layer may end mid-block."""
        where = getattr(layer, "prefix", "") or "layer"
        bn, bk = self.weight_block_size
        if k != input_size and k % bk:
            raise ValueError(
                f"{where}: this tensor-parallel rank holds {k} of the {input_size} input features, which is not a "
                f"multiple of the {bk}-wide weight blocks, so its columns of {self.block_scale_name!r} would cut "
                f"blocks; use a tensor-parallel size that gives every rank a multiple of {bk} input features"
            )
        split = len(output_partition_sizes) > 1 or sum(output_partition_sizes) != output_size
        uneven = [size for size in output_partition_sizes if size % bn]
        if split and uneven:
            raise ValueError(
                f"{where}: output shards {output_partition_sizes} (merged projections such as q/k/v or gate/up, "
                f"or a tensor-parallel slice) must each be a multiple of the {bn}-row weight blocks, found {uneven}, "
                f"so each loads whole rows of {self.block_scale_name!r}; keep these projections as separate "
                f"layers, or use a tensor-parallel size that keeps every slice a multiple of {bn} rows"
            )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.dtype != FP8_DTYPE:
            return  # an ignored layer: its float weight runs as it is
        where = getattr(layer, "prefix", "") or "layer"
        check_fp8_codes(where, "weight", layer.weight.data)
        if self.weight_strategy == "block":
            # The op runs on the checkpoint's layout as loaded; only unfilled or corrupt scales stop it.
            check_finite(where, self.block_scale_name, getattr(layer, self.block_scale_name).data)
            return
        scale = layer.weight_scale.data.float()
        check_finite(where, "weight_scale", scale)
        if self.weight_strategy == "tensor":
            sizes = torch.tensor(layer.output_partition_sizes, device=scale.device)
            per_row = torch.repeat_interleave(scale, sizes)
        else:
            per_row = scale.reshape(-1)
        remove, add = ("weight", "weight_scale"), {"weight": layer.weight.data, "weight_scale": per_row.contiguous()}
        if self.activation_scheme == "static":
            input_scale = layer.input_scale.data.float()
            check_finite(where, "input_scale", input_scale, positive=True)
            # A merged layer's shards see the same input; like vLLM, keep the largest of their scales.
            add["input_scale"] = input_scale.max().reshape(1)
            remove += ("input_scale",)
        replace_parameters(layer, remove, add)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if layer.weight.dtype != FP8_DTYPE:
            return F.linear(x, layer.weight, bias)
        if self.weight_strategy == "block":
            return torch.ops.pymllm_fx.fp8_block_linear(
                x, layer.weight, getattr(layer, self.block_scale_name), list(self.weight_block_size), bias
            )
        if self.activation_scheme == "dynamic" and self.activation_strategy == "token":
            return torch.ops.pymllm_fx.fp8_linear(x, layer.weight, layer.weight_scale, bias)
        input_scale = layer.input_scale if self.activation_scheme == "static" else None
        return fp8_linear_per_tensor_act(x, layer.weight, layer.weight_scale, input_scale, bias)

    def experts_method(self) -> "Fp8CheckpointMoEMethod":
        return Fp8CheckpointMoEMethod(self)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Optional[Quantized]:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        if layer.weight.dtype != FP8_DTYPE:
            return None  # a layer the checkpoint left in float
        if self.weight_strategy == "block":
            return Quantized(
                "fp8", layer.weight.data, getattr(layer, self.block_scale_name).data, activation="group",
                weight_strategy="block", block_size=tuple(self.weight_block_size),
            )
        static = self.activation_scheme == "static"
        return Quantized(
            "fp8", layer.weight.data, layer.weight_scale.data, weight_strategy=self.weight_strategy,
            activation="static" if static else self.activation_strategy,
            input_scale=layer.input_scale.data.reshape(1) if static else None,
        )

    def describe(self, layer: torch.nn.Module) -> str:
        if layer.weight.dtype != FP8_DTYPE:
            return "unquantized (ignored by the checkpoint)"
        if self.weight_strategy == "block":
            bn, bk = self.weight_block_size
            return f"W8A8 e4m3 checkpoint, {bn}x{bk} block weight scales, per-token-group (1x{bk}) dynamic act"
        act = {
            ("dynamic", "token"): "per-token dynamic act",
            ("dynamic", "tensor"): "per-tensor dynamic act",
            ("static", "tensor"): "static per-tensor act",
        }[(self.activation_scheme, self.activation_strategy)]
        return f"W8A8 e4m3 checkpoint, per-{self.weight_strategy} weight scale, {act}"

    @classmethod
    def from_config(cls, config: dict) -> "Fp8CheckpointLinearMethod":
        """From a serialized checkpoint's ``quantization_config`` (``quant_method: "fp8"``)."""
        check_producer_keys(
            cls.name,
            config,
            ("activation_scheme", "weight_block_size", "ignored_layers", "modules_to_not_convert", "fmt", "scale_fmt"),
            FP8_KEYS,
        )
        scale_fmt = config_str(cls.name, config, "scale_fmt", "float")
        if scale_fmt not in ("float", "ue8m0"):  # ue8m0: power-of-two scales, read by the tensors' dtype
            raise NotImplementedError(f"fp8 checkpoint: scale_fmt {scale_fmt!r} is not supported (float, ue8m0)")
        fmt = config_str(cls.name, config, "fmt", "e4m3")
        if fmt != "e4m3":
            raise NotImplementedError(
                f"fp8 checkpoint: fmt {fmt!r} is not supported; only e4m3 (float8_e4m3fn) weights load"
            )
        ignored = config_names(cls.name, config, "ignored_layers") + config_names(cls.name, config, "modules_to_not_convert")
        return cls(
            activation_scheme=config_str(cls.name, config, "activation_scheme", "dynamic"),
            weight_block_size=config.get("weight_block_size"),
            ignored_layers=ignored,
        )

    # --- writing (the checkpoint-writer extension of quantize_base.py) ---
    # vLLM's serialized fp8 as AutoFP8 writes it (``quant_method: "fp8"``, ``activation_scheme``,
    # ``ignored_layers``; ``weight_scale`` and ``input_scale`` 0-dim float32): one weight scale per
    # weight, so per-channel fp8 layers must go to compressed-tensors (or be quantized with
    # ``{"quant_method": "fp8", "weight_strategy": "tensor"}``). Block-scaled layers are written
    # DeepSeek-V3 style (``weight_block_size``, ``weight_scale_inv``). A dynamic fp8 checkpoint says
    # nothing of the activation granularity: pymllm_fx reads it as per token (as it runs), vLLM
    # quantizes activations per tensor; per-tensor dynamic layers go to compressed-tensors.

    @classmethod
    def checkpoint_config(cls, sites: List[Site], floats: List[str]) -> dict:
        """AutoFP8's ``quantization_config``; refuses what one scale per weight cannot hold."""
        fmt = "fp8"
        for site in sites:
            q = site.q
            if q.kind != "fp8":
                raise refuse(site, fmt, "the fp8 format holds e4m3 weights only",
                             "use format='compressed-tensors'" if q.kind == "w8a8" else
                             "use format='awq', 'gptq' or 'compressed-tensors'")
            if q.block_size is not None:
                continue
            if not site.per_tensor:
                raise refuse(site, fmt, "its rows have different scales and the fp8 format stores one "
                             "weight_scale per weight", "use format='compressed-tensors' (float-quantized, strategy "
                             "channel), or quantize with {'quant_method': 'fp8', 'weight_strategy': 'tensor'}")
            if q.activation == "none":
                raise refuse(site, fmt, "its activations stay in float, and an fp8 checkpoint quantizes them",
                             "use format='compressed-tensors'")
            if q.activation == "tensor":
                raise refuse(site, fmt, "its activations are quantized per tensor at run time, and a dynamic "
                             "fp8 checkpoint loads with per-token activation scales", "use format='compressed-tensors'")
        scheme = one_value(sites, lambda s: "static" if s.q.activation == "static" else "dynamic", fmt,
                           "activation_scheme", "use format='compressed-tensors', which has one config group per scheme")
        block = one_value(sites, lambda s: s.q.block_size, fmt, "weight_block_size (or none)",
                          "use format='compressed-tensors', which has one config group per scheme")
        config = {"quant_method": "fp8", "activation_scheme": scheme or "dynamic", "ignored_layers": list(floats)}
        if block is not None:
            config["weight_block_size"] = list(block)
        return config

    @staticmethod
    def checkpoint_tensors(site: Site, config: dict) -> Dict[str, torch.Tensor]:
        """``weight`` e4m3, ``weight_scale`` and (static) ``input_scale`` 0-dim float32; with
        ``weight_block_size``, ``weight_scale_inv`` one per block."""
        q = site.q
        weight = q.weight.t() if site.conv1d else q.weight
        if q.block_size is not None:
            return {"weight": weight, "weight_scale_inv": q.scales.float()}
        out = {"weight": weight, "weight_scale": q.scales.float()[0].clone()}
        if q.input_scale is not None:
            out["input_scale"] = q.input_scale.float().reshape(())
        return out


@dataclass
class Fp8WeightOnlyLinearMethod(LinearMethodBase):
    """compressed-tensors ``float-quantized`` e4m3 weights with no ``input_activations`` (fp8
    weight-only): ``weight`` e4m3 ``(N, K)``, ``weight_scale`` one per logical weight ("tensor") or
    ``(N, 1)`` ("channel"). The activations stay in float: ``w8a16_linear`` decodes the e4m3 codes
    in its kernels and applies one float32 scale per output row."""

    weight_strategy: str = "channel"

    name = "fp8-weight-only"

    def __post_init__(self) -> None:
        if self.weight_strategy not in ("tensor", "channel"):
            raise ValueError(f"fp8 weight-only: weight_strategy {self.weight_strategy!r} is not 'tensor' or 'channel'")

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
        n, k = sum(output_partition_sizes), input_size_per_partition
        register_param(layer, "weight", torch.empty(n, k, dtype=FP8_DTYPE), {"input_dim": 1, "output_dim": 0},
                       extra_weight_attrs)
        # NaN until loaded, so an entry no checkpoint tensor filled is caught after loading.
        if self.weight_strategy == "tensor":
            register_param(layer, "weight_scale", torch.full((len(output_partition_sizes),), float("nan")),
                           {"weight_loader": per_tensor_scale_loader}, extra_weight_attrs)
        else:
            register_param(layer, "weight_scale", torch.full((n, 1), float("nan")), {"output_dim": 0}, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        where = getattr(layer, "prefix", "") or "layer"
        check_fp8_codes(where, "weight", layer.weight.data)
        scale = layer.weight_scale.data.float()
        check_finite(where, "weight_scale", scale)
        if self.weight_strategy == "tensor":
            sizes = torch.tensor(layer.output_partition_sizes, device=scale.device)
            scale = torch.repeat_interleave(scale, sizes)
        replace_parameters(layer, ("weight", "weight_scale"),
                           {"qweight": layer.weight.data, "scales": scale.reshape(-1).contiguous()})

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.pymllm_fx.w8a16_linear(x, layer.qweight, layer.scales, bias)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        return Quantized("fp8", layer.qweight.data, layer.scales.data, activation="none",
                         weight_strategy=self.weight_strategy)

    def describe(self, layer: torch.nn.Module) -> str:
        return f"W8A16 e4m3 checkpoint, per-{self.weight_strategy} weight scale"


def _per_tensor_expert_scale(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """A per-tensor weight scale (``()`` or ``(1,)``) of one expert's projection into its entry of the
    stack ``(E, projections)``."""
    if loaded.numel() != 1:
        raise ValueError(f"expected one per-tensor scale (shape () or (1,)), found shape {tuple(loaded.shape)}")
    if not loaded.dtype.is_floating_point:
        raise TypeError(f"expected a float scale, found dtype {loaded.dtype}")
    load_expert(param, loaded.reshape(1), shard_id)


@dataclass
class Fp8CheckpointMoEMethod(CheckpointMoEMethod):
    """Experts of an fp8 checkpoint (vLLM / AutoFP8 per-tensor ``weight_scale``, compressed-tensors
    per-channel ``weight_scale``, or DeepSeek-V3 ``weight_scale_inv`` per block): each expert's e4m3
    ``weight`` and its scales stacked as stored. They run on ``moe_w8`` exactly as stored: a
    per-tensor scale becomes the same scale on every row, block scales stay per block. Like every
    experts layer here, the grouped kernel keeps the activations 16-bit (weight-only), where the
    checkpoint's tools quantize them to e4m3 per token (or token group)."""

    linear: Fp8CheckpointLinearMethod

    name = "fp8-checkpoint"

    @property
    def block(self) -> Tuple[int, int]:
        return tuple(self.linear.weight_block_size) if self.linear.weight_strategy == "block" else (0, 0)

    def left_float(self, where: str):
        pattern = matches_module(where, self.linear.ignored_layers)
        return f"ignored_layers {pattern!r}" if pattern is not None else super().left_float(where)

    def projection(self, where, which, k, n, part, params_dtype):
        cfg = self.linear
        if cfg.activation_scheme == "static":
            raise NotImplementedError(
                f"{where}: static activation scales (input_scale) have no use in the experts kernel, which keeps "
                f"activations 16-bit, so these experts would not compute what the checkpoint describes; use a "
                f"checkpoint with dynamic activations, or load the float model and call quantize(model, 'fp8')")
        tensors = {"weight": ((n, k), FP8_DTYPE, dict(output_dim=0))}
        if cfg.weight_strategy == "block":
            bn, bk = cfg.weight_block_size
            if part % bn and part != n:
                raise ValueError(
                    f"{where}: {which} stacks projections of {part} rows, not a multiple of the {bn}-row weight "
                    f"blocks, so one expert's gate and up would share a row of {cfg.block_scale_name!r}")
            tensors[cfg.block_scale_name] = (block_scale_shape(n, k, cfg.weight_block_size), torch.float32,
                                             dict(output_dim=0, packed_dim=0, packed_factor=bn))
        elif cfg.weight_strategy == "tensor":
            # One scale per projection: as a "packed" dim of `part` rows, the loader turns a
            # projection's first row into its entry.
            tensors["weight_scale"] = ((n // part,), torch.float32, dict(
                output_dim=0, packed_dim=0, packed_factor=part, weight_loader=_per_tensor_expert_scale))
        else:
            tensors["weight_scale"] = ((n, 1), torch.float32, dict(output_dim=0))
        return tensors

    def runtime(self, where, which, stacks, params_dtype):
        scale_name = self.linear.block_scale_name if self.linear.weight_strategy == "block" else "weight_scale"
        weight, scales = stacks["weight"], stacks[scale_name].float()
        check_fp8_codes(where, f"{which}_weight", weight)
        check_finite(where, f"{which}_{scale_name}", scales)
        if self.linear.weight_strategy == "tensor":  # the same scale on each row of a projection: exact
            scales = scales.repeat_interleave(weight.shape[1] // scales.shape[1], dim=1)
        elif self.linear.weight_strategy == "channel":
            scales = scales.reshape(weight.shape[0], weight.shape[1])
        return {which + "_qweight": weight.contiguous(), which + "_scales": scales.contiguous()}

    def checkpoint_expert_view(self, layer: torch.nn.Module, which: str, expert: int, where: str = "") -> Quantized:
        """As stored, with the checkpoint's weight strategy (block scales keep their blocks)."""
        q = super().checkpoint_expert_view(layer, which, expert, where)
        if q.kind != "fp8":
            return q
        if self.linear.weight_strategy == "block":
            return replace(q, activation="group", weight_strategy="block", block_size=self.block)
        return replace(q, weight_strategy=self.linear.weight_strategy)

    def describe(self, layer: torch.nn.Module) -> str:
        if self.linear.weight_strategy == "block":
            bn, bk = self.linear.weight_block_size
            scales = f"{bn}x{bk} block weight scales"
        else:
            scales = f"per-{self.linear.weight_strategy} weight scale"
        return f"W8A16 e4m3 checkpoint, {scales}, {layer.num_experts} experts"
