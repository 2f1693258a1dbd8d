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

Block-wise checkpoints (``weight_block_size`` ``[128, 128]``, DeepSeek-V3's ``weight_scale_inv``
of shape ``(ceil(N/128), ceil(K/128))``) are refused with NotImplementedError: a scale that
changes along K cannot be written as one scale per row without requantizing, which would change
the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE, FP8_MAX
from pymllm_fx.layers.parameter import (
    create_float_weight,
    register_param,
    replace_parameters,
)
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.methods.common import check_config_keys

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


def check_finite(where: str, name: str, t: torch.Tensor, positive: bool = False) -> None:
    """Refuse NaN/Inf scales (and non-positive ones where they divide), naming layer and tensor."""
    bad = ~torch.isfinite(t)
    if positive:
        bad |= t <= 0
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        what = "NaN, Inf or non-positive values" if positive else "NaN or Inf"
        raise ValueError(
            f"{where}: tensor {name!r} holds {what} (first at index {first}); the checkpoint is corrupt, "
            f"was saved before calibration finished, or a shard of this merged layer was never loaded"
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
    # "tensor" for static and "token" for dynamic activations.
    activation_strategy: Optional[str] = None
    # "tensor": one weight scale per logical weight; "channel": one per output row.
    weight_strategy: str = "tensor"
    weight_block_size: Optional[Tuple[int, int]] = None
    # Layers the checkpoint left in float (vLLM ignored_layers, transformers modules_to_not_convert).
    ignored_layers: Tuple[str, ...] = ()

    name = "fp8-checkpoint"
    prequantized = True  # loads a checkpoint; quantize() without weights= is refused

    def __post_init__(self) -> None:
        if self.weight_block_size is not None:
            raise NotImplementedError(
                f"fp8 checkpoint: block-wise weight scales (weight_block_size={list(self.weight_block_size)}, "
                f"tensors 'weight_scale_inv') are not supported yet. Each block has its own scale, which the "
                f"per-channel fp8_linear op cannot hold exactly, and requantizing would change the weights; "
                f"it needs a block-scaled fp8 op with per-token-group activation scales"
            )
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(
                f"fp8 checkpoint: activation_scheme {self.activation_scheme!r} is not 'dynamic' or 'static'"
            )
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
        self.ignored_layers = tuple(self.ignored_layers or ())

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
        # Scales start as NaN, so an entry no checkpoint tensor filled is caught after loading.
        if self.weight_strategy == "tensor":
            register("weight_scale", torch.full((shards,), float("nan")), per_tensor)
        else:
            register("weight_scale", torch.full((n, 1), float("nan")), {"output_dim": 0})
        if self.activation_scheme == "static":
            register("input_scale", torch.full((shards,), float("nan")), per_tensor)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.dtype != FP8_DTYPE:
            return  # an ignored layer: its float weight runs as it is
        where = getattr(layer, "prefix", "") or "layer"
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
        if self.activation_scheme == "dynamic" and self.activation_strategy == "token":
            return torch.ops.pymllm_fx.fp8_linear(x, layer.weight, layer.weight_scale, bias)
        input_scale = layer.input_scale if self.activation_scheme == "static" else None
        return fp8_linear_per_tensor_act(x, layer.weight, layer.weight_scale, input_scale, bias)

    def describe(self, layer: torch.nn.Module) -> str:
        if layer.weight.dtype != FP8_DTYPE:
            return "unquantized (ignored by the checkpoint)"
        act = {
            ("dynamic", "token"): "per-token dynamic act",
            ("dynamic", "tensor"): "per-tensor dynamic act",
            ("static", "tensor"): "static per-tensor act",
        }[(self.activation_scheme, self.activation_strategy)]
        return f"W8A8 e4m3 checkpoint, per-{self.weight_strategy} weight scale, {act}"

    @classmethod
    def from_config(cls, config: dict) -> "Fp8CheckpointLinearMethod":
        """From a serialized checkpoint's ``quantization_config`` (``quant_method: "fp8"``)."""
        check_config_keys(
            cls.name,
            config,
            ("activation_scheme", "weight_block_size", "ignored_layers", "modules_to_not_convert", "fmt"),
        )
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise NotImplementedError(
                f"fp8 checkpoint: fmt {fmt!r} is not supported; only e4m3 (float8_e4m3fn) weights load"
            )
        scheme = config.get("activation_scheme", "dynamic")
        block = config.get("weight_block_size")
        ignored = tuple(config.get("ignored_layers") or ()) + tuple(config.get("modules_to_not_convert") or ())
        return cls(
            activation_scheme=scheme,
            weight_strategy="tensor",
            weight_block_size=None if block is None else tuple(block),
            ignored_layers=ignored,
        )
