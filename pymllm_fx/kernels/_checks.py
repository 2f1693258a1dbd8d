"""Input checks shared by the ops: a clear error instead of a kernel crash or silent garbage."""

from __future__ import annotations

from typing import Optional

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def check_activation(op: str, x: torch.Tensor, in_features: int) -> None:
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: activations must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: activations of shape {tuple(x.shape)} do not match the weight's "
            f"{in_features} input features (expected shape (..., {in_features}))"
        )


def check_tensor(op: str, name: str, t: torch.Tensor, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the activations are on {device}")


def check_bias(op: str, bias: Optional[torch.Tensor], out_features: int, device: torch.device) -> None:
    if bias is None:
        return
    if not bias.dtype.is_floating_point:
        raise TypeError(f"{op}: bias must be a float tensor, got {bias.dtype}")
    check_tensor(op, "bias", bias, (out_features,), (bias.dtype,), device)


