"""The public entry points: orchestration only, no math."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, TextIO, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from pymllm_fx.calibration import calibration_sequences, gptq_calibrate, vocabulary_size
from pymllm_fx.layers.fused_moe import (
    FusedMoE,
    expert_shape,
    experts_contract,
    own_expert_tensors,
    tensor_parallel_problem,
)
from pymllm_fx.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from pymllm_fx.loading import (
    CheckpointError,
    LoadTarget,
    checkpoint_tensors,
    iter_weights,
    load_weights,
)
from pymllm_fx.loading.files import CheckpointRoot
from pymllm_fx.loading.loader import check_headers
from pymllm_fx.loading.renames import checkpoint_targets, model_names
from pymllm_fx.loading.export import save_quantized  # noqa: F401  (public, re-exported here)
from pymllm_fx.loading.hf import build_on_meta, mark_quantized, materialize_buffers, read_config
# Importing the methods package also registers the checkpoint formats save_quantized writes.
from pymllm_fx.methods.registry import MethodSpec, resolve, resolve_checkpoint
from pymllm_fx.passes import LinearSite, find_linears, swap_linears
from pymllm_fx.passes.siblings import fuse_sibling_storage
from pymllm_fx.passes.siblings import install as install_sibling_fusion
from pymllm_fx.report import Explanation, LayerRow

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


def _plan_experts(model: nn.Module, matmul_params: List[LinearSite], quant_method, skip, tp: "TensorParallel",
                  weights, strict: bool) -> Tuple[Dict[str, Tuple[FusedMoE, nn.Module]], Dict[str, str]]:
    """The experts modules to replace (path -> (its FusedMoE built on meta, the module)) and why the
    others stay float. The graph found them (3-D weights multiplied one expert slice at a time); the
    module's own flags say how it computes, so no model is named here. The meta layers surface the
    method's refusals now and are what a checkpoint's headers are checked against."""
    owners: Dict[str, List[LinearSite]] = {}
    for site in matmul_params:
        if site.experts:
            owners.setdefault(site.path, []).append(site)
    make_method = getattr(quant_method, "experts_method", None)
    plan, reasons = {}, {}
    for path, found in owners.items():
        module = model.get_submodule(path)
        why = experts_contract(module)
        if why is None:  # the site as a swappable one: a skip predicate judges the module, not the graph's note
            why = _pattern_reason(path, skip, dataclasses.replace(found[0], swappable=True, reason=""))
        if why is None and make_method is None:
            why = f"{_name(quant_method)} has no grouped kernel for experts (int8, int4 and fp8 do)"
        if why is None and tp.size > 1:
            why = tensor_parallel_problem(module, tp.size)
        if why is None and weights is not None and getattr(quant_method, "prequantized", False) and make_method is None:
            raise NotImplementedError(
                f"{path}: this checkpoint's experts are stored quantized ({_name(quant_method)}), which pymllm_fx does "
                f"not load yet; load the float model and call quantize(model, 'int4' | 'int8' | 'fp8') instead")
        if why is None:
            try:
                plan[path] = (_build_experts(path, module, make_method(), "meta", tp), module)
            except ValueError as err:
                if strict or tp.size > 1 or getattr(quant_method, "prequantized", False):  # a checkpoint's own experts
                    raise
                why = f"{_name(quant_method)} cannot take them ({err})"
        if why:
            for site in found:
                reasons[site.param] = f"{site.reason}; it stays float: {why}"
    return plan, reasons


def _build_experts(path: str, module: nn.Module, experts_method, device,
                   tp: "TensorParallel" = None) -> FusedMoE:
    tp = tp or TensorParallel()
    num, hidden, inter = expert_shape(module)
    params_dtype = module.down_proj.dtype
    with torch.device(device if device is not None else module.down_proj.device):
        return FusedMoE(num, hidden, inter // tp.size, quant_method=experts_method, params_dtype=params_dtype,
                        has_gate=module.has_gate, has_bias=module.has_bias, prefix=path,
                        tp_rank=tp.rank, tp_size=tp.size, process_group=tp.group if tp.size > 1 else None)


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


def _name(quant_method) -> str:
    return getattr(quant_method, "name", None) or type(quant_method).__name__


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


def from_pretrained(
    path: Union[str, Path],
    *,
    method: Optional[MethodSpec] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    skip: SkipSpec = DEFAULT_SKIP,
    progress: bool = True,
    process_group: Optional[Any] = None,
    strict: bool = False,
    fuse_siblings: bool = True,
) -> nn.Module:
    """A ready quantized transformers model from a local checkpoint directory, in eval mode.

    A quantized checkpoint (AWQ, GPTQ, FP8, compressed-tensors: its ``config.json`` carries a
    ``quantization_config``) loads as it was stored; a float checkpoint needs ``method=`` and is
    quantized while it streams in. The architecture is built on ``meta``, so no float copy of the
    model is ever allocated: peak memory is the quantized model plus one checkpoint tensor.
    Linears the checkpoint stores in float (its skipped layers) stay float. ``device`` defaults
    to CUDA when there is one; ``dtype`` (activations, embeddings, norms) to the config's.
    ``process_group``, ``strict``, ``fuse_siblings``: as for :func:`quantize`; each rank reads the checkpoint and keeps its shards.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, quant_method, skip, _ = _open_checkpoint(Path(path), method, dtype, skip)
    # The graph is captured with everything on meta; buffers no checkpoint holds are made real after.
    quantize(model, quant_method, weights=path, skip=skip, device=device, progress=progress, process_group=process_group,
             strict=strict, fuse_siblings=fuse_siblings)
    materialize_buffers(model, device)
    generation = Path(path) / "generation_config.json"
    if (generation.exists() or generation.is_symlink()) and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        values = CheckpointRoot(Path(path)).read_json(generation, "generation config")
        if not isinstance(values, dict):
            raise CheckpointError(f"{generation}: expected a JSON object, found {type(values).__name__}")
        try:
            model.generation_config = GenerationConfig.from_dict(values)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{generation}: transformers cannot read it ({err})") from None
    return model.eval()


