"""``"compressed-tensors"``: load llm-compressor checkpoints (the ``compressed-tensors`` format).

The ``quantization_config`` holds ``config_groups``, each a scheme (``weights`` and
``input_activations`` arguments) applied to the layers its ``targets`` name, an ``ignore`` list of
layers left in float, and the storage ``format`` (top level, or per group when "mixed-precision").
One :class:`CompressedTensorsLinearMethod` serves the whole model: ``create_weights`` matches the
layer's module path (``layer.prefix``) and class against the targets as compressed-tensors does
(exact name first, then ``re:<regex>`` names, then class names, ``"Linear"`` naming every
pymllm_fx linear layer; ``ignore`` wins over all) and hands the layer to that group's scheme, kept
on the layer as ``layer.scheme``. Every later call goes to that scheme.

Schemes and their checkpoint tensors (N = out features, K = in features):

``pack-quantized`` int weights, 4 or 8 bits, activations left in float: see
``compressed_tensors_packed.py`` (``weight_packed``, ``weight_scale``, ``weight_zero_point``,
``weight_shape``, ``weight_g_idx``).

``float-quantized`` (or ``naive-quantized``) e4m3 weights with e4m3 activations: see
``fp8_checkpoint.py`` (``weight``, ``weight_scale`` per tensor or channel, ``input_scale`` when
static; strategy "block" (the FP8_BLOCK preset): ``weight_scale`` one per ``block_structure``
block, activations dynamic per token and group of the block's K size).

``int-quantized`` int8 weights with int8 activations (the W8A8 preset; dynamic per-token or
static per-tensor activations, symmetric or, static only, with ``input_zero_point``): see
``w8a8.py`` (``weight`` int8, ``weight_scale``, ``input_scale``, ``input_zero_point``).

``float-quantized`` e4m3 weights without ``input_activations`` (fp8 weight-only; "tensor" or
"channel" scales) run on ``w8a16_linear``, activations left in float (``fp8_checkpoint.py``).

Anything else (asymmetric dynamic int8 activations, tensor-group strategies, sparsity,
transforms, kv-cache schemes) raises NotImplementedError naming it.

Writing: ``CompressedTensorsLinearMethod.checkpoint_config`` / ``checkpoint_tensors`` (the writer
extension of ``layers/quantize_base.py``) write any pymllm_fx layer back in these schemes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from pymllm_fx.kernels.w4a16 import pack_words
from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import FusedMoEMethodBase
from pymllm_fx.layers.quantize_base import LinearMethodBase, UnquantizedLinearMethod
from pymllm_fx.loading.formats import Site, refuse
from pymllm_fx.methods.common import LeftFloat, config_pattern
from pymllm_fx.methods.compressed_tensors_packed import PackedIntLinearMethod
from pymllm_fx.methods.config_keys import COMPRESSED_TENSORS_KEYS, check_producer_keys
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod, Fp8WeightOnlyLinearMethod
from pymllm_fx.methods.w8a8 import W8A8CheckpointLinearMethod

# The compressed-tensors release whose format the writer follows; compressed-tensors drops the key
# when it loads a config.
COMPRESSED_TENSORS_VERSION = "0.12.2"
STRATEGIES = ("tensor", "channel", "group", "block", "token", "tensor_group", "attn_head")
ARGS_KEYS = (
    "num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
    "observer", "observer_kwargs", "scale_dtype", "zp_dtype",
)
GROUP_KEYS = ("targets", "weights", "input_activations", "output_activations", "format")
TOP_KEYS = (
    "config_groups", "format", "ignore", "kv_cache_scheme", "quantization_status", "global_compression_ratio",
    "sparsity_config", "transform_config", "version", "run_compressed",
)


class _RefusedExperts(FusedMoEMethodBase):
    """Experts a checkpoint's config gives no loadable scheme: refused when the layer is built."""

    name = "compressed-tensors"
    prequantized = True

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def create_weights(self, layer, *args, **kwargs) -> None:
        raise NotImplementedError(f"{getattr(layer, 'prefix', '') or 'experts'}: {self.reason}; load the float model "
                                  f"and call quantize(model, method)")

    def apply(self, layer, x, topk_ids, topk_weights) -> torch.Tensor:
        raise NotImplementedError(self.reason)



# --- the whole-model method ---------------------------------------------------------------------


