"""``"fp8"``: W8A8 float8 e4m3, weight scales from calibration, per-token dynamic activation scales.
Runs ``torch.ops.pymllm_fx.fp8_linear``.

``weight_strategy`` ``"channel"`` (the default) calibrates one scale per output row;
``"tensor"`` one scale for the whole weight, which is what the serialized ``"fp8"`` checkpoint
format (vLLM / AutoFP8: one ``weight_scale`` per weight) holds, so such a model saves to that format
exactly (``save_quantized(model, dir, "fp8")``). At run time both are one scale per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from pymllm_fx.kernels.fp8_w8a8 import FP8_DTYPE, FP8_MAX, quantize_fp8_per_channel
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import EightBitMoEMethod
from pymllm_fx.layers.parameter import create_float_weight, replace_parameters
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.methods.common import check_config_keys, check_finite, config_str

WEIGHT_STRATEGIES = ("channel", "tensor")
_MIN_SCALE = 1e-12  # as quantize_fp8_per_channel: an all-zero weight keeps a finite scale


def quantize_fp8_per_tensor(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float -> (e4m3 ``(N, K)``, float32 scales ``(N,)``), one scale shared by every row."""
    w = weight.float()
    scale = (w.abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.expand(w.shape[0]).contiguous()


@dataclass
class Fp8LinearMethod(LinearMethodBase):
    """e4m3 weights and activations; the scales stay float32."""

    weight_strategy: str = "channel"

    name = "fp8"

    def __post_init__(self) -> None:
        if self.weight_strategy not in WEIGHT_STRATEGIES:
            raise ValueError(
                f"fp8: weight_strategy {self.weight_strategy!r} is not supported; use 'channel' (one scale per "
                f"output row) or 'tensor' (one scale per weight, the serialized 'fp8' checkpoint format)"
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
        create_float_weight(layer, input_size_per_partition, output_partition_sizes, params_dtype, extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        check_finite(getattr(layer, "prefix", "") or "layer", "weight", layer.weight.data)  # else NaN scales
        if self.weight_strategy == "tensor":
            weight, weight_scale = quantize_fp8_per_tensor(layer.weight.data)
        else:
            weight, weight_scale = quantize_fp8_per_channel(layer.weight.data)
        replace_parameters(layer, ("weight",), {"weight": weight, "weight_scale": weight_scale})

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.pymllm_fx.fp8_linear(x, layer.weight, layer.weight_scale, bias)

    def experts_method(self) -> "Fp8MoEMethod":
        return Fp8MoEMethod()

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        return Quantized("fp8", layer.weight.data, layer.weight_scale.data, weight_strategy=self.weight_strategy)

    def describe(self, layer: torch.nn.Module) -> str:
        return f"W8A8 e4m3, per-{self.weight_strategy} weight, per-token act"

    @classmethod
    def from_config(cls, config: dict) -> "Fp8LinearMethod":
        check_config_keys(cls.name, config, ("activation_scheme", "weight_strategy"))
        scheme = config_str(cls.name, config, "activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(
                f"fp8: activation_scheme {scheme!r} needs calibrated input scales from a checkpoint; "
                f"quantizing from float weights supports only 'dynamic'"
            )
        return cls(weight_strategy=config_str(cls.name, config, "weight_strategy", "channel").lower())


@dataclass
class Fp8MoEMethod(EightBitMoEMethod):
    """Experts as e4m3 codes ``(E, N, K)`` with one float32 scale per row ``(E, N)``, whatever the
    linear layers' ``weight_strategy``. The grouped kernel reads them weight-only: the activations
    stay 16-bit, which costs nothing at decode, where the experts are bound by reading their bytes."""

    name = "fp8"

    def quantize_rows(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_per_channel(rows)

    def describe(self, layer: torch.nn.Module) -> str:
        return f"W8A16 e4m3 per-channel, {layer.num_experts} experts"
