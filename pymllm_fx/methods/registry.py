"""Quantization methods by name, and from an HF ``quantization_config`` dict."""

from __future__ import annotations

from typing import Dict, Type, Union

from pymllm_fx.layers.quantize_base import LinearMethodBase, UnquantizedLinearMethod
from pymllm_fx.methods.awq import AWQLinearMethod
from pymllm_fx.methods.common import check_config_keys
from pymllm_fx.methods.compressed_tensors import CompressedTensorsLinearMethod
from pymllm_fx.methods.fp8 import Fp8LinearMethod
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod
from pymllm_fx.methods.gptq import GPTQLinearMethod
from pymllm_fx.methods.int4 import Int4LinearMethod
from pymllm_fx.methods.int4_gptq import GPTQInt4LinearMethod
from pymllm_fx.methods.int8 import Int8LinearMethod
from pymllm_fx.methods.w8a8 import W8A8LinearMethod


class _NoneMethod(UnquantizedLinearMethod):
    name = "none"

    def describe(self, layer) -> str:
        return "unquantized"

    @classmethod
    def from_config(cls, config: dict) -> "_NoneMethod":
        check_config_keys(cls.name, config, ())
        return cls()


METHODS: Dict[str, Type[LinearMethodBase]] = {
    "none": _NoneMethod,
    "int8": Int8LinearMethod,
    "int4": Int4LinearMethod,
    "fp8": Fp8LinearMethod,
    "w8a8": W8A8LinearMethod,
    "awq": AWQLinearMethod,
    "gptq": GPTQLinearMethod,
    "compressed-tensors": CompressedTensorsLinearMethod,
}

# A checkpoint's quantization_config names how its tensors were stored, which for "fp8" is not
# the calibrating method of that name: its layers already hold e4m3 weights and their scales.
CHECKPOINT_METHODS: Dict[str, Type[LinearMethodBase]] = {**METHODS, "fp8": Fp8CheckpointLinearMethod}

MethodSpec = Union[str, dict, LinearMethodBase]


def method_names() -> list:
    return sorted(METHODS)


def resolve(method: MethodSpec) -> LinearMethodBase:
    """A method instance from a registry name, an HF ``quantization_config`` dict, or an instance."""
    if isinstance(method, LinearMethodBase):
        return method
    if isinstance(method, str):
        return _lookup(method).from_config({})
    if isinstance(method, dict):
        if "quant_method" not in method:
            raise ValueError(
                f"quantization_config has no 'quant_method' key (got keys {sorted(method)}); "
                f"expected one of {method_names()}"
            )
        cls = _lookup(method["quant_method"])
        if cls is Int4LinearMethod and "gptq" in method:  # int4 rounded by GPTQ from calibration data
            cls = GPTQInt4LinearMethod
        return cls.from_config(dict(method))
    raise TypeError(
        f"method must be a name ({', '.join(method_names())}), a quantization_config dict or a "
        f"LinearMethodBase instance, got {type(method).__name__}"
    )


def _lookup(name: str) -> Type[LinearMethodBase]:
    key = str(name).lower()
    if key not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; valid names: {', '.join(method_names())}")
    return METHODS[key]


def resolve_checkpoint(quantization_config: dict) -> LinearMethodBase:
    """The method that loads a checkpoint whose ``config.json`` carries ``quantization_config``."""
    if not isinstance(quantization_config, dict) or "quant_method" not in quantization_config:
        raise ValueError(
            f"quantization_config must be a dict with a 'quant_method' key, got {quantization_config!r}"
        )
    name = str(quantization_config["quant_method"]).lower()
    if name not in CHECKPOINT_METHODS:
        raise ValueError(
            f"quant_method {quantization_config['quant_method']!r} is not a checkpoint format pymllm_fx reads; "
            f"readable: {', '.join(sorted(n for n in CHECKPOINT_METHODS if n != 'none'))}"
        )
    return CHECKPOINT_METHODS[name].from_config(dict(quantization_config))