def _name_matches(path: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], path) is not None
    return path == target


def _class_matches(layer: torch.nn.Module, target: str) -> bool:
    names = {cls.__name__ for cls in type(layer).__mro__}
    return target in names or (target == "Linear" and "LinearBase" in names)


@dataclass
class CompressedTensorsLinearMethod(LinearMethodBase):
    """Every layer of a compressed-tensors checkpoint, each with the scheme its config group gives it."""

    # target -> (config group name, scheme), in the config's order; a target listed by two groups
    # keeps its first position and the later group's scheme, as compressed-tensors does.
    targets: Dict[str, Tuple[str, LinearMethodBase]] = field(default_factory=dict)
    ignore: Tuple[str, ...] = ()

    name = "compressed-tensors"
    prequantized = True  # loads a checkpoint; quantize() without weights= is refused

    def scheme_for(self, layer: torch.nn.Module) -> Tuple[str, LinearMethodBase]:
        """``(config group name or "", scheme)`` for ``layer``, by its module path and class."""
        path = getattr(layer, "prefix", "")
        for entry in self.ignore:
            if _name_matches(path, entry) or _class_matches(layer, entry):
                return "", LeftFloat(f"compressed-tensors ignore {entry!r}")
        exact = [t for t in self.targets if not t.startswith("re:") and path == t]
        regex = [t for t in self.targets if t.startswith("re:") and _name_matches(path, t)]
        by_class = [t for t in self.targets if _class_matches(layer, t)]
        for target in exact + regex + by_class:
            return self.targets[target]
        return "", LeftFloat("no compressed-tensors config group targets it")

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
        group, scheme = self.scheme_for(layer)
        layer.scheme = scheme
        layer.scheme_group = group
        scheme.create_weights(
            layer, input_size_per_partition, output_partition_sizes, input_size, output_size, params_dtype,
            **extra_weight_attrs,
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.scheme.process_weights_after_loading(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return layer.scheme.apply(layer, x, bias)

    def checkpoint_view(self, layer: torch.nn.Module, where: str) -> Optional[Quantized]:
        """This layer in checkpoint terms, for ``save_quantized`` (the optional hook of ``quantize_base.py``)."""
        scheme = layer.scheme  # the group's scheme answers, as it runs the layer
        if isinstance(scheme, UnquantizedLinearMethod):
            return None
        view = getattr(scheme, "checkpoint_view", None)
        if view is None:
            raise ValueError(f"{where}: save_quantized does not know how to export layers quantized with "
                             f"{type(scheme).__name__}; skip this layer when quantizing, or give the scheme a "
                             f"checkpoint_view (pymllm_fx/layers/quantize_base.py)")
        return view(layer, where)

    def describe(self, layer: torch.nn.Module) -> str:
        text = layer.scheme.describe(layer)
        return f"{layer.scheme_group}: {text}" if layer.scheme_group else text

    def experts_method(self) -> FusedMoEMethodBase:
        """Experts take the scheme of the config group that targets ``Linear`` (every per-expert
        projection is a Linear to the tools that wrote the checkpoint), as vLLM chooses it."""
        if "Linear" not in self.targets:
            return _RefusedExperts(
                f"no compressed-tensors config group targets 'Linear' (targets: {sorted(self.targets)[:4]}), and "
                f"pymllm_fx gives experts the 'Linear' group's scheme")
        group, scheme = self.targets["Linear"]
        make = getattr(scheme, "experts_method", None)
        if make is None:
            return _RefusedExperts(f"config group {group!r} ({type(scheme).__name__}) has no experts layout here")
        method = make()
        method.name, method.ignore = self.name, self.ignore
        return method

    @classmethod
    def from_config(cls, config: dict) -> "CompressedTensorsLinearMethod":
        check_producer_keys(cls.name, config, TOP_KEYS, COMPRESSED_TENSORS_KEYS)
        if config.get("kv_cache_scheme") is not None:
            raise NotImplementedError(
                "compressed-tensors: kv_cache_scheme is not supported (its k/v scales have no home here); "
                "use a checkpoint exported without kv-cache quantization"
            )
        sparsity = config.get("sparsity_config") or {}
        if sparsity and sparsity.get("format", "dense") != "dense":
            raise NotImplementedError(
                f"compressed-tensors: sparsity format {sparsity.get('format')!r} is not supported"
            )
        if config.get("transform_config"):
            raise NotImplementedError("compressed-tensors: transform_config (rotations) is not supported")
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors: quantization_config has no config_groups")
        targets: Dict[str, Tuple[str, LinearMethodBase]] = {}
        for group_name, group in groups.items():
            scheme = _scheme_from_group(group_name, group, config.get("format"))
            for target in group["targets"]:
                targets[target] = (group_name, scheme)
        ignore = config.get("ignore") or ()
        if isinstance(ignore, str):
            ignore = (ignore,)
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(i, str) for i in ignore):
            raise ValueError(f"compressed-tensors: 'ignore' must be a list of module names or 're:' patterns, found {ignore!r}")
        for where, pattern in [("ignore", i) for i in ignore] + [("targets", t) for t in targets]:
            if pattern.startswith("re:"):
                config_pattern(cls.name, f"quantization_config {where} entry", pattern[3:])
        return cls(targets=targets, ignore=tuple(ignore))

    # --- writing (the checkpoint-writer extension of quantize_base.py) ---
    # llm-compressor (``compressors/quantized_compressors/pack_quantized.py`` ``pack_to_int32``,
    # ``quantization/quant_config.py``, ``ModelCompressor.update_config``): int4 / int8 ``pack-quantized``
    # (group or channel), W8A8 int8 ``int-quantized`` (``weight`` int8, ``weight_scale``, static
    # ``input_scale`` / ``input_zero_point``) and fp8 ``float-quantized`` (tensor, channel or block weight
    # scales; dynamic per-token / per-tensor / per-group or static activations). One config group per
    # distinct scheme, targets ``["Linear"]`` when there is a single scheme (and no GPT-2 ``Conv1D``,
    # whose class is not "Linear"), else the module names.

    @classmethod
    def checkpoint_config(cls, sites: List[Site], floats: List[str]) -> dict:
        """llm-compressor's ``quantization_config``: one config group per distinct scheme."""
        fmt = cls.name
        groups: Dict[str, Tuple[dict, List[str]]] = {}
        for site in sites:
            scheme = _written_scheme(site)
            groups.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(site.name)
        by_name = len(groups) > 1 or any(site.conv1d for site in sites)
        experts = {site.name for site in sites if site.expert}
        with_experts = [i for i, (_, names) in enumerate(groups.values()) if experts & set(names)]
        if len(with_experts) > 1:
            raise ValueError(f"cannot write {fmt!r}: its readers give every expert the scheme of the group that "
                             f"targets 'Linear', but these experts have {len(with_experts)} schemes; use format='gptq' "
                             f"or 'awq'")
        config_groups = {}
        for i, (scheme, names) in enumerate(groups.values()):
            # Experts are matched by class ("Linear"), the other layers by name when there are several schemes.
            targets = [name for name in names if name not in experts] + (["Linear"] if i in with_experts else [])
            config_groups[f"group_{i}"] = {**scheme, "targets": targets if by_name else ["Linear"]}
        formats = {scheme["format"] for scheme, _ in groups.values()}
        return {
            "quant_method": "compressed-tensors", "version": COMPRESSED_TENSORS_VERSION,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": list(floats),
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
        }

    @staticmethod
    def checkpoint_tensors(site: Site, config: dict) -> Dict[str, torch.Tensor]:
        """``pack-quantized`` (``weight_packed``, ``weight_scale``, ``weight_zero_point``, ``weight_shape``),
        ``int-quantized`` or ``float-quantized`` (``weight``, ``weight_scale``, ``input_scale``)."""
        q, n, k = site.q, site.n, site.k
        if q.kind == "fp8":
            out = {"weight": q.weight.t() if site.conv1d else q.weight}
            tensor = q.weight_strategy == "tensor" and site.per_tensor
            if q.block_size is not None:
                out["weight_scale"] = q.scales.float()
            else:
                out["weight_scale"] = q.scales.float()[:1] if tensor else q.scales.float().reshape(n, 1)
            if q.input_scale is not None:
                out["input_scale"] = q.input_scale.float().reshape(1)
            return out
        if q.kind == "w8a8":
            tensor = q.weight_strategy == "tensor" and site.per_tensor
            out = {"weight": q.weight.t() if site.conv1d else q.weight,
                   "weight_scale": q.scales[:1] if tensor else q.scales.reshape(n, 1)}
            if q.input_scale is not None:
                out["input_scale"] = q.input_scale.reshape(1)
            if q.input_zero_point is not None:
                out["input_zero_point"] = q.input_zero_point.to(torch.int8).reshape(1)
            return out
        if q.kind == "int8":
            packed, scale = pack_words(q.weight.to(torch.int32) + 128, 8), q.scales.reshape(n, 1)
        else:
            packed, scale = pack_words(q.weight, 4), q.scales  # the stored value q + 8 is the runtime code
        out = {"weight_packed": packed, "weight_scale": scale}
        if q.kind == "int4" and q.zeros is not None:  # zero_point + 8, packed along the outputs
            out["weight_zero_point"] = pack_words(q.zeros.t(), 4).t()
        if q.kind == "int4" and q.g_idx is not None:
            out["weight_g_idx"] = q.g_idx
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        return out


def _written_scheme(site: Site) -> dict:
    """The config group (less its targets) that holds ``site`` exactly; refuses a site none holds."""
    q, fmt = site.q, CompressedTensorsLinearMethod.name
    if q.kind == "int4":
        if q.zeros is not None and q.group_size != -1 and site.k % q.group_size:
            raise refuse(site, fmt, f"in_features={site.k} is not a multiple of group_size {q.group_size}, "
                         f"and compressed-tensors sizes asymmetric zero points by whole groups", "use format='gptq'")
        strategy = "channel" if q.group_size == -1 else "group"
        weights = _ct_args(4, "int", q.zeros is None, strategy, None if strategy == "channel" else q.group_size)
        if q.g_idx is not None:  # act-order: the group of each input in weight_g_idx
            weights["actorder"] = "group"
        return {"weights": weights, "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    if q.kind == "int8":
        weights = _ct_args(8, "int", True, "channel", None)
        return {"weights": weights, "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    if q.kind == "w8a8":  # the W8A8 preset (dynamic) or its static variant
        strategy = "tensor" if q.weight_strategy == "tensor" and site.per_tensor else "channel"
        if q.activation == "static":
            acts = _ct_args(8, "int", q.input_zero_point is None, "tensor", None, dynamic=False)
            if q.input_zero_point is not None:
                acts["zp_dtype"] = "torch.int8"  # what compressed-tensors serializes for asymmetric int8
        else:
            acts = _ct_args(8, "int", True, "token", None, dynamic=True)
        return {"weights": _ct_args(8, "int", True, strategy, None), "input_activations": acts,
                "output_activations": None, "format": "int-quantized"}
    if q.block_size is not None:  # the FP8_BLOCK scheme
        weights = {**_ct_args(8, "float", True, "block", None), "block_structure": list(q.block_size)}
        acts = _ct_args(8, "float", True, "group", q.block_size[1], dynamic=True)
        return {"weights": weights, "input_activations": acts, "output_activations": None, "format": "float-quantized"}
    strategy = "tensor" if q.weight_strategy == "tensor" and site.per_tensor else "channel"
    if q.activation == "none":  # fp8 weight-only
        return {"weights": _ct_args(8, "float", True, strategy, None), "input_activations": None,
                "output_activations": None, "format": "float-quantized"}
    if q.activation == "static":
        acts = _ct_args(8, "float", True, "tensor", None, dynamic=False)
    else:
        acts = _ct_args(8, "float", True, q.activation, None, dynamic=True)
    return {"weights": _ct_args(8, "float", True, strategy, None), "input_activations": acts,
            "output_activations": None, "format": "float-quantized"}


def _ct_args(bits: int, kind: str, symmetric: bool, strategy: str, group_size: Optional[int], dynamic: bool = False) -> dict:
    """compressed-tensors ``QuantizationArgs`` as ``model_dump`` writes them."""
    return {
        "num_bits": bits, "type": kind, "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
        "block_structure": None, "dynamic": dynamic, "actorder": None,
        "observer": None if dynamic else "minmax", "observer_kwargs": {},
    }


# --- config parsing -------------------------------------------------------------------------------


def _scheme_from_group(group_name: str, group: Any, default_format: Optional[str]) -> LinearMethodBase:
    where = f"compressed-tensors config_groups[{group_name!r}]"
    if not isinstance(group, dict):
        raise NotImplementedError(
            f"{where} is {group!r}, a preset scheme name with its targets; write the scheme out in full "
            f"(targets, weights, input_activations) as a saved checkpoint's config.json does"
        )
    unknown = sorted(set(group) - set(GROUP_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; accepted keys: {sorted(GROUP_KEYS)}")
    targets = group.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets) or not targets:
        raise ValueError(
            f"{where}: 'targets' must be a non-empty list of module names, 're:' patterns or class names"
        )
    if group.get("output_activations") is not None:
        raise NotImplementedError(f"{where}: output_activations quantization is not supported")
    fmt = group.get("format") or default_format
    if fmt is None or fmt == "mixed-precision":
        raise ValueError(f"{where}: no storage format; set 'format' on the group or at the top level")
    if group.get("weights") is None:
        raise NotImplementedError(f"{where}: activation-only quantization (no 'weights') is not supported")
    weights = _parse_args(f"{where}.weights", group["weights"])
    acts = group.get("input_activations")
    acts = None if acts is None else _parse_args(f"{where}.input_activations", acts)

    if weights["type"] == "int" and acts is not None:
        return _w8a8_scheme(where, fmt, weights, acts)
    if weights["type"] == "int":
        if fmt != "pack-quantized":
            raise NotImplementedError(f"{where}: int weights load from format 'pack-quantized', not {fmt!r}")
        # actorder "group" (alias "dynamic", or true) stores weight_g_idx for group strategies only.
        actorder = weights["actorder"] in ("group", "dynamic", True) and weights["strategy"] == "group"
        if weights["dynamic"]:
            raise NotImplementedError(f"{where}: dynamic weight quantization is not supported")
        return PackedIntLinearMethod(
            num_bits=weights["num_bits"], strategy=weights["strategy"],
            group_size=int(weights["group_size"]) if weights["strategy"] == "group" else None,
            symmetric=weights["symmetric"], actorder=actorder,
        )

    if fmt not in ("float-quantized", "naive-quantized"):
        raise NotImplementedError(f"{where}: float weights load from format 'float-quantized', not {fmt!r}")
    if weights["num_bits"] != 8 or not weights["symmetric"] or weights["dynamic"]:
        raise NotImplementedError(f"{where}: float weights load only as static symmetric 8-bit (e4m3)")
    if weights["strategy"] not in ("tensor", "channel", "block"):
        raise NotImplementedError(
            f"{where}: fp8 weight strategy {weights['strategy']!r} is not supported; use 'tensor', 'channel' or 'block'"
        )
    if acts is None:
        if weights["strategy"] not in ("tensor", "channel"):
            raise NotImplementedError(f"{where}: fp8 weight-only weights load with strategy 'tensor' or 'channel', "
                                      f"not {weights['strategy']!r}")
        return Fp8WeightOnlyLinearMethod(weight_strategy=weights["strategy"])
    if acts["type"] != "float" or acts["num_bits"] != 8 or not acts["symmetric"]:
        raise NotImplementedError(f"{where}: fp8 weights need symmetric 8-bit float input_activations")
    if weights["strategy"] == "block":
        method = Fp8CheckpointLinearMethod.for_blocks(weights["block_structure"], scale_name="weight_scale")
        group = method.weight_block_size[1]
        if not acts["dynamic"] or acts["strategy"] != "group" or acts["group_size"] != group:
            raise NotImplementedError(
                f"{where}: block-wise fp8 weights (block_structure {weights['block_structure']}) run with dynamic "
                f"input_activations of strategy 'group', group_size {group} (the FP8_BLOCK scheme); this scheme has "
                f"strategy {acts['strategy']!r}, group_size {acts['group_size']}, dynamic={acts['dynamic']}"
            )
        return method
    if acts["dynamic"] and acts["strategy"] in ("token", "tensor"):
        scheme, strategy = "dynamic", acts["strategy"]
    elif not acts["dynamic"] and acts["strategy"] == "tensor":
        scheme, strategy = "static", "tensor"
    else:
        raise NotImplementedError(
            f"{where}: input_activations strategy {acts['strategy']!r} (dynamic={acts['dynamic']}) is not "
            f"supported; use dynamic 'token' or 'tensor', or static 'tensor'"
        )
    return Fp8CheckpointLinearMethod(
        activation_scheme=scheme, activation_strategy=strategy, weight_strategy=weights["strategy"]
    )


def _w8a8_scheme(where: str, fmt: str, weights: Dict[str, Any], acts: Dict[str, Any]) -> W8A8CheckpointLinearMethod:
    """int8 weights with int8 input activations (the W8A8 preset, ``int-quantized``)."""
    scheme = f"W{weights['num_bits']}A{acts['num_bits']} ({weights['type']} weights, {acts['type']} activations)"
    if fmt not in ("int-quantized", "naive-quantized"):
        raise NotImplementedError(f"{where}: {scheme} loads from format 'int-quantized', not {fmt!r}")
    if weights["num_bits"] != 8 or acts["num_bits"] != 8 or acts["type"] != "int":
        raise NotImplementedError(f"{where}: {scheme} is not supported; int weights with quantized activations "
                                  f"load as W8A8 int8 (8-bit int weights and 8-bit int input_activations)")
    if not weights["symmetric"] or weights["dynamic"] or weights["actorder"] not in (None, False, "weight", "static"):
        raise NotImplementedError(f"{where}: W8A8 int8 weights load only as static symmetric weights without "
                                  f"activation ordering (the W8A8 preset)")
    if weights["strategy"] not in ("channel", "tensor"):
        raise NotImplementedError(f"{where}: W8A8 int8 weight strategy {weights['strategy']!r} is not supported; "
                                  f"use 'channel' (the W8A8 preset) or 'tensor'")
    if acts["dynamic"] is True and acts["strategy"] == "token":
        if not acts["symmetric"]:
            raise NotImplementedError(
                f"{where}: asymmetric dynamic int8 input_activations (a scale and zero point per token from its "
                f"min and max) are not supported; use symmetric dynamic (the W8A8 preset) or static activations"
            )
        scheme_name = "dynamic"
    elif acts["dynamic"] is False and acts["strategy"] == "tensor":
        scheme_name = "static"
    else:
        raise NotImplementedError(
            f"{where}: W8A8 int8 input_activations strategy {acts['strategy']!r} (dynamic={acts['dynamic']}) is not "
            f"supported; use dynamic 'token' (the W8A8 preset) or static 'tensor'"
        )
    return W8A8CheckpointLinearMethod(
        activation_scheme=scheme_name, input_symmetric=acts["symmetric"], weight_strategy=weights["strategy"]
    )


def _parse_args(where: str, args: Any) -> Dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` with their defaults filled and the strategy inferred."""
    if not isinstance(args, dict):
        raise ValueError(f"{where} must be a dict of quantization arguments, got {args!r}")
    unknown = sorted(set(args) - set(ARGS_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; accepted keys: {sorted(ARGS_KEYS)}")
    for key, kinds in (("num_bits", int), ("type", str), ("symmetric", bool), ("dynamic", (bool, str)),
                       ("strategy", str), ("group_size", int), ("actorder", (bool, str))):
        value = args.get(key)
        if value is not None and (not isinstance(value, kinds) or (kinds is int and isinstance(value, bool))):
            raise ValueError(f"{where}: {key!r} must be {getattr(kinds, '__name__', 'bool or str')}, found {value!r}")
    out = {
        "num_bits": int(args.get("num_bits", 8)),
        "type": str(args.get("type", "int")).lower(),
        "symmetric": bool(args.get("symmetric", True)),
        "group_size": args.get("group_size"),
        "strategy": args.get("strategy"),
        "block_structure": args.get("block_structure"),
        "dynamic": args.get("dynamic", False),
        "actorder": args.get("actorder"),
    }
    if out["type"] not in ("int", "float"):
        raise ValueError(f"{where}: type {out['type']!r} is not 'int' or 'float'")
    group_size = out["group_size"]
    if out["strategy"] is None:  # inferred from group_size, as compressed-tensors does
        out["strategy"] = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    out["strategy"] = str(out["strategy"]).lower()
    if out["strategy"] not in STRATEGIES:
        raise ValueError(
            f"{where}: unknown strategy {out['strategy']!r}; compressed-tensors strategies are "
            f"{', '.join(STRATEGIES)}"
        )
    if out["strategy"] == "group" and (group_size is None or int(group_size) <= 0):
        raise ValueError(f"{where}: strategy 'group' needs a positive group_size, got {group_size!r}")
    if isinstance(out["actorder"], str):
        out["actorder"] = out["actorder"].lower()
    return out
