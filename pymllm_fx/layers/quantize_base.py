"""Quantization method base classes: the plugin interface every method implements.

This is the seed specification (vLLM / sglang's LinearMethodBase design), kept name for name:

1. A quantization algorithm provides a concrete subclass of ``LinearMethodBase``.
2. Linear layers hold it as ``layer.quant_method``.
3. In ``__init__`` the layer calls ``quant_method.create_weights(layer, ...)``, which registers the
   parameters (packed int weights, scales, zero points) and their loading metadata.
4. In ``forward`` the layer calls ``quant_method.apply(layer, x, bias)`` instead of ``F.linear``.
5. After loading, a ModelRunner-style loop calls ``process_weights_after_loading(layer)`` on every
   module that has a ``quant_method``: repacking, transposing, calibration, clean-up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from pymllm_fx.layers.parameter import create_float_weight


class QuantizeMethodBase(ABC):
    """Base class for all quantization methods (linear, embedding, MoE, ...)."""

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        """Create and register quantized weight parameters on ``layer``."""
        raise NotImplementedError

    @abstractmethod
    def apply(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the quantized forward computation with the parameters of ``layer``."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Post-process parameters once every checkpoint tensor is loaded. No-op by default."""
        return None


class LinearMethodBase(QuantizeMethodBase):
    """Base class for quantization methods applied to linear layers."""

    @abstractmethod
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
        """Create the weight tensors of ``layer``.

        ``input_size_per_partition`` and ``output_partition_sizes`` are this tensor-parallel rank's
        sizes (``output_partition_sizes`` has one entry per logical weight of a merged layer, e.g.
        ``[q, k, v]``); ``input_size``/``output_size`` are the full sizes. ``extra_weight_attrs``
        (``weight_loader`` at least) must be attached to every created parameter.
        """
        raise NotImplementedError

    @abstractmethod
    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Compute ``x @ W.T + bias`` from the layer's parameters; ``x`` is ``(*, in)``."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethodBase):
    """Default pass-through: a full-precision ``weight`` ``(out, in)`` and ``F.linear``."""

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
        create_float_weight(
            layer, input_size_per_partition, output_partition_sizes, params_dtype, extra_weight_attrs
        )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