def _open_checkpoint(
    path: Path, method: Optional[MethodSpec], dtype: Optional[torch.dtype], skip: SkipSpec
) -> Tuple[nn.Module, Any, SkipSpec, Dict[str, Any]]:
    """The checkpoint's model on meta, the method that loads it, what to leave float, and its tensors'
    header entries."""
    config = read_config(path)
    stored = config.get("quantization_config")
    if stored is not None and not (isinstance(stored, dict) and isinstance(stored.get("quant_method"), str)):
        raise CheckpointError(
            f"{path / 'config.json'}: quantization_config must be an object with a string 'quant_method', "
            f"found {str(stored)[:80]}"
        )
    if stored is not None and method is not None and resolve(method).name != _stored_name(stored):
        raise ValueError(
            f"{path} is already quantized ({_stored_name(stored)!r} in config.json); drop method= to load it "
            f"as stored (re-quantizing a quantized checkpoint would compound the error)"
        )
    if stored is None and method is None:
        raise ValueError(f"{path} holds float weights (config.json has no quantization_config); pass method=, e.g. 'int4'")
    try:
        quant_method = resolve_checkpoint(stored) if stored is not None else resolve(method)
    except ValueError as err:
        raise CheckpointError(f"{path / 'config.json'}: {err}") from None
    except NotImplementedError as err:  # a feature of the format this library does not have
        raise NotImplementedError(f"{path / 'config.json'}: {err}") from None
    tensors = checkpoint_tensors(path)  # reads only headers: a corrupt file fails before any work
    _check_layer_count(config, tensors, path)
    model = build_on_meta(path, dtype, config)
    _check_modules_present(model, tensors, path)
    if stored is not None:
        skip = _with_float_layers(skip, tensors)
    return model, quant_method, skip, tensors


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _check_layer_count(config: dict, tensors: Dict[str, Any], path: Path) -> None:
    """A config that asks for more layers than any layer stack of the checkpoint holds is refused
    before the model is built (building thousands of empty layers alone takes seconds to minutes)."""
    held = [int(m.group(1)) for name in tensors for m in [_LAYER_INDEX.search(name)] if m]
    if not held:
        return
    most = max(held) + 1
    for key in _LAYER_COUNT_KEYS:
        asked = config.get(key)
        if isinstance(asked, int) and asked > most:
            raise CheckpointError(
                f"{path / 'config.json'}: {key} is {asked} but the checkpoint's tensors hold at most {most} layers; "
                f"the config is not this checkpoint's"
            )


def _check_modules_present(model: nn.Module, tensors: Dict[str, Any], path: Path) -> None:
    """Every module holding weights must have tensors in the checkpoint (tied ones excepted), checked
    on the meta model before the graph is captured or anything is allocated."""
    prefixes = set()
    for name in {*tensors, *model_names(model, tensors)}:
        parts = name.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    found = {id(p) for name, module in model.named_modules() if name in prefixes for p in module.parameters(recurse=False)}
    absent = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and name not in prefixes and not all(id(p) in found for p in own):
            absent.append(name or type(module).__name__)
    if absent:
        raise CheckpointError(
            f"{path}: the checkpoint holds no tensors for {len(absent)} module(s) config.json describes, e.g. "
            f"{absent[:5]}; the config is not this checkpoint's, or the checkpoint is incomplete"
        )


