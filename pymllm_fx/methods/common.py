"""Small helpers the method files share."""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Tuple

import torch

from pymllm_fx.kernels.w4a16 import num_groups, unpack_int4
from pymllm_fx.layers.checkpoint_view import Quantized, zero_points
from pymllm_fx.layers.quantize_base import UnquantizedLinearMethod


def check_config_keys(method: str, config: dict, accepted: Iterable[str]) -> None:
    """Refuse keys a method does not understand, instead of silently ignoring a typo."""
    allowed = set(accepted) | {"quant_method"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"quantization_config for {method!r} has unknown keys {unknown}; "
            f"accepted keys: {sorted(allowed)}"
        )


# Typed reads of a quantization_config: a value of the wrong form is a ValueError that names the key
# and the form expected, not a TypeError from deep inside (``bits: [4]``, ``group_size: 1e999``).


def config_int(method: str, config: dict, key: str, default: Optional[int]) -> Optional[int]:
    """``config[key]`` as an int (a JSON integer; bools and floats are refused), or ``default``."""
    value = config.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{method}: quantization_config[{key!r}] must be an integer, found {_shown(value)}")


def config_bool(method: str, config: dict, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise ValueError(f"{method}: quantization_config[{key!r}] must be true or false, found {_shown(value)}")


def config_str(method: str, config: dict, key: str, default: Optional[str]) -> Optional[str]:
    value = config.get(key, default)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{method}: quantization_config[{key!r}] must be a string, found {_shown(value)}")


def config_names(method: str, config: dict, key: str) -> Tuple[str, ...]:
    """A list of module names (a lone string is one name, not its characters; absent or null: none)."""
    value = config.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{method}: quantization_config[{key!r}] must be a list of module names, found {_shown(value)}")


def config_pattern(method: str, key: str, pattern: Any) -> "re.Pattern":
    """A checkpoint's regular expression, compiled now: a bad one names the key and the pattern."""
    if not isinstance(pattern, str):
        raise ValueError(f"{method}: {key} holds {_shown(pattern)}, not a pattern string")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{method}: {key} holds the pattern {pattern!r}, which is not a valid regular expression "
                         f"({err})") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:60] + '...'}"


def check_finite(where: str, name: str, t: torch.Tensor, positive: bool = False) -> None:
    """Refuse NaN/Inf values (and non-positive ones where they divide), naming layer and tensor."""
    if not t.dtype.is_floating_point:
        return
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


def check_dequantized_range(where: str, scales: torch.Tensor, max_code: float, dtype: torch.dtype) -> None:
    """Scales that turn the largest code into a value ``dtype`` cannot hold (an AWQ scale of 3e38 is
    finite, and overflows once multiplied by 15) are refused before they run."""
    top = float(scales.detach().abs().max()) * max_code if scales.numel() else 0.0
    if dtype.is_floating_point and top > torch.finfo(dtype).max:
        raise ValueError(
            f"{where}: scales up to {float(scales.abs().max()):.3g} times codes up to {max_code:g} exceed the largest "
            f"{dtype} ({torch.finfo(dtype).max:.3g}); the weights would overflow to Inf. The checkpoint is corrupt"
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


def exact_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when that holds every value exactly (a bf16 model's own scales), else float32."""
    narrow = t.to(dtype)
    return narrow if torch.equal(narrow.float(), t.float()) else t.float()


class LeftFloat(UnquantizedLinearMethod):
    """A layer a checkpoint's config leaves in float (AWQ ``modules_to_not_convert``, GPTQ ``dynamic``
    skip rules, compressed-tensors ``ignore`` or no config group): the plain float ``weight`` and
    ``F.linear``, with the reason ``explain()`` shows. The one float shape of every checkpoint
    method: AWQ and GPTQ hand such a layer to it as ``layer.left_float``, compressed-tensors as the
    layer's scheme."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def describe(self, layer: torch.nn.Module) -> str:
        return f"unquantized ({self.reason})"


def leave_float(layer: torch.nn.Module, reason: str, *create_args: Any, **extra_weight_attrs: Any) -> None:
    """Make ``layer`` a :class:`LeftFloat` layer from inside a method's ``create_weights`` (its arguments)."""
    layer.left_float = LeftFloat(reason)
    layer.left_float.create_weights(layer, *create_args, **extra_weight_attrs)


def is_float_layer(layer: torch.nn.Module) -> bool:
    """A layer its checkpoint left unquantized: it holds a plain float ``weight``, not packed codes."""
    return isinstance(getattr(layer, "left_float", None), LeftFloat)


def read_int4(layer: torch.nn.Module, where: str, group: int, runtime: int, per_row: bool,
              perm: Optional[torch.Tensor] = None) -> Quantized:
    """W4A16 runtime tensors -> codes in checkpoint order, one scale / zero per checkpoint group
    (the ``checkpoint_view`` of every int4 method)."""
    k = layer.input_size_per_partition
    codes = unpack_int4(layer.qweight.data, k).to(torch.int32)
    scales = _collapse(layer.scales.data, group, runtime, k, where, "scales")
    zeros = None
    if layer.zeros is not None:
        zeros = zero_points(_collapse(layer.zeros.data, group, runtime, k, where, "zeros"), where, "zeros")
    g_idx = None
    if perm is not None:  # act-order: runtime column j is checkpoint column perm[j]
        perm = perm.long()
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
        g_idx = torch.empty(k, dtype=torch.int32, device=perm.device)
        g_idx[perm] = (torch.arange(k, device=perm.device) // group).to(torch.int32)
    return Quantized("int4", codes, scales, zeros, -1 if per_row else group, g_idx)


def _collapse(t: torch.Tensor, group: int, runtime: int, k: int, where: str, name: str) -> torch.Tensor:
    """Runtime ``(N, ceil(K / runtime))`` -> one column per checkpoint group of ``group`` inputs."""
    if group == runtime:
        return t
    starts = torch.arange(num_groups(k, group), device=t.device) * group
    picked = t.index_select(1, starts // runtime)
    if not torch.equal(expand_groups(picked, group, runtime, k), t):
        raise ValueError(
            f"{where}: tensor {name!r} changes inside a checkpoint group of {group} inputs, so it has no "
            f"exact checkpoint form; the layer was not loaded by its own method"
        )
    return picked
