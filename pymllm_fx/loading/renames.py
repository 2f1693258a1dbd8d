"""A checkpoint's names for a transformers model's tensors, by transformers' own conversion rules.

transformers 5 renames some checkpoint keys as it loads them (Mixtral's ``block_sparse_moe`` is
the model's ``mlp``, PhiMoE's ``gate`` its ``router``) and merges per-expert tensors
(``experts.3.w1.weight``, ``experts.3.gate_proj.weight``) into stacked experts
(``experts.gate_up_proj``, gate rows first). ``get_model_conversion_mapping`` gives those rules
for any model instance, so nothing here names a model: the rules become extra load targets, one
per checkpoint name, pointing at the tensor (or, for an expert, the rows of the stacked tensor)
it fills.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from pymllm_fx.layers.fused_moe import STACKED_NAMES, stacked_in_layout
from pymllm_fx.loading.loader import LoadTarget
from pymllm_fx.loading.safetensors_io import CheckpointError

_EXPERT = re.compile(r"experts\.(\d+)\.")
# The conversions that stack per-expert tensors as they are (transformers' operation names).
_MERGES = (["MergeModulelist"], ["MergeModulelist", "Concatenate"])


def _rules(model: nn.Module):
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers before 5: checkpoints carry the model's own names
        return None
    try:
        rules = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001  (a model transformers has no rules for)
        return None
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    return rename_source_key, renamings, converters


def model_names(model: nn.Module, names: Iterable[str]) -> List[str]:
    """The names transformers would load ``names`` under in ``model`` (a per-expert tensor: the
    stacked tensor it merges into)."""
    rules = _rules(model)
    if rules is None:
        return list(names)
    rename, renamings, converters = rules
    return [rename(name, renamings, converters)[0] for name in names]


def checkpoint_targets(model: nn.Module, targets: Dict[str, LoadTarget], names: Iterable[str],
                       experts: Dict[str, Tuple[nn.Module, nn.Module]]) -> Dict[str, LoadTarget]:
    """Targets under the checkpoint's own ``names``: an alias of the model's target for every name
    transformers renames onto one, and for ``experts`` (path -> (FusedMoE layer, the transformers
    experts module it replaces)) a target for each per-expert or stacked tensor, plus one required
    target per expert and projection, so that a missing expert is reported by name."""
    rules = _rules(model)
    out: Dict[str, LoadTarget] = {}
    stacked_names, unstacked = set(), set()
    for name in names:
        if name in targets:
            continue
        if rules is None:
            new, source = name, None
        else:
            rename, renamings, converters = rules
            new, source = rename(name, renamings, converters)
        path, _, leaf = new.rpartition(".")
        param_name = STACKED_NAMES.get(leaf)
        stem, _, suffix = name.rpartition(".")
        if rules is not None and suffix != "weight" and (path not in experts or not param_name):
            # a quantized projection (experts.3.w1.qweight): named as its ".weight" would be. In
            # transformers 5.17 the source patterns are not anchored at the end (5.24's are), so
            # ".weight_scale" matches ".weight" and renames to a stack that does not exist ("gate_up_proj_scale")
            base, base_source = rename(f"{stem}.weight", renamings, converters)
            base_path, _, base_leaf = base.rpartition(".")
            if base_source is not None and base_path in experts and base_leaf in STACKED_NAMES:
                new, source, path, leaf = base, base_source, base_path, base_leaf
                param_name = STACKED_NAMES[leaf].replace("weight", suffix)
        converter = None if source is None else next(
            c for c in rules[2] if source in getattr(c, "_original_source_patterns", ()))
        if path in experts and param_name:
            layer, module = experts[path]
            out[name] = _expert_target(name, path, leaf, param_name, layer, module, source, converter)
            if out[name].shard_id is None:
                stacked_names.add((path, param_name))
        elif converter is not None and new in targets:  # experts left float: their own stacked tensor
            out[name] = _float_expert_target(name, new, targets, source, converter)
            unstacked.add(new)
        elif new != name and new in targets:
            out[name] = targets[new]
    for new in unstacked:  # required expert by expert instead of as the whole stack
        whole = targets[new]
        targets[new] = LoadTarget(whole.param, whole.shard_id, whole.transform, False, whole.owner, whole.finite)
        param, sources = whole.param, _sources_of(new, rules)
        rows = param.shape[1] // len(sources)
        stack, _, leaf = new.rpartition(".")
        for expert in range(param.shape[0]):
            for i, role in enumerate(sources):
                short = role.rpartition("*.")[2].removesuffix(".weight")  # ".experts.*.w3.weight" -> "w3"
                out[f"{stack}.{expert}.{short} (stacked into {leaf})"] = LoadTarget(
                    param, shard_id=(expert, i * rows), owner=whole.owner)
    for path, (layer, module) in experts.items():
        for bias in ("w13_bias", "w2_bias"):  # stacked in every checkpoint that has them: required whole
            if getattr(layer, bias, None) is not None:
                out.setdefault(f"{path}.{bias} (the experts' stacked bias)", LoadTarget(getattr(layer, bias), owner=path))
        for param_name, roles in _required_roles(layer, module).items():
            if (path, param_name) in stacked_names or getattr(layer, param_name, None) is None:
                continue
            for expert in range(layer.num_experts):
                for role, offset in roles:
                    out[f"{path}.{expert}.{role} (stacked into {param_name})"] = LoadTarget(
                        getattr(layer, param_name), shard_id=(expert, offset), owner=path)
    return out


def _sources_of(stacked: str, rules) -> List[str]:
    """The per-expert source patterns transformers merges into the stacked tensor ``stacked``."""
    for converter in rules[2]:
        targets = getattr(converter, "_original_target_patterns", ())
        if any(stacked.endswith(t.lstrip(".*")) for t in targets):
            return list(converter._original_source_patterns)
    return ["weight"]


def _float_expert_target(name: str, new: str, targets: Dict[str, LoadTarget], source: str, converter) -> LoadTarget:
    """One expert's projection into the stacked float tensor of an experts module that stays float."""
    whole = targets[new]
    param, sources = whole.param, converter._original_source_patterns
    slot = _expert_slot(name, new, converter, source, param.shape[0], param.shape[1] // len(sources))
    return LoadTarget(param, shard_id=slot, owner=whole.owner, numel=param[0].numel() // len(sources))


def _expert_slot(name: str, stack: str, converter, source: str, num_experts: int, rows: int,
                 convertible: bool = True) -> Tuple[int, int]:
    """``(expert, first row)`` that one expert's projection ``name`` fills in the stacked tensor
    ``stack``: transformers stacks the experts in order (MergeModulelist) and concatenates their
    projections (Concatenate), ``rows`` rows each. Any other conversion, or one the caller cannot
    place (``convertible=False``), is refused."""
    ops = [type(op).__name__ for op in converter.operations]
    if ops not in _MERGES or not convertible:
        raise CheckpointError(
            f"{name}: transformers merges it into {stack} by {' + '.join(ops)}, a layout pymllm_fx does not "
            f"convert per expert; load the model with transformers and call quantize(model, method)")
    found = _EXPERT.search(name)
    if found is None or int(found.group(1)) >= num_experts:
        raise CheckpointError(f"{name}: no expert {found.group(1) if found else '?'} in {stack} ({num_experts} experts)")
    return int(found.group(1)), list(converter._original_source_patterns).index(source) * rows


def _required_roles(layer, module) -> Dict[str, List[Tuple[str, int]]]:
    """Every stacked tensor of the layer a checkpoint fills expert by expert, with its projections
    and their first output feature (biases come stacked, or not at all)."""
    part = layer.intermediate_size_per_partition
    w13 = [("gate", 0), ("up", part)] if layer.has_gate else [("up", 0)]
    return {name: (w13 if name.startswith("w13_") else [("down", 0)])
            for name, _ in layer.named_parameters(recurse=False) if not name.endswith("_bias")}


def _expert_target(name: str, path: str, leaf: str, param_name: str, layer, module, source: Optional[str],
                   converter) -> LoadTarget:
    """One checkpoint tensor of an experts module: a stacked tensor (the module's own layout) or one
    expert's projection (an ``nn.Linear`` weight ``(out, in)``, cut to this rank's share, or a
    quantized projection's tensor, which its parameter's loader places)."""
    param = getattr(layer, param_name, None)
    if param is None:
        raise CheckpointError(f"{name}: {path} has no {param_name} for this checkpoint's {leaf}")
    rank, size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    if source is None:  # the whole stack, as the module stores it
        return LoadTarget(param, transform=lambda t: stacked_in_layout(module, leaf, t, rank, size), owner=path)
    sources = converter._original_source_patterns
    convertible = not (leaf.endswith("_bias") or module.is_transposed or
                       (len(sources) == 2 and not getattr(module, "is_concatenated", True)))
    slot = _expert_slot(name, f"{path}.{leaf}", converter, source, layer.num_experts,
                        layer.intermediate_size_per_partition, convertible)
    if not param_name.endswith("_weight"):  # a quantized tensor in its checkpoint layout (unsplit)
        return LoadTarget(param, shard_id=slot, owner=path, numel=param[0].numel() // len(sources))
    if leaf == "down_proj":
        def cut(t: torch.Tensor) -> torch.Tensor:  # (hidden, intermediate): this rank's columns
            return t.chunk(size, dim=1)[rank] if size > 1 else t
    else:
        def cut(t: torch.Tensor) -> torch.Tensor:  # (intermediate, hidden): this rank's rows
            return t.chunk(size, dim=0)[rank] if size > 1 else t
    return LoadTarget(param, shard_id=slot, transform=cut, owner=path, numel=param[0].numel() // len(sources))


def expert_checkpoint_names(model: nn.Module, path: str, num_experts: int, has_gate: bool,
                            intermediate: int) -> Dict[Tuple[str, int, int], str]:
    """Where each expert projection of the experts module at ``path`` goes in a checkpoint, as
    transformers' ``save_pretrained`` writes the float model (its conversion rules reversed):
    ``(stack "w13" or "w2", expert, first row of the stack) -> module name`` (``...experts.3.w1``,
    ``...experts.3.gate_proj``), each one the loader maps back to those rows. Empty when transformers
    keeps these experts stacked in checkpoints (no per-expert names)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before 5: no stacked experts to revert
        return {}
    roles = 2 if has_gate else 1
    first = "gate_up_proj" if has_gate else "up_proj"
    # Stand-ins of one value per (expert, projection): where each value lands names that projection.
    stand_ins = {f"{path}.{first}": torch.arange(num_experts * roles, dtype=torch.float32).view(num_experts, roles, 1),
                 f"{path}.down_proj": torch.arange(num_experts, dtype=torch.float32).view(num_experts, 1, 1)
                 + num_experts * roles}
    try:
        reverted = revert_weight_conversion(model, stand_ins)
    except Exception:  # noqa: BLE001  (rules transformers cannot reverse for this model)
        return {}
    out: Dict[Tuple[str, int, int], str] = {}
    for name, value in reverted.items():
        if not name.endswith(".weight") or value.numel() != 1:
            return {}  # kept stacked, or split in a way that is not one projection per expert
        index = int(value.reshape(()).item())
        if index < num_experts * roles:
            key = ("w13", index // roles, index % roles * intermediate)
            stack = f"{path}.{first}"
        else:
            key, stack = ("w2", index - num_experts * roles, 0), f"{path}.down_proj"
        if model_names(model, [name]) != [stack]:
            return {}
        out[key] = name[: -len(".weight")]
    return out if len(out) == num_experts * (roles + 1) else {}