def explain_checkpoint(
    path: Union[str, Path], *, method: Optional[MethodSpec] = None, skip: SkipSpec = DEFAULT_SKIP,
    file: Optional[TextIO] = sys.stdout,
) -> Explanation:
    """What ``from_pretrained(path, method=...)`` would build, from headers alone: no weight is read.

    One row per linear: its method, shape, float size and the bytes the checkpoint stores for it
    (for a float checkpoint, what the method will hold), or why it would stay float.
    """
    path = Path(path)
    model, quant_method, skip, tensors = _open_checkpoint(path, method, None, skip)
    sites = find_linears(model)
    dry = {site.path: _build_layer(site, quant_method, "meta") for site in sites if skip_reason(site, skip) is None}
    experts, _ = _plan_experts(model, [s for s in sites if s.param], quant_method, skip, TensorParallel(), path,
                               strict=False)
    _check_fits(model, dry, tensors, path, experts)
    report = Explanation()
    named = dict(model.named_parameters(remove_duplicate=False))
    for expert_path, (layer, module) in experts.items():
        num, hidden, inter = expert_shape(module)
        rows = (2 if module.has_gate else 1) * inter
        report.rows.append(LayerRow(
            expert_path, _name(quant_method), layer.quant_method.describe(layer),
            f"{num} x ({rows} x {hidden} + {hidden} x {inter})", layer.float_bytes(),
            _calibrated_expert_bytes(expert_path, module, quant_method) if not getattr(quant_method, "prequantized", False)
            else sum(p.numel() * p.element_size() for p in layer.parameters())))  # stacked as stored
    for site in sites:
        if site.param and site.path in experts:
            continue
        float_bytes = (site.in_features + site.bias) * site.out_features * site.dtype.itemsize
        if site.param:  # a matmul weight outside nn.Linear (fused experts, XLNet's q/k/v)
            weight = named[site.param]
            float_bytes = weight.numel() * weight.element_size()
        reason = skip_reason(site, skip)
        if reason is not None:
            shape = " x ".join(map(str, named[site.param].shape)) if site.param else f"{site.out_features} x {site.in_features}"
            report.rows.append(LayerRow(site.param or site.path, "-", f"stays float: {reason}", shape,
                                        float_bytes, float_bytes))
            continue
        layer = dry[site.path]
        if getattr(quant_method, "prequantized", False):
            stored = sum(info.nbytes for name, info in tensors.items() if name.rpartition(".")[0] == site.path)
        else:
            stored = _calibrated_bytes(site, quant_method)
        describe = getattr(quant_method, "describe", None)
        report.rows.append(LayerRow(site.path, _name(quant_method), describe(layer) if describe else "",
                                    f"{site.out_features} x {site.in_features}", float_bytes, stored))
    on_disk = sum(info.nbytes for info in tensors.values())
    saved = report.linear_bytes_before - report.linear_bytes_after
    prequantized = getattr(quant_method, "prequantized", False)
    report.model_bytes_before = on_disk + saved if prequantized else on_disk
    report.model_bytes_after = on_disk if prequantized else on_disk - saved
    if file is not None:
        print(report.table(), file=file)
    return report


def _calibrated_expert_bytes(path: str, module: nn.Module, quant_method) -> int:
    """Bytes the method holds for an experts module once calibrated, from one real expert (each
    expert stores the same)."""
    num, hidden, inter = expert_shape(module)
    with torch.device("cpu"):
        layer = FusedMoE(1, hidden, inter, quant_method=quant_method.experts_method(), params_dtype=module.down_proj.dtype,
                         has_gate=module.has_gate, has_bias=module.has_bias, prefix=path)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_() if param.dtype.is_floating_point else param.zero_()
    layer.quant_method.process_weights_after_loading(layer)
    return num * sum(t.numel() * t.element_size() for t in layer.parameters())


def _calibrated_bytes(site: LinearSite, quant_method, rows: int = 16) -> int:
    """Bytes the method holds for ``site`` once calibrated, from a real layer of ``rows`` output rows.

    Every calibrating method stores per output row (codes, scales, zeros, bias), so the size is
    linear in the row count; this avoids allocating the whole float weight just to measure it.
    """
    rows = min(rows, site.out_features)
    with torch.device("cpu"):
        layer = ReplicatedLinear(site.in_features, rows, bias=site.bias, params_dtype=site.dtype, quant_method=quant_method)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_() if param.dtype.is_floating_point else param.zero_()
    quant_method.process_weights_after_loading(layer)
    size = sum(t.numel() * t.element_size() for t in layer.parameters())
    return size * site.out_features // rows


