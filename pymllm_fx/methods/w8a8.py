"""``"w8a8"``: W8A8 int8, int8 weights with one symmetric scale per output channel, activations
quantized to int8 per token at run time; int8 x int8 products on int8 tensor cores.

Two methods run ``torch.ops.pymllm_fx.w8a8_linear``:

- :class:`W8A8LinearMethod` (``quantize(model, "w8a8")``) calibrates from the float weight:
  ``scale = max|w_row| / 127``, codes ``round(w / scale)`` in -127..127, float32 scales.
- :class:`W8A8CheckpointLinearMethod` loads compressed-tensors ``int-quantized`` layers (the
  llm-compressor ``W8A8`` preset and its static variants), N = out features, K = in features:

  - ``weight`` int8 ``(N, K)``; ``weight_scale`` ``(N, 1)`` (strategy "channel") or one per logical
    weight (``(1,)``, strategy "tensor"); the weight is ``weight * weight_scale``.
  - dynamic activations (strategy "token", symmetric): no tensor; one scale per token at run time.
  - static activations (strategy "tensor"): ``input_scale`` ``(1,)``, and ``input_zero_point``
    int8 ``(1,)`` when asymmetric (compressed-tensors writes it only then):
    ``q = clamp(round(x / input_scale) + input_zero_point, -128, 127)``.

  compressed-tensors computes asymmetric *dynamic* activation parameters at run time (no
  tensor), from each token's min and max; that scheme is refused (``compressed_tensors.py``).
  A merged layer's shards (q/k/v) read one input, so their static scales must be equal: the op
  quantizes the input once.

Scales stay float32 (``float32_scales``): the layer keeps them through ``.half()``/``.to(dtype)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from pymllm_fx.kernels.w8a8 import INT8_MAX, INT8_MIN
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.parameter import create_float_weight, default_weight_loader, register_param, replace_parameters
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.methods.common import check_config_keys, check_finite, exact_in
from pymllm_fx.methods.fp8_checkpoint import explain_errors, per_tensor_scale_loader

_MIN_SCALE = torch.finfo(torch.float32).tiny  # an all-zero row keeps a finite scale (its codes are 0)
_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}  # shard ids of merged layers (linear.py)


def quantize_int8_per_channel(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float -> (int8 codes ``(N, K)`` in -127..127, float32 scales ``(N,)``), symmetric."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=_MIN_SCALE)
    codes = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


@dataclass
class W8A8LinearMethod(LinearMethodBase):
    """Per-channel symmetric int8 weights calibrated from float; dynamic per-token int8 activations."""

    name = "w8a8"
    float32_scales = True

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
        create_float_weight(layer, input_size_per_partition, output_partition_sizes, params_dtype, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        check_finite(getattr(layer, "prefix", "") or "layer", "weight", layer.weight.data)  # else NaN scales
        codes, scale = quantize_int8_per_channel(layer.weight.data)
        replace_parameters(layer, ("weight",), {"qweight": codes, "weight_scale": scale})

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.pymllm_fx.w8a8_linear(x, layer.qweight, layer.weight_scale, None, None, None, bias)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        return w8a8_view(self, layer)

    def describe(self, layer: torch.nn.Module) -> str:
        return "W8A8 int8, per-channel sym weight, per-token dynamic act"

    @classmethod
    def from_config(cls, config: dict) -> "W8A8LinearMethod":
        check_config_keys(cls.name, config, ())
        return cls()


def per_tensor_zero_point_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Load one integer zero point (``()`` or ``(1,)``, int8 as compressed-tensors writes it, or any
    integer dtype holding an int8 value) into entry ``shard_id`` of ``param`` (all entries if None)."""
    if loaded.numel() != 1:
        raise ValueError(f"expected one per-tensor zero point (shape () or (1,)), found shape {tuple(loaded.shape)}")
    if loaded.dtype.is_floating_point or loaded.dtype == torch.bool or loaded.is_complex():
        raise TypeError(f"expected an integer zero point (int8), found dtype {loaded.dtype}")
    value = int(loaded.reshape(()))
    if not INT8_MIN <= value <= INT8_MAX:
        raise ValueError(f"zero point {value} is outside the int8 range {INT8_MIN}..{INT8_MAX}")
    index = slice(None) if shard_id is None else _SHARD_INDEX.get(shard_id, shard_id)
    with torch.no_grad():
        param.data[index] = value


