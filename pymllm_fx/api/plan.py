"""What becomes of each linear site, shared by quantize and explain_checkpoint: the skip rules,
this process's tensor-parallel position, and the new layers (built on meta for the dry run, or for
real), experts included."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from pymllm_fx.layers.fused_moe import FusedMoE, expert_shape, experts_contract, tensor_parallel_problem
from pymllm_fx.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from pymllm_fx.passes import LinearSite

DEFAULT_SKIP: Tuple[str, ...] = ("lm_head",)
SkipSpec = Union[Iterable[str], Callable[[LinearSite], bool]]


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


def _name(quant_method) -> str:
    return getattr(quant_method, "name", None) or type(quant_method).__name__
