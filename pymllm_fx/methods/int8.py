"""``"int8"``: W8A16, int8 weights with one symmetric scale per output channel (RTN).

Calibrates from the float weight in ``process_weights_after_loading``; runs
``torch.ops.pymllm_fx.w8a16_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch

from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import EightBitMoEMethod
from pymllm_fx.layers.parameter import create_float_weight, replace_parameters
from pymllm_fx.layers.quantize_base import LinearMethodBase
from pymllm_fx.methods.common import check_config_keys, check_finite

INT8_MAX = 127


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)`` float -> (int8 codes ``(N, K)``, scales ``(N,)`` in the weight's dtype)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scales.to(weight.dtype)


@dataclass
class Int8LinearMethod(LinearMethodBase):
    """Per-channel symmetric int8 weights; activations stay in their float dtype."""

    name = "int8"

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
        codes, scales = quantize_int8(layer.weight.data)
        replace_parameters(layer, ("weight",), {"qweight": codes, "scales": scales})

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.ops.pymllm_fx.w8a16_linear(x, layer.qweight, layer.scales, bias)

    def experts_method(self) -> "Int8MoEMethod":
        return Int8MoEMethod()

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Quantized:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        return Quantized("int8", layer.qweight.data, layer.scales.data)

    def describe(self, layer: torch.nn.Module) -> str:
        return "W8A16 per-channel sym"

    @classmethod
    def from_config(cls, config: dict) -> "Int8LinearMethod":
        check_config_keys(cls.name, config, ())
        return cls()


@dataclass
class Int8MoEMethod(EightBitMoEMethod):
    """Experts as per-channel symmetric int8 codes ``(E, N, K)`` with float32 scales ``(E, N)``."""

    name = "int8"

    def quantize_rows(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return quantize_int8(rows)

    def describe(self, layer: torch.nn.Module) -> str:
        return f"W8A16 per-channel sym, {layer.num_experts} experts"
