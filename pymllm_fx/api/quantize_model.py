"""quantize(): a model's linears (and experts) replaced by quantized layers, all or nothing.

(Named quantize_model, not quantize, so that ``pymllm_fx.api.quantize`` stays the function and
this module stays reachable by its own dotted name.)"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from pymllm_fx.api.checkpoint import _check_fits, _load_checkpoint
from pymllm_fx.api.plan import (
    DEFAULT_SKIP,
    SkipSpec,
    TensorParallel,
    _build_experts,
    _build_layer,
    _name,
    _normalize_skip,
    _plan_experts,
    skip_reason,
    tensor_parallel_position,
)
from pymllm_fx.calibration import calibration_sequences, gptq_calibrate, vocabulary_size
from pymllm_fx.layers.fused_moe import own_expert_tensors
from pymllm_fx.loading import CheckpointError, LoadTarget, checkpoint_tensors, load_weights
from pymllm_fx.loading.hf import mark_quantized
# Importing the methods package also registers the checkpoint formats save_quantized writes.
from pymllm_fx.methods.registry import MethodSpec, resolve
from pymllm_fx.passes import LinearSite, find_linears, swap_linears
from pymllm_fx.passes.siblings import fuse_sibling_storage
from pymllm_fx.passes.siblings import install as install_sibling_fusion

def quantize(
    model: nn.Module,
    method: MethodSpec,
    *,
    weights: Optional[Union[str, Path]] = None,
    skip: SkipSpec = DEFAULT_SKIP,
    device: Optional[Union[str, torch.device]] = None,
    example_inputs: Optional[Any] = None,
    progress: bool = True,
    process_group: Optional[Any] = None,
    strict: bool = False,
    fuse_siblings: bool = True,
    shard_init: Optional[Callable[[LinearSite, nn.Module], None]] = None,
    calibration: Optional[Any] = None,
) -> nn.Module:
    """Quantize every linear layer of ``model`` in place and return it.

    ``method``: a registry name (``"int8"``, ``"int4"``, ``"fp8"``, ``"none"``), an HF
    ``quantization_config`` dict, or a ``LinearMethodBase`` instance. ``weights=None`` quantizes
    the model's own float weights; a safetensors path loads the whole model's tensors from there.
    ``skip``: module-path patterns (fnmatch, matched against the path, its last name, and every
    enclosing module's path, so ``"lm_head"`` also leaves ``lm_head.dense`` float) or a predicate
    (returning True, or the reason as text); embeddings are never linears, and weights tied to
    another parameter are skipped.
    ``strict=False``: a layer the method cannot take (int4 needs in_features a multiple of 8) stays
    float with a warning and an ``explain()`` row; ``strict=True`` makes it an error instead.
    ``process_group``: tensor parallelism over a torch.distributed group (default: the default
    group when torch.distributed is initialized, else none; ``False`` for none). The graph decides each layer's role:
    column-parallel where a row-parallel layer consumes its output (q/k/v, gate/up), row-parallel
    (all-reduced) where its input is a column-parallel output (o_proj, down_proj), replicated
    otherwise. Each rank keeps only its shard; embeddings, norms and skipped layers stay whole.
    ``fuse_siblings``: quantized layers that read the same input (q/k/v, gate/up) store their
    tensors in one buffer (each layer's parameters are views into it), so that under
    ``torch.compile`` they run as one GEMM and a split; eager runs are unchanged either way.
    Mixture-of-experts blocks: a module whose stacked 3-D weights the graph multiplies one expert
    at a time, and that declares transformers' experts interface, becomes a ``FusedMoE`` layer run
    by the method's grouped kernel (int8, int4, fp8); other expert weights stay float, with a warning.
    ``shard_init(site, layer)``: for a model built on the meta device (too large to hold whole),
    fills each new layer's float parameters, already this rank's shard on ``device`` (its rows or
    columns follow from ``layer.tp_rank`` / ``tp_size`` and each parameter's ``output_dim`` /
    ``input_dim``), instead of loading the model's own weights; each layer is filled and quantized
    before the next is built, so no whole float model is ever allocated. The model's other tensors
    (embeddings, norms, skipped layers) stay on meta for the caller to fill. Random-weight
    benchmarks of models larger than one device use it.
    ``calibration``: for GPTQ (``{"quant_method": "int4", "gptq": True, "group_size": 128, "sym": True,
    "desc_act": False}``), the calibration data: a list of token-id tensors (1-D, or 2-D with one
    sequence per row) or ``(texts, tokenizer)``, one sequence per text. The model's decoder blocks
    are calibrated one at a time, on a GPU when there is one (``calibration.py``); the model itself
    changes only at the end, like any quantize.
    On any error the model is left exactly as it was.
    """
    _check_model(model)
    tp = tensor_parallel_position(process_group)
    skip = _normalize_skip(skip)
    quant_method = resolve(method)
    sequences = _check_calibration(model, quant_method, calibration, weights, tp)
    if getattr(quant_method, "prequantized", False) and weights is None:
        raise ValueError(
            f"method {_name(quant_method)!r} loads an already-quantized checkpoint: pass "
            f"weights=<checkpoint path> (the model's own float weights cannot be converted to it)"
        )
    sites = find_linears(model, example_inputs)
    matmul_params = [site for site in sites if site.param]
    sites = [site for site in sites if not site.param]
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no linear layers (nn.Linear or transformers Conv1D) to quantize"
        )
    plan = [site for site in sites if skip_reason(site, skip) is None]
    expert_plan, expert_reasons = _plan_experts(model, matmul_params, quant_method, skip, tp, weights, strict)
    if not plan and not expert_plan:  # a checkpoint may quantize the experts alone
        reasons = "; ".join(f"{s.path}: {skip_reason(s, skip)}" for s in sites[:5])
        done = sum(hasattr(m, "quant_method") for m in model.modules())
        already = f"; {done} layers are already quantized by pymllm_fx (quantize the original model instead)" if done else ""
        raise ValueError(f"every linear layer of {type(model).__name__} is skipped ({reasons}){already}; nothing to quantize")

    # A dry run on meta: create_weights errors surface before any real work, and a checkpoint's
    # headers are held against every parameter's shape before anything is allocated.
    dry, refused = {}, {}
    for site in plan:
        try:
            dry[site.path] = _build_layer(site, quant_method, "meta", tp)
        except ValueError as err:
            # A few odd layers (in_features 2 in Swin-v2's position-bias MLP) stay float rather than
            # refusing the model; not for a checkpoint's own quantized layers or under tensor parallelism.
            if strict or tp.size > 1 or getattr(quant_method, "prequantized", False):
                raise
            refused[site.path] = f"{_name(quant_method)} cannot take it ({err})"
    if refused:
        if not dry and not expert_plan:
            raise ValueError(f"{_name(quant_method)} can take no linear layer of {type(model).__name__}: "
                             + "; ".join(f"{p}: {r}" for p, r in list(refused.items())[:3]))
        warnings.warn(f"pymllm_fx: {len(refused)} layer(s) stay float, {_name(quant_method)} cannot take them: "
                      + "; ".join(f"{path}" for path in list(refused)[:5]) + (" ..." if len(refused) > 5 else "")
                      + " (see explain(model); strict=True makes this an error)", stacklevel=2)
        plan = [site for site in plan if site.path in dry]
    if shard_init is not None:
        _check_shard_init(quant_method, weights, device, expert_plan)
    headers = None
    if weights is not None:
        headers = checkpoint_tensors(weights)  # read once: checked against the model here, loaded below
        _check_fits(model, dry, headers, weights, expert_plan)
    if sequences is not None:  # GPTQ: every planned layer's codes first; the model is untouched until the swap
        results = gptq_calibrate(model, plan, quant_method, sequences, device, progress)
        quant_method = dataclasses.replace(quant_method, results=results)
    build = functools.partial(_build_layer, quant_method=quant_method, device=device, tp=tp)
    if weights is None:
        layers = _quantize_own_weights(model, plan, build, progress, shard_init)
        expert_layers = _quantize_own_experts(model, {path: m for path, (_, m) in expert_plan.items()}, quant_method,
                                              device, progress, tp)
    else:
        layers = {site.path: build(site) for site in plan}
        experts = {path: (_build_experts(path, m, quant_method.experts_method(), device, tp), m)
                   for path, (_, m) in expert_plan.items()}
        _load_checkpoint(model, layers, weights, headers, progress, device, experts)  # processes the experts too
        expert_layers = {}
        for path, (layer, module) in experts.items():
            layer.adopt(module)
            expert_layers[path] = layer
    for layer in layers.values():
        layer.refresh_weight_view()
    swap_linears(model, {**layers, **expert_layers})
    if fuse_siblings:
        if fuse_sibling_storage(model, _sibling_groups(sites, layers))["fused"]:
            install_sibling_fusion()
    left_float = {site.path: skip_reason(site, skip) for site in sites if skip_reason(site, skip) is not None}
    _record_float_layers(model, {**left_float, **refused})
    still_float = [site for site in matmul_params if site.path not in expert_layers]
    _record_float_params(model, {site.param: expert_reasons.get(site.param, site.reason) for site in still_float})
    _warn_unswapped([site for site in sites if not site.swappable], still_float, model)
    mark_quantized(model, _name(quant_method))
    return model


def _check_calibration(model: nn.Module, quant_method, calibration, weights, tp: "TensorParallel"):
    """The calibration sequences a method that needs them gets (None for the others), checked
    before anything else runs."""
    needs = getattr(quant_method, "needs_calibration", False)
    if not needs:
        if calibration is not None:
            raise ValueError(f"calibration= is used by GPTQ only ({{'quant_method': 'int4', 'gptq': True, ...}}); "
                             f"{_name(quant_method)!r} calibrates from the weights alone: drop calibration= or ask for GPTQ")
        return None
    if calibration is None:
        raise ValueError("GPTQ needs calibration data: pass calibration=[token-id tensors] or calibration=(texts, "
                         "tokenizer), or use {'quant_method': 'int4'} without 'gptq' for calibration-free int4")
    if weights is not None:
        raise ValueError("GPTQ calibrates the float model in memory, not a checkpoint: load the model (transformers' "
                         "from_pretrained), then call quantize(model, method, calibration=...) without weights=")
    if tp.size > 1:
        raise NotImplementedError("GPTQ calibration under tensor parallelism is not supported: calibrate in one process, "
                                  "save_quantized(format='gptq'), then load with from_pretrained on every rank")
    return calibration_sequences(calibration, vocabulary_size(model))


def _quantize_own_experts(model: nn.Module, plan: Dict[str, nn.Module], quant_method, device,
                          progress: bool, tp: "TensorParallel" = None) -> Dict[str, nn.Module]:
    """Build, load and calibrate one experts layer at a time from the module's float weights."""
    layers: Dict[str, nn.Module] = {}
    problems = []
    for path, module in tqdm(plan.items(), desc="quantizing experts", unit="layer", disable=not progress or not plan):
        if module.down_proj.device.type == "meta":
            raise ValueError(f"{path}: the model's weights are on the meta device; pass weights=<checkpoint path>")
        layer = _build_experts(path, module, quant_method.experts_method(), device, tp)
        targets = {name: LoadTarget(param, owner=path) for name, param in layer.named_parameters()}
        try:
            load_weights(targets, own_expert_tensors(module, layer.tp_rank, layer.tp_size).items())
        except CheckpointError as err:
            problems.append(f"{path}: {err}")
            continue
        layer.quant_method.process_weights_after_loading(layer)
        layer.adopt(module)
        layers[path] = layer
    if problems:
        raise CheckpointError("quantization failed; the model was left unchanged.\n" + "\n".join(problems))
    return layers


def _check_shard_init(quant_method, weights, device, expert_plan: Dict[str, nn.Module]) -> None:
    """``shard_init`` fills float weights that the method then calibrates, on a device the caller names."""
    if weights is not None:
        raise ValueError("pass either weights=<checkpoint path> or shard_init=, not both")
    if getattr(quant_method, "prequantized", False):
        raise ValueError(f"shard_init fills float weights, but {_name(quant_method)!r} loads an already-quantized "
                         f"checkpoint; use a method that calibrates (none, int8, int4, fp8)")
    if device is None or torch.device(device).type == "meta":
        raise ValueError("shard_init needs device= (where each layer's shard is made), not the meta device")
    if getattr(quant_method, "needs_calibration", False):
        raise ValueError("shard_init fills each layer as it is built, but GPTQ calibrates the whole float model's "
                         "blocks first: build the model with its weights, or use calibration-free int4")
    if expert_plan:
        raise NotImplementedError(f"shard_init does not fill experts yet ({', '.join(list(expert_plan)[:3])}); "
                                  f"build the model with real weights instead")


def _sibling_groups(sites: List[LinearSite], layers: Dict[str, nn.Module]) -> List[List[str]]:
    """Groups of sites that read one input, in graph order, with at least one swapped member."""
    order = {site.path: i for i, site in enumerate(sites)}
    groups = {tuple(sorted({site.path, *site.siblings}, key=lambda p: order.get(p, len(order))))
              for site in sites if site.siblings and site.path in layers}
    return [list(g) for g in sorted(groups, key=lambda g: order.get(g[0], len(order)))]


FLOAT_LAYERS_ATTR = "_pymllm_fx_float_layers"  # {module path: why it stayed float}, read by explain()


def _record_float_layers(model: nn.Module, reasons: Dict[str, str]) -> None:
    known = dict(getattr(model, FLOAT_LAYERS_ATTR, {}) or {})
    known.update(reasons)
    object.__setattr__(model, FLOAT_LAYERS_ATTR, known)


FLOAT_PARAMS_ATTR = "_pymllm_fx_float_params"  # {parameter name: why}: matmul weights outside nn.Linear


def _record_float_params(model: nn.Module, reasons: Dict[str, str]) -> None:
    known = dict(getattr(model, FLOAT_PARAMS_ATTR, {}) or {})
    known.update(reasons)
    object.__setattr__(model, FLOAT_PARAMS_ATTR, known)


def _warn_unswapped(layers: List[LinearSite], params: List[LinearSite], model: nn.Module) -> None:
    """One warning for every linear the forward uses (or might use) that stays float for want of a
    safe swap, and for matmul weights outside nn.Linear: never silent."""
    parts = []
    if layers:
        shown = "; ".join(f"{site.path} ({site.reason})" for site in layers[:3])
        parts.append(f"{len(layers)} linear layer(s) stay float: {shown}" + (" ..." if len(layers) > 3 else ""))
    if params:
        named = dict(model.named_parameters(remove_duplicate=False))
        size = sum(named[site.param].numel() * named[site.param].element_size() for site in params if site.param in named)
        shown = ", ".join(site.param for site in params[:3])
        parts.append(f"{len(params)} matmul weight(s) outside nn.Linear stay float ({size / 2**20:.1f} MiB: {shown}"
                     + (" ..." if len(params) > 3 else "") + ")")
    if parts:
        warnings.warn("pymllm_fx: " + "; ".join(parts) + ". explain(model) lists them with the reasons",
                      stacklevel=3)


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
    model: nn.Module, plan: List[LinearSite], build: Callable[[LinearSite], nn.Module], progress: bool,
    shard_init: Optional[Callable[[LinearSite, nn.Module], None]] = None,
) -> Dict[str, nn.Module]:
    """Build, load (or fill through ``shard_init``) and calibrate one layer at a time, so at most one
    extra float weight is alive."""
    problems = []
    layers: Dict[str, nn.Module] = {}
    for site in tqdm(plan, desc="quantizing", unit="layer", disable=not progress):
        if shard_init is not None:
            layer = layers[site.path] = build(site)
            with torch.no_grad():
                shard_init(site, layer)
            layer.quant_method.process_weights_after_loading(layer)
            continue
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
