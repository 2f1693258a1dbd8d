"""A transformers model from a local checkpoint directory, built without materializing its weights.

The architecture is built on the ``meta`` device, so no float weight of any size is allocated;
only buffers computed at construction (rotary frequencies) are made real, because no checkpoint
holds them. Everything else is filled later, one checkpoint tensor at a time.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from pymllm_fx.loading.files import CheckpointError, CheckpointRoot
from pymllm_fx.loading.safetensors_io import PICKLE_SUFFIXES


def read_config(path: Union[str, Path]) -> dict:
    """The checkpoint's ``config.json`` as a dict, parsed strictly and checked (see
    :func:`check_config`); a clear error when it is absent, unsafe or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: from_pretrained takes a local checkpoint directory (config.json + *.safetensors); "
            f"nothing is downloaded from a hub"
        )
    config_file = path / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (it holds {pickles[:3]}: pickle checkpoints are never loaded)" if pickles else ""
        raise CheckpointError(f"{path}: no config.json{hint}; save the model with save_pretrained or save_quantized")
    config = CheckpointRoot(path).read_json(config_file, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    check_config(config, str(config_file))
    return config


# Sizes a model is built from: a positive integer when present (not a bool, a float or a string).
_SIZE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_inner", "d_model",
    "d_ff", "num_layers", "num_decoder_layers", "num_heads", "moe_intermediate_size", "num_experts",
    "num_local_experts", "n_routed_experts", "image_size", "patch_size", "num_channels", "embed_dim",
)
_EPS = re.compile(r"(^|_)(eps|epsilon)($|_)|_eps$|^eps")


def check_config(config: dict, where: str) -> None:
    """Refuse config values a model cannot be built or run with, naming the key: sizes that are not
    positive integers, normalization epsilons that are not positive (NaN and infinity cannot get
    this far: the JSON parser refuses them), ``architectures`` that is not a list of names."""
    for key, value in config.items():
        at = f"{where}: {key!r}"
        if isinstance(value, dict):
            check_config(value, f"{where}: {key}")
            continue
        if key in _SIZE_KEYS and value is not None:
            values = value if isinstance(value, list) and value else [value]  # image sizes may be [h, w]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise CheckpointError(f"{at} must be a positive integer, found {value!r}")
        if _EPS.search(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and value > 0):
                raise CheckpointError(f"{at} is {value!r}: a normalization epsilon must be a positive number")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise CheckpointError(f"{where}: 'architectures' must be a list of class names, found {architectures!r}")


def transformers_config(config: dict, where: str) -> Any:
    """A transformers config object from an already-checked dict (transformers does not re-read
    the directory: every file goes through the same checks)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not an architecture this transformers version knows; "
            f"checkpoints with custom code (trust_remote_code) are not loaded"
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as err:  # noqa: BLE001  (transformers validates with its own exception types)
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{where}: transformers cannot build a {model_type} config from it "
                              f"({type(err).__name__}: {detail[:300]})") from None


def model_class(config) -> type:
    """The transformers class named by ``config.architectures``, else the causal-LM auto class;
    only model classes (a name that is, say, a tokenizer is refused)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise CheckpointError(
                f"config.json: architectures names {name!r}, which is not a transformers model class; "
                f"write the model's class (e.g. LlamaForCausalLM) there"
            )
        return cls
    auto = transformers.AutoModelForCausalLM
    if type(config) in auto._model_mapping:
        return auto._model_mapping[type(config)]
    return transformers.AutoModel._model_mapping[type(config)]


def build_on_meta(path: Union[str, Path], dtype: Optional[torch.dtype], config: Optional[dict] = None) -> nn.Module:
    """The checkpoint's architecture with every parameter and buffer on ``meta``, in ``dtype``.

    ``config``: the checked ``config.json`` dict (read from ``path`` when not given).
    ``dtype=None`` takes the config's ``dtype`` (``torch_dtype``), else float32.
    """
    config = transformers_config(config if config is not None else read_config(path), f"{Path(path) / 'config.json'}")
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(f"{path}: config.json's dtype {getattr(config, 'dtype', None)!r} is not a float dtype")
    try:
        cls = model_class(config)
    except KeyError:
        raise CheckpointError(
            f"{path}: transformers has no model class for model_type {config.model_type!r} "
            f"(architectures {getattr(config, 'architectures', None)})"
        ) from None
    try:
        with torch.device("meta"):
            model = cls._from_config(config, dtype=dtype)
    except (ValueError, TypeError, RuntimeError, AttributeError, KeyError, IndexError, ZeroDivisionError) as err:
        raise CheckpointError(f"{path}: transformers cannot build {cls.__name__} from its config.json "
                              f"({type(err).__name__}: {err})") from None
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


def mark_quantized(model: nn.Module, method_name: str) -> None:
    """Tell a transformers model it is quantized, the way its own quantizers do (``hf_quantizer``):
    ``save_pretrained`` then refuses with a pointer to ``pymllm_fx.save_quantized`` instead of
    writing tensors no loader would understand, ``.half()`` / ``.float()`` refuse as for any
    quantized model, and ``generate`` still compiles. Other modules are left as they are."""
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import HfQuantizer
    except ImportError:
        return
    if not isinstance(model, PreTrainedModel):
        return

    class _Config:
        quant_method = (f"pymllm_fx ({method_name}), which save_pretrained cannot write: save it with "
                        f"pymllm_fx.save_quantized(model, path, format='awq' | 'gptq' | 'compressed-tensors' | 'fp8')")

        def to_dict(self):
            return {"quant_method": self.quant_method}

    class PymllmFxQuantizer(HfQuantizer):
        def is_serializable(self, safe_serialization=None):
            return False

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    model.hf_quantizer = PymllmFxQuantizer(_Config())
