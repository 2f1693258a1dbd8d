"""``"fp8"``: W8A8 float8 e4m3, per-channel weight scales from calibration, per-token dynamic
activation scales. Runs ``torch.ops.pymllm_fx.fp8_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from pymllm_fx.kernels.fp8_w8a8 import quantize_fp8_per_channel
from pymllm_fx.layers.parameter import create_float_weight, replace_parameters
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.methods.common import check_config_keys


@dataclass
class Fp8LinearMethod(LinearMethodBase):
    """e4m3 weights and activations; the scales stay float32."""

    name = "fp8"

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
        weight, weight_scale = quantize_fp8_per_channel(layer.weight.data)
        replace_parameters(layer, ("weight",), {"weight": weight, "weight_scale": weight_scale})

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.pymllm_fx.fp8_linear(x, layer.weight, layer.weight_scale, bias)

    def describe(self, layer: torch.nn.Module) -> str:
        return "W8A8 e4m3, per-channel weight, per-token act"

    @classmethod
    def from_config(cls, config: dict) -> "Fp8LinearMethod":
        check_config_keys(cls.name, config, ("activation_scheme",))
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(
                f"fp8: activation_scheme {scheme!r} needs calibrated input scales from a checkpoint; "
                f"quantizing from float weights supports only 'dynamic'"
            )
        return cls()
