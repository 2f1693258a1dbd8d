"""The public entry points: orchestration only, no math."""

from __future__ import annotations

import fnmatch
import functools
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.loading import (
    CheckpointError,
    LoadTarget,
    iter_weights,
    load_weights,
)
from pymllm_fx.methods.registry import MethodSpec, resolve
from pymllm_fx.passes import LinearSite, find_linears, swap_linears

DEFAULT_SKIP: Tuple[str, ...] = ("lm_head",)
SkipSpec = Union[Iterable[str], Callable[[LinearSite], bool]]


def quantize(
    model: nn.Module,
    method: MethodSpec,
    *,
    weights: Optional[Union[str, Path]] = None,
    skip: SkipSpec = DEFAULT_SKIP,
    device: Optional[Union[str, torch.device]] = None,
    example_inputs: Optional[Any] = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize every linear layer of ``model`` in place and return it.

    ``method``: a registry name (``"int8"``, ``"int4"``, ``"fp8"``, ``"none"``), an HF
    ``quantization_config`` dict, or a ``LinearMethodBase`` instance. ``weights=None`` quantizes
    the model's own float weights; a safetensors path loads the whole model's tensors from there.
    ``skip``: module-path patterns (fnmatch, matched against the path and its last name) or a
    predicate; embeddings are never linears, and weights tied to another parameter are skipped.
    On any error the model is left exactly as it was.
    """
    _check_model(model)
    skip = _normalize_skip(skip)
    quant_method = resolve(method)
    if getattr(quant_method, "prequantized", False) and weights is None:
        raise ValueError(
            f"method {quant_method.name!r} loads an already-quantized checkpoint: pass "
            f"weights=<checkpoint path> (the model's own float weights cannot be converted to it)"
        )
    sites = find_linears(model, example_inputs)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no linear layers (nn.Linear or transformers Conv1D) to quantize"
        )
    plan = [site for site in sites if skip_reason(site, skip) is None]
    if not plan:
        reasons = "; ".join(f"{s.path}: {skip_reason(s, skip)}" for s in sites[:5])
        done = sum(hasattr(m, "quant_method") for m in model.modules())
        already = f"; {done} layers are already quantized by pymllm_fx (quantize the original model instead)" if done else ""
        raise ValueError(f"every linear layer of {type(model).__name__} is skipped ({reasons}){already}; nothing to quantize")

    for site in plan:  # a dry run on meta: create_weights errors surface before any real work
        _build_layer(site, quant_method, "meta")
    build = functools.partial(_build_layer, quant_method=quant_method, device=device)
    if weights is None:
        layers = _quantize_own_weights(model, plan, build, progress)
    else:
        layers = {site.path: build(site) for site in plan}
        _load_checkpoint(model, plan, layers, weights, progress)
    swap_linears(model, layers)
    return model


def _build_layer(site: LinearSite, quant_method, device) -> nn.Module:
    with torch.device(device if device is not None else site.device):
        return ReplicatedLinear(
            site.in_features, site.out_features, bias=site.bias, params_dtype=site.dtype,
            quant_method=quant_method, prefix=site.path,
        )


def _normalize_skip(skip: Optional[SkipSpec]) -> Union[Tuple[str, ...], Callable[[LinearSite], bool]]:
    """A tuple of patterns or a predicate; a lone string is one pattern, None skips nothing extra."""
    if skip is None:
        return ()
    if callable(skip):
        return skip
    if isinstance(skip, str):
        return (skip,)
    try:
        patterns = tuple(skip)
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"skip must be a module-path pattern, a list of patterns (e.g. ['lm_head', '*.mlp.*']) or a "
            f"predicate taking a LinearSite, got {skip!r}"
        )
    return patterns


def skip_reason(site: LinearSite, skip: SkipSpec) -> Optional[str]:
    """Why ``site`` is left unquantized, or None to quantize it."""
    if not site.swappable:
        return site.reason
    if site.tied_to:
        return f"weight tied to {', '.join(site.tied_to)}; quantizing it would untie them"
    if not site.dtype.is_floating_point:
        return f"weight dtype {site.dtype} is not floating point"
    skip = _normalize_skip(skip)
    if callable(skip):
        return "skipped by the skip predicate" if skip(site) else None
    leaf = site.path.rpartition(".")[2]
    for pattern in skip:
        if fnmatch.fnmatchcase(site.path, pattern) or fnmatch.fnmatchcase(leaf, pattern):
            return f"matches skip pattern {pattern!r}"
    return None


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() takes an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters; nothing to quantize")
    if not any(p.dtype.is_floating_point for p in params):
        dtypes = sorted({str(p.dtype) for p in params})
        raise TypeError(
            f"{type(model).__name__} has no floating-point parameters (found {dtypes}); quantize a float "
            f"model (float32, float16 or bfloat16)"
        )


def _own_tensors(module: nn.Module, site: LinearSite):
    """The float weights of the module being replaced, in the (out, in) layout of a linear."""
    weight = module.weight.detach()
    yield "weight", weight.t() if site.kind == "conv1d" else weight
    if module.bias is not None:
        yield "bias", module.bias.detach()


def _quantize_own_weights(
    model: nn.Module, plan: List[LinearSite], build: Callable[[LinearSite], nn.Module], progress: bool
) -> Dict[str, nn.Module]:
    """Build, load and calibrate one layer at a time, so at most one extra float weight is alive."""
    problems = []
    layers: Dict[str, nn.Module] = {}
    for site in tqdm(plan, desc="quantizing", unit="layer", disable=not progress):
        old = model.get_submodule(site.path)
        if old.weight.device.type == "meta":
            raise ValueError(
                f"{site.path}: the model's weights are on the meta device; pass weights=<checkpoint path>"
            )
        layer = layers[site.path] = build(site)
        targets = {name: LoadTarget(param, owner=site.path) for name, param in layer.named_parameters()}
        try:
            load_weights(targets, _own_tensors(old, site))
        except CheckpointError as err:
            problems.append(f"{site.path}: {err}")
            continue
        layer.quant_method.process_weights_after_loading(layer)
    if problems:
        raise CheckpointError("quantization failed; the model was left unchanged.\n" + "\n".join(problems))
    return layers


def _load_checkpoint(
    model: nn.Module, plan: List[LinearSite], layers: Dict[str, nn.Module], weights: Union[str, Path], progress: bool
) -> None:
    """Load every tensor of the model from a checkpoint; the model's own tensors are staged until all fit."""
    targets: Dict[str, LoadTarget] = {}
    replaced = set(layers)
    conv1d = {site.path for site in plan if site.kind == "conv1d"}
    for path, layer in layers.items():
        for name, param in layer.named_parameters():
            transform = (lambda t: t.t()) if (path in conv1d and name == "weight") else None
            targets[f"{path}.{name}"] = LoadTarget(param, transform=transform, owner=path)
    staged: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.rpartition(".")[0] in replaced:
            continue
        if id(param) not in staged:
            staged[id(param)] = (param, torch.empty_like(param))
        targets[name] = LoadTarget(staged[id(param)][1], owner=name.rpartition(".")[0])
    for name, buffer in model.named_buffers():
        if name.rpartition(".")[0] not in replaced and _is_persistent(model, name):
            staged[id(buffer)] = (buffer, torch.empty_like(buffer))
            targets[name] = LoadTarget(staged[id(buffer)][1], required=False, owner=name.rpartition(".")[0])
    stream = tqdm(iter_weights(weights), desc="loading", unit="tensor", disable=not progress)
    try:
        load_weights(targets, stream)
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}\nThe model was left unchanged.") from None
    for layer in layers.values():
        layer.quant_method.process_weights_after_loading(layer)
    with torch.no_grad():
        for tensor, value in staged.values():
            tensor.copy_(value)


def _is_persistent(model: nn.Module, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    return leaf not in module._non_persistent_buffers_set