@dataclass
class W8A8CheckpointLinearMethod(LinearMethodBase):
    """compressed-tensors ``int-quantized`` int8 weights and int8 activations (W8A8), as stored."""

    # "dynamic": one scale per token at run time; "static": the checkpoint's input_scale.
    activation_scheme: str = "dynamic"
    input_symmetric: bool = True  # False: static input_zero_point
    weight_strategy: str = "channel"  # or "tensor": one weight_scale per logical weight

    name = "w8a8-checkpoint"
    float32_scales = True

    def __post_init__(self) -> None:
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"w8a8 checkpoint: activation_scheme {self.activation_scheme!r} is not 'dynamic' or 'static'")
        if self.weight_strategy not in ("channel", "tensor"):
            raise ValueError(f"w8a8 checkpoint: weight_strategy {self.weight_strategy!r} is not 'channel' or 'tensor'")
        if self.activation_scheme == "dynamic" and not self.input_symmetric:
            raise NotImplementedError(
                "w8a8 checkpoint: asymmetric dynamic activations (a zero point per token) are not supported; "
                "use symmetric dynamic or static activations"
            )

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
        shards = len(output_partition_sizes)
        loader = extra_weight_attrs.get("weight_loader", default_weight_loader)

        def register(name: str, data: torch.Tensor, attrs: dict, hint: str) -> None:
            own = attrs.pop("weight_loader", loader)  # per-tensor values have loaders of their own
            register_param(layer, name, data, {**attrs, "weight_loader": explain_errors(where, own, hint)},
                           extra_weight_attrs)

        register("weight", torch.empty(n, k, dtype=torch.int8), {"input_dim": 1, "output_dim": 0},
                 "int-quantized weights are int8 (N, K)")
        # Scales start as NaN, so an entry no checkpoint tensor filled is caught after loading.
        if self.weight_strategy == "channel":
            register("weight_scale", torch.full((n, 1), float("nan")), {"output_dim": 0},
                     "strategy 'channel' has one weight_scale per output row, shape (N, 1)")
        else:
            register("weight_scale", torch.full((shards,), float("nan")), {"weight_loader": per_tensor_scale_loader},
                     "strategy 'tensor' has one weight_scale per weight")
        if self.activation_scheme == "static":
            register("input_scale", torch.full((shards,), float("nan")), {"weight_loader": per_tensor_scale_loader},
                     "static input_activations have one input_scale per layer")
            if not self.input_symmetric:
                # An impossible zero point marks an entry no checkpoint tensor filled.
                register("input_zero_point", torch.full((shards,), INT8_MAX + 1, dtype=torch.int32),
                         {"weight_loader": per_tensor_zero_point_loader},
                         "asymmetric static input_activations have one input_zero_point per layer")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        where = getattr(layer, "prefix", "") or "layer"
        scale = layer.weight_scale.data.float()
        check_finite(where, "weight_scale", scale)
        if self.weight_strategy == "tensor":
            sizes = torch.tensor(layer.output_partition_sizes, device=scale.device)
            per_row = torch.repeat_interleave(scale, sizes)
        else:
            per_row = scale.reshape(-1)
        remove = ("weight", "weight_scale")
        add = {"qweight": layer.weight.data, "weight_scale": per_row.contiguous()}
        if self.activation_scheme == "static":
            input_scale = layer.input_scale.data.float()
            check_finite(where, "input_scale", input_scale, positive=True)
            add["input_scale"] = self._one(where, "input_scale", input_scale)
            remove += ("input_scale",)
            if not self.input_symmetric:
                zero = layer.input_zero_point.data
                if bool((zero > INT8_MAX).any()):
                    raise ValueError(f"{where}: input_zero_point was never loaded (a shard of this merged layer is missing)")
                add["input_zero_point"] = self._one(where, "input_zero_point", zero)
                add["weight_sums"] = layer.weight.data.sum(dim=1, dtype=torch.int32)
                remove += ("input_zero_point",)
        replace_parameters(layer, remove, add)

    @staticmethod
    def _one(where: str, name: str, values: torch.Tensor) -> torch.Tensor:
        """The one value a merged layer's shards share (the op quantizes their common input once)."""
        if bool((values != values[0]).any()):
            raise ValueError(
                f"{where}: the merged projections of this layer hold different static {name} values "
                f"{values.tolist()}, but they read one input, which the op quantizes once; load these projections "
                f"as separate layers"
            )
        return values[:1].clone()

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.pymllm_fx.w8a8_linear(
            x, layer.qweight, layer.weight_scale, getattr(layer, "input_scale", None),
            getattr(layer, "input_zero_point", None), getattr(layer, "weight_sums", None), bias,
        )

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        return w8a8_view(self, layer)

    def describe(self, layer: torch.nn.Module) -> str:
        if self.activation_scheme == "dynamic":
            act = "per-token dynamic act"
        else:
            act = f"static per-tensor {'sym' if self.input_symmetric else 'asym'} act"
        return f"W8A8 int8 checkpoint, per-{self.weight_strategy} weight scale, {act}"


def w8a8_view(method: LinearMethodBase, layer: torch.nn.Module) -> Quantized:
    """Both W8A8 methods in checkpoint terms. Scales run in float32; a checkpoint's bf16 / fp16 scales
    are written back in their own dtype."""
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

