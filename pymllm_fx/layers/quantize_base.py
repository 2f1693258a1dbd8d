"""Quantization method base classes: the plugin interface every method implements.

This is the seed specification (vLLM / sglang's LinearMethodBase design), kept name for name:

1. A quantization algorithm provides a concrete subclass of ``LinearMethodBase``.
2. Linear layers hold it as ``layer.quant_method``.
3. In ``__init__`` the layer calls ``quant_method.create_weights(layer, ...)``, which registers the
   parameters (packed int weights, scales, zero points) and their loading metadata.
4. In ``forward`` the layer calls ``quant_method.apply(layer, x, bias)`` instead of ``F.linear``.
5. After loading, a ModelRunner-style loop calls ``process_weights_after_loading(layer)`` on every
   module that has a ``quant_method``: repacking, transposing, calibration, clean-up.

Extensions (optional, not part of the seed; nothing calls them unless a method defines them):

- Saving, on a runtime method: ``checkpoint_view(layer, where) -> Quantized | None`` says what one
  of its layers is in checkpoint terms (``layers/checkpoint_view.py``; None: the layer is float),
  and an experts method's ``checkpoint_expert_view(layer, which, expert, where) -> Quantized`` says
  it of one expert's projection. ``save_quantized`` refuses a layer whose method has no view.
- Writing a format, on the method that reads it: ``checkpoint_config(sites, floats) -> dict`` (the
  ``quantization_config`` for these sites, refusing any it cannot hold exactly) and
  ``checkpoint_tensors(site, config) -> {name: tensor}`` (one site's tensors), registered with
  ``loading.formats.register_format``. :class:`CheckpointView` and :class:`CheckpointWriter` spell
  out both shapes; they are protocols, so no method has to inherit them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol

import torch
import torch.nn.functional as F

from pymllm_fx.layers.parameter import create_float_weight

if TYPE_CHECKING:  # the extensions' types; importing them at run time would be a cycle
    from pymllm_fx.layers.checkpoint_view import Quantized
    from pymllm_fx.loading.formats import Site


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



# --- extensions (optional; see the module docstring) ---------------------------------------------


class CheckpointView(Protocol):
    """A runtime method that can say what its layers are in checkpoint terms, so they can be saved."""

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Optional["Quantized"]:
        """The layer's weight in checkpoint terms, or None if the layer is float."""
        ...


class CheckpointWriter(Protocol):
    """A checkpoint format's writer: the method that reads the format, used as a class."""

    def checkpoint_config(self, sites: List["Site"], floats: List[str]) -> dict:
        """The ``quantization_config`` for ``sites``; raises ValueError for a site it cannot hold exactly."""
        ...

    def checkpoint_tensors(self, site: "Site", config: dict) -> Dict[str, torch.Tensor]:
        """One site's tensors, named under the site's module name (``qweight``, ``weight_scale``, ...)."""
        ...