def _stored_name(quantization_config: Any) -> str:
    return str(quantization_config.get("quant_method", "?")).lower() if isinstance(quantization_config, dict) else "?"


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _with_float_layers(skip: SkipSpec, tensors: Dict[str, Any]) -> Callable[[LinearSite], Optional[str]]:
    """``skip`` plus every linear the checkpoint stores as a plain float weight (and bias) only. The
    checkpoint decides over the default skip: a quantized ``lm_head`` (GPTQ ``lm_head: true``) loads
    quantized; patterns the caller passed still apply."""
    by_layer: Dict[str, Dict[str, Any]] = {}
    for name, info in tensors.items():
        layer, _, leaf = name.rpartition(".")
        by_layer.setdefault(layer, {})[leaf] = info
    chosen = skip != DEFAULT_SKIP
    skip = _normalize_skip(skip)

    def predicate(site: LinearSite) -> Optional[str]:
        stored = by_layer.get(site.path, {})
        if set(stored) <= {"weight", "bias"} and "weight" in stored and stored["weight"].dtype in _FLOAT_DTYPES:
            return "stored as a float weight in the checkpoint"
        if stored and not chosen:
            return None
        return skip_reason(site, skip)

    return predicate


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (size 1: no parallelism)."""

    group: Any = None
    rank: int = 0
    size: int = 1


def tensor_parallel_position(process_group: Optional[Any] = None) -> TensorParallel:
    """The group to shard over: the one given, else the default group if torch.distributed is up;
    ``False``: none (a whole model in one process of a distributed job)."""
    import torch.distributed as dist

    if process_group is False:
        return TensorParallel()
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return TensorParallel()
        process_group = dist.group.WORLD
    return TensorParallel(process_group, dist.get_rank(process_group), dist.get_world_size(process_group))


def _build_layer(site: LinearSite, quant_method, device, tp: TensorParallel = TensorParallel()) -> nn.Module:
    common = dict(bias=site.bias, params_dtype=site.dtype, quant_method=quant_method, prefix=site.path)
    style = site.parallel if tp.size > 1 else "replicated"
    if style == "column" and site.head_dim and (site.out_features // site.head_dim) % tp.size:
        raise ValueError(
            f"{site.path}: its {site.out_features // site.head_dim} heads of {site.head_dim} cannot be split evenly "
            f"over tensor-parallel size {tp.size} (replicating key/value heads of separate k/v projections is not "
            f"supported); use a tensor-parallel size that divides the number of key/value heads"
        )
    with torch.device(device if device is not None else site.device):
        if style == "column":
            layer = ColumnParallelLinear(site.in_features, site.out_features, tp_rank=tp.rank, tp_size=tp.size, **common)
        elif style == "row":
            layer = RowParallelLinear(site.in_features, site.out_features, tp_rank=tp.rank, tp_size=tp.size,
                                      process_group=tp.group, **common)
        else:
            layer = ReplicatedLinear(site.in_features, site.out_features, **common)
    layer.checkpoint_transposed = site.kind == "conv1d"
    return layer


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
    return _pattern_reason(site.path, skip, site)


def _pattern_reason(path: str, skip: SkipSpec, site: LinearSite) -> Optional[str]:
    """Why ``skip`` (patterns or a predicate, given ``site``) leaves the module at ``path`` float."""
    skip = _normalize_skip(skip)
    if callable(skip):
        verdict = skip(site)  # True, or the reason as text
        return verdict if isinstance(verdict, str) and verdict else ("skipped by the skip predicate" if verdict else None)
    leaf = path.rpartition(".")[2]
    parts = path.split(".")
    enclosing = [".".join(parts[:i]) for i in range(1, len(parts))]
    for pattern in skip:
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(leaf, pattern):
            return f"matches skip pattern {pattern!r}"
        inside = next((p for p in enclosing if fnmatch.fnmatchcase(p, pattern)), None)
        if inside is not None:
            return f"inside {inside}, which matches skip pattern {pattern!r}"
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


def _load_checkpoint(
    model: nn.Module,
    layers: Dict[str, nn.Module],
    weights: Union[str, Path],
    headers: Dict[str, Any],
    progress: bool,
    device: Optional[Union[str, torch.device]] = None,
    experts: Optional[Dict[str, Tuple[nn.Module, nn.Module]]] = None,
) -> None:
    """Load every tensor of the model from a checkpoint (``headers``: its ``checkpoint_tensors``); the
    model's own tensors are staged until all fit.

    Tensors still on ``meta`` (a model built without weights) are staged on ``device`` and become
    the model's parameters at the end; real ones are copied in place, keeping their device.
    """
    experts = experts or {}
    targets = _layer_targets(layers)
    replaced = set(layers) | set(experts)
    staged: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def stage(name: str, tensor: torch.Tensor, required: bool, finite: bool = True) -> None:
        if id(tensor) not in staged:
            where = tensor.device
            if where.type == "meta":
                if device is None:
                    raise ValueError(f"{name} is on the meta device; pass device= to say where to load it")
                where = torch.device(device)
            staged[id(tensor)] = (tensor, torch.empty_like(tensor, device=where))
        targets[name] = LoadTarget(staged[id(tensor)][1], required=required, owner=name.rpartition(".")[0], finite=finite)

    for name, param in model.named_parameters(remove_duplicate=False):
        if name.rpartition(".")[0] not in replaced:
            stage(name, param, required=True)
    for name, buffer in model.named_buffers():
        if name.rpartition(".")[0] not in replaced:
            # Buffers computed at construction (non-persistent) may still be in old checkpoints.
            stage(name, buffer, required=_is_persistent(model, name) and buffer.device.type == "meta", finite=False)
    targets.update(checkpoint_targets(model, targets, headers, experts))
    seen = set()
    stream = tqdm(iter_weights(weights), desc="loading", unit="tensor", disable=not progress)
    try:
        load_weights(targets, ((seen.add(name) or name, tensor) for name, tensor in stream))
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}\nThe model was left unchanged.") from None
    filled = {id(targets[name].param) for name in seen if name in targets}
    for layer in [*layers.values(), *(layer for layer, _ in experts.values())]:  # before the model changes
        layer.quant_method.process_weights_after_loading(layer)
    new_params: Dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, (tensor, value) in staged.items():
            if id(value) not in filled:
                continue  # an optional buffer the checkpoint does not hold keeps its value
            if tensor.device.type == "meta":
                is_param = isinstance(tensor, nn.Parameter)
                new_params[key] = nn.Parameter(value, requires_grad=tensor.requires_grad) if is_param else value
            else:
                tensor.copy_(value)
    _rebind(model, new_params)


def _check_fits(model: nn.Module, dry: Dict[str, nn.Module], tensors: Dict[str, Any], weights,
                experts: Optional[Dict[str, Tuple[nn.Module, nn.Module]]] = None) -> None:
    """The checkpoint's headers against what the model would allocate (see ``check_headers``)."""
    experts = experts or {}
    targets = _load_targets(model, {**dry, **{path: layer for path, (layer, _) in experts.items()}})
    targets.update(checkpoint_targets(model, targets, tensors, experts))
    try:
        check_headers(targets, tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}\nNothing was allocated and the model was left unchanged.") from None


