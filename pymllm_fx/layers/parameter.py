"""Parameter metadata and the shard arithmetic that weight loaders share.

A parameter says how to load it through attributes (vLLM's convention), so loaders read
attributes, never layer or method types:

- ``weight_loader``: ``fn(param, loaded_weight[, shard_id])``, set by the owning layer.
- ``output_dim`` / ``input_dim``: which dim of the parameter runs along out / in features.
- ``packed_dim`` / ``packed_factor``: the dim along which ``packed_factor`` logical values share
  one stored element (eight 4-bit values in one int32). Sizes along it are in stored elements.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

_PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def holds_values(t: torch.Tensor) -> bool:
    """A float tensor of the model's dtype family, which a cast (``.half()``) may change; not stored
    codes (integers, fp8)."""
    return t.dtype in _PLAIN_FLOATS


def set_weight_attrs(weight: torch.Tensor, weight_attrs: Optional[Dict[str, Any]]) -> None:
    """Attach loading metadata to a parameter; refuses to overwrite an attribute it already has."""
    if weight_attrs is None:
        return
    for key, value in weight_attrs.items():
        if hasattr(weight, key):
            raise AttributeError(f"parameter already has attribute {key!r}; refusing to overwrite it")
        setattr(weight, key, value)


def stored_size(param: torch.Tensor, dim: int, logical_size: int) -> int:
    """Size in stored elements of ``logical_size`` features along ``dim`` of ``param``."""
    if getattr(param, "packed_dim", None) != dim:
        return logical_size
    factor = param.packed_factor
    if logical_size % factor:
        raise ValueError(
            f"{logical_size} features cannot be packed {factor} per element along dim {dim}; "
            f"the size must be a multiple of {factor}"
        )
    return logical_size // factor


def rank_share(layer: torch.nn.Module, name: str, size: int, split: bool) -> str:
    """``name=size`` for an error message, saying so when ``size`` is one tensor-parallel rank's share.

    A size that fits the whole layer can fail on a rank (a group or a packed word straddles two
    ranks); the message must show both numbers, or the user cannot see why.
    """
    tp_size = getattr(layer, "tp_size", 1)
    if not split or tp_size == 1:
        return f"{name}={size}"
    return f"{name}={size} on this rank ({size * tp_size} split over tp_size={tp_size})"


def unaligned_output(output_partition_sizes: list, multiple: int) -> Optional[Tuple[str, int]]:
    """The first logical output slice that is not a whole number of ``multiple`` (packed words),
    as ``(its name for an error, its size)``, or None when all are."""
    for i, size in enumerate(output_partition_sizes):
        if size % multiple:
            return ("out_features" if len(output_partition_sizes) == 1 else f"out_features of logical weight {i}"), size
    return None


def narrow_for_rank(
    loaded: torch.Tensor, dim: int, shard_size: int, index: int, full_size: int
) -> torch.Tensor:
    """The ``index``-th block of ``shard_size`` along ``dim`` of a full checkpoint tensor.

    ``full_size`` is what the whole tensor must measure along ``dim``: a tensor of the wrong size
    is refused rather than silently cut.
    """
    if loaded.dim() <= dim or loaded.shape[dim] != full_size:
        raise ValueError(
            f"expected {full_size} along dim {dim} of the checkpoint tensor, found shape "
            f"{tuple(loaded.shape)}"
        )
    return loaded.narrow(dim, index * shard_size, shard_size)


def dtype_fits(param_dtype: torch.dtype, loaded_dtype: torch.dtype) -> bool:
    """Plain floats convert into each other; integer, fp8 and bool tensors must match exactly."""
    if param_dtype == loaded_dtype:
        return True
    return param_dtype in _PLAIN_FLOATS and loaded_dtype in _PLAIN_FLOATS


def copy_into(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy ``loaded`` into ``target`` after checking shape and dtype; raises ValueError/TypeError."""
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(f"expected shape {tuple(target.shape)}, found {tuple(loaded.shape)}")
    if not dtype_fits(target.dtype, loaded.dtype):
        raise TypeError(f"expected dtype {target.dtype}, found {loaded.dtype}")
    with torch.no_grad():
        target.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Load a whole tensor, unsharded: norms, embeddings, and parameters no layer owns."""
    copy_into(param.data, loaded_weight)


def load_expert(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None, output_dim: Optional[int] = None) -> None:
    """Weight loader of a stack of per-expert tensors ``(E, ...)``: the whole stack, or with
    ``shard_id = (expert, first output feature)`` one expert's projection. Its output features run
    along ``output_dim`` (the parameter's attribute unless given; packed ``packed_factor`` to an
    element when ``packed_dim`` is that dim); without one (GPTQ's ``g_idx``) the expert's whole slice."""
    if shard_id is None:
        copy_into(param.data, loaded)
        return
    expert, first = shard_id
    dim = output_dim if output_dim is not None else getattr(param, "output_dim", None)
    target = param.data[expert]
    if dim is not None:
        if loaded.dim() != target.dim():
            raise ValueError(f"expected one expert's {target.dim()}-D tensor, found shape {tuple(loaded.shape)}")
        factor = param.packed_factor if getattr(param, "packed_dim", None) == dim else 1
        start = first // factor
        target = target[(slice(None),) * (dim - 1) + (slice(start, start + loaded.shape[dim - 1]),)]
    copy_into(target, loaded)


def register_param(
    layer: torch.nn.Module, name: str, data: torch.Tensor, attrs: Dict[str, Any], extra_weight_attrs: Dict[str, Any]
) -> torch.nn.Parameter:
    """Register ``data`` on ``layer`` as a frozen parameter with its loading metadata.

    The layer's ``extra_weight_attrs`` (its ``weight_loader``) apply unless the parameter's own
    ``attrs`` (layout keys such as ``output_dim``, or a loader of its own) name the same key; keys
    whose value is None are left out.
    """
    param = torch.nn.Parameter(data, requires_grad=False)
    set_weight_attrs(param, {key: value for key, value in {**extra_weight_attrs, **attrs}.items() if value is not None})
    layer.register_parameter(name, param)
    return param


def create_float_weight(
    layer: torch.nn.Module,
    input_size_per_partition: int,
    output_partition_sizes: list,
    params_dtype: torch.dtype,
    extra_weight_attrs: Dict[str, Any],
) -> torch.nn.Parameter:
    """Register a full-precision ``weight`` ``(out, in)`` on ``layer`` and return it.

    Used by the unquantized method and by every method that calibrates from a float weight in
    ``process_weights_after_loading``.
    """
    weight = torch.nn.Parameter(
        torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
        requires_grad=False,
    )
    set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
    set_weight_attrs(weight, extra_weight_attrs)
    layer.register_parameter("weight", weight)
    return weight


def replace_parameters(layer: torch.nn.Module, remove: tuple, add: Dict[str, torch.Tensor]) -> None:
    """Swap a layer's load-time parameters for its run-time ones (after calibration or repacking)."""
    for name in remove:
        delattr(layer, name)
    for name, tensor in add.items():
        if tensor is None:
            layer.register_parameter(name, None)
        else:
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
