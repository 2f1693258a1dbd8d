"""A transformers model from a local checkpoint directory, built without materializing its weights.

The architecture is built on the ``meta`` device, so no float weight of any size is allocated;
only buffers computed at construction (rotary frequencies) are made real, because no checkpoint
holds them. Everything else is filled later, one checkpoint tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from pymllm_fx.loading.safetensors_io import PICKLE_SUFFIXES, CheckpointError


def read_config(path: Union[str, Path]) -> dict:
    """The checkpoint's ``config.json`` as a dict; a clear error when it is absent or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: from_pretrained takes a local checkpoint directory (config.json + *.safetensors); "
            f"nothing is downloaded from a hub"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (it holds {pickles[:3]}: pickle checkpoints are never loaded)" if pickles else ""
        raise CheckpointError(f"{path}: no config.json{hint}; save the model with save_pretrained or save_quantized")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    return config


def model_class(config) -> type:
    """The transformers class named by ``config.architectures``, else the causal-LM auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    auto = transformers.AutoModelForCausalLM
    if type(config) in auto._model_mapping:
        return auto._model_mapping[type(config)]
    return transformers.AutoModel._model_mapping[type(config)]


def build_on_meta(path: Union[str, Path], dtype: Optional[torch.dtype]) -> nn.Module:
    """The checkpoint's architecture with every parameter and buffer on ``meta``, in ``dtype``.

    ``dtype=None`` takes the config's ``dtype`` (``torch_dtype``), else float32.
    """
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: transformers cannot read config.json ({err})") from None
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        cls = model_class(config)
    except KeyError:
        raise CheckpointError(
            f"{path}: transformers has no model class for model_type {config.model_type!r} "
            f"(architectures {getattr(config, 'architectures', None)})"
        ) from None
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    return model


def materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Make the meta buffers real and let transformers recompute them, then move them to ``device``.

    Checkpoints do not hold non-persistent buffers (rotary ``inv_freq``): transformers' own
    ``_init_weights`` computes them, as its from_pretrained does. They are computed on the CPU, as
    a model built on the CPU and moved would have them (a GPU's pow rounds differently).
    Persistent buffers are left for the checkpoint. A buffer nothing recomputed is an error, not
    silent garbage.
    """
    owners = {}
    for name, buffer in list(model.named_buffers()):
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent) if parent else model
        if buffer.device.type != "meta" or leaf not in module._non_persistent_buffers_set:
            continue
        module._buffers[leaf] = torch.full_like(buffer, _unset(buffer.dtype), device="cpu")
        owners[name] = module
    init = getattr(model, "_init_weights", None)
    for module in {id(m): m for m in owners.values()}.values():
        if init is not None:
            with torch.no_grad():
                init(module)
    for name, module in owners.items():
        buffer = module._buffers[name.rpartition(".")[2]]
        if _still_unset(buffer):
            raise CheckpointError(
                f"buffer {name!r} of {type(module).__name__} is computed at construction and this transformers "
                f"version cannot recompute it after a meta-device build; use transformers >= 5"
            )
        module._buffers[name.rpartition(".")[2]] = buffer.to(device)


def _unset(dtype: torch.dtype):
    """A value no recomputed buffer holds: NaN for floats, the minimum for integers (bool: none)."""
    if dtype.is_floating_point:
        return float("nan")
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def _still_unset(buffer: torch.Tensor) -> bool:
    if buffer.dtype.is_floating_point:
        return bool(torch.isnan(buffer).any())
    return buffer.dtype != torch.bool and bool((buffer == _unset(buffer.dtype)).any())