def _layer_targets(layers: Dict[str, nn.Module]) -> Dict[str, LoadTarget]:
    """Checkpoint name -> parameter, for the new layers (a Conv1D's weight arrives transposed)."""
    targets: Dict[str, LoadTarget] = {}
    for path, layer in layers.items():
        if isinstance(layer, FusedMoE):  # its targets follow the checkpoint's names (checkpoint_targets)
            continue
        for name, param in layer.named_parameters():
            transform = (lambda t: t.t()) if (layer.checkpoint_transposed and name == "weight") else None
            targets[f"{path}.{name}"] = LoadTarget(param, transform=transform, owner=path)
    return targets


def _load_targets(model: nn.Module, layers: Dict[str, nn.Module]) -> Dict[str, LoadTarget]:
    """Every name a checkpoint must (or may) hold for ``model`` with ``layers`` swapped in; the
    parameters are the tensors as they are now (meta, for the check before allocation)."""
    targets = _layer_targets(layers)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.rpartition(".")[0] not in layers:
            targets[name] = LoadTarget(param, owner=name.rpartition(".")[0])
    for name, buffer in model.named_buffers():
        if name.rpartition(".")[0] not in layers:
            required = _is_persistent(model, name) and buffer.device.type == "meta"
            targets[name] = LoadTarget(buffer, required=required, owner=name.rpartition(".")[0], finite=False)
    return targets


def _rebind(model: nn.Module, new: Dict[int, torch.Tensor]) -> None:
    """Point every name of a replaced tensor (tied weights share one) at its new value."""
    if not new:
        return
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[name] = new[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and id(buffer) in new:
                module._buffers[name] = new[id(buffer)]


def _is_persistent(model: nn.Module, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    return leaf not in module._non_persistent_buffers_set


