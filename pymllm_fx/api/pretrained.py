"""from_pretrained() and explain_checkpoint(): a checkpoint directory opened on meta (its config,
its method, its float layers, checked against its tensors' headers), then loaded through quantize
or described from the headers alone."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TextIO, Tuple, Union

import torch
from torch import nn

from pymllm_fx.api.checkpoint import _check_fits
from pymllm_fx.api.plan import (
    DEFAULT_SKIP,
    SkipSpec,
    TensorParallel,
    _build_layer,
    _name,
    _normalize_skip,
    _plan_experts,
    skip_reason,
)
from pymllm_fx.api.quantize_model import quantize
from pymllm_fx.layers.fused_moe import FusedMoE, expert_shape
from pymllm_fx.layers.linear import ReplicatedLinear
from pymllm_fx.loading import CheckpointError, checkpoint_tensors
from pymllm_fx.loading.files import CheckpointRoot
from pymllm_fx.loading.hf import build_on_meta, materialize_buffers, read_config
from pymllm_fx.loading.renames import model_names
from pymllm_fx.methods.registry import MethodSpec, resolve, resolve_checkpoint
from pymllm_fx.passes import LinearSite, find_linears
from pymllm_fx.report import Explanation, LayerRow

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
