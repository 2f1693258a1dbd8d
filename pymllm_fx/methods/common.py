"""Small helpers the method files share."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from pymllm_fx.kernels.w4a16 import num_groups
from pymllm_fx.layers.parameter import create_float_weight


def check_config_keys(method: str, config: dict, accepted: Iterable[str]) -> None:
    """Refuse keys a method does not understand, instead of silently ignoring a typo."""
    allowed = set(accepted) | {"quant_method"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"quantization_config for {method!r} has unknown keys {unknown}; "
            f"accepted keys: {sorted(allowed)}"
        )


# Checkpoint group sizes the W4A16 kernels run as they are; larger groups (and -1, one group per
# row) become runs of RUNTIME_GROUP-wide runtime groups sharing one scale and zero, which is exact.
NATIVE_GROUPS = (32, 64)
RUNTIME_GROUP = 128


def supported_group_size(group_size: int) -> bool:
    """32 and 64 run as they are; -1 (one group per row) and multiples of 128 run as groups of 128."""
    return group_size in (-1, *NATIVE_GROUPS) or (group_size > 0 and group_size % RUNTIME_GROUP == 0)


def checkpoint_group(group_size: int, k: int) -> int:
    """The checkpoint's group size for a layer with ``k`` input features (-1: the whole row)."""
    return k if group_size == -1 else group_size


def runtime_group(group_size: int) -> int:
    return group_size if group_size in NATIVE_GROUPS else RUNTIME_GROUP


def expand_groups(t: torch.Tensor, group_size: int, runtime_group: int, k: int) -> torch.Tensor:
    """``(N, G)`` per checkpoint group -> ``(N, ceil(K / runtime_group))`` per runtime group."""
    if runtime_group == group_size:
        return t.contiguous()
    starts = torch.arange(num_groups(k, runtime_group), device=t.device) * runtime_group
    return t.index_select(1, starts // group_size).contiguous()


def is_float_layer(layer: torch.nn.Module) -> bool:
    """A layer its checkpoint left unquantized (AWQ ``modules_to_not_convert``, GPTQ ``dynamic``
    skip rules): it holds a plain float ``weight`` instead of packed codes."""
    return getattr(layer, "left_float", False)


def make_float_layer(layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list,
                     params_dtype: torch.dtype, extra_weight_attrs: dict) -> None:
    """Give ``layer`` the float weight its checkpoint stores; ``apply`` then runs ``float_linear``."""
    create_float_weight(layer, input_size_per_partition, output_partition_sizes, params_dtype, extra_weight_attrs)
    layer.left_float = True


def float_linear(layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, layer.weight, bias)
