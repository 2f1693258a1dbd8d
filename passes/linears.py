"""Find every linear call site of a model, and swap modules by path atomically."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from pymllm_fx.passes.capture import CaptureError, capture

aten = torch.ops.aten
# Ops that only re-view the activation: two linears consume "the same input" through them.
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
             aten.contiguous.default, aten.flatten.using_ints}
# Ops between a parameter and the matmul: value True when the op transposes it.
_WEIGHT_OPS = {aten.t.default: True, aten.permute.default: True, aten.transpose.int: True,
               aten.alias.default: False, aten._to_copy.default: False, aten.to.dtype: False}


@dataclass
class LinearSite:
    """One module whose weight is used as a linear (``x @ W.T + b``) in the model's forward."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype
    device: torch.device
    kind: str  # "linear" (nn.Linear) or "conv1d" (HF Conv1D, weight stored (in, out))
    calls: int = 1
    siblings: Tuple[str, ...] = ()  # other sites that consume the same input (q/k/v, gate/up)
    tied_to: Tuple[str, ...] = ()  # other parameter names that are this weight (tied embeddings)
    swappable: bool = True
    reason: str = ""  # why not swappable
    from_graph: bool = True


def is_conv1d(module: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2): a linear with its weight stored transposed, ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _site_for_module(path: str, module: nn.Module, aliases: Dict[int, List[str]]) -> LinearSite:
    weight = module.weight
    conv = is_conv1d(module)
    in_f, out_f = (weight.shape[0], weight.shape[1]) if conv else (weight.shape[1], weight.shape[0])
    own = f"{path}.weight" if path else "weight"
    tied = tuple(n for n in aliases.get(id(weight), []) if n != own)
    return LinearSite(path, int(in_f), int(out_f), module.bias is not None, weight.dtype, weight.device,
                      "conv1d" if conv else "linear", tied_to=tied)


def _aliases(model: nn.Module) -> Dict[int, List[str]]:
    names: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _strip_views(node: Any) -> Any:
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEW_OPS:
        node = node.args[0]
    return node


def _linear_calls(program: torch.export.ExportedProgram):
    """Yield (weight name, calling module path, activation node, weight stored (in, out)?) per matmul with a parameter."""
    to_param = program.graph_signature.inputs_to_parameters

    def param_of(node):
        transposed = False
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _WEIGHT_OPS:
            transposed ^= _WEIGHT_OPS[node.target]
            node = node.args[0]
        if isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name in to_param:
            return to_param[node.name], transposed
        return None, False

    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:  # x @ W.T, W (out, in)
            x, w, in_out = node.args[0], node.args[1], False
        elif node.target == aten.addmm.default:  # b + x @ W, W (in, out) unless transposed on the way
            x, w, in_out = node.args[1], node.args[2], True
        elif node.target in (aten.mm.default, aten.matmul.default):
            x, w, in_out = node.args[0], node.args[1], True
        else:
            continue
        name, transposed = param_of(w)
        if name is not None:
            stack = node.meta.get("nn_module_stack") or {}
            caller = list(stack.values())[-1][0] if stack else ""
            yield name, caller, _strip_views(x), in_out != transposed


def _from_graph(model: nn.Module, program: torch.export.ExportedProgram) -> List[LinearSite]:
    aliases = _aliases(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    sites: Dict[str, LinearSite] = {}
    consumers: Dict[str, List[str]] = {}
    for weight_name, caller, source, in_out in _linear_calls(program):
        # A tied weight reaches the graph under one of its names: take the one the caller owns.
        names = aliases.get(id(params[weight_name]), [weight_name])
        owned = [n for n in names if n.rpartition(".")[0] == caller]
        weight_name = owned[0] if owned else weight_name
        path, _, leaf = weight_name.rpartition(".")
        if weight_name in sites:
            sites[weight_name].calls += 1
            continue
        module = model.get_submodule(path) if path else model
        if leaf == "weight" and is_linear_module(module):
            site = _site_for_module(path, module, aliases)
        else:
            w = params[weight_name]
            in_f, out_f = (w.shape[0], w.shape[-1]) if in_out else (w.shape[-1], w.shape[0])
            site = LinearSite(path, int(in_f), int(out_f), False, w.dtype, w.device, "linear",
                              swappable=False,
                              reason=f"{weight_name} is used in a matmul inside {type(module).__name__}, not an nn.Linear")
        sites[weight_name] = site
        key = source.name if isinstance(source, torch.fx.Node) else str(source)
        consumers.setdefault(key, []).append(weight_name)
    for group in consumers.values():
        for name in group:
            sites[name].siblings = tuple(sites[other].path for other in group if other != name)
    return list(sites.values())


def _from_modules(model: nn.Module) -> List[LinearSite]:
    aliases = _aliases(model)
    return [
        LinearSite(**{**_site_for_module(path, module, aliases).__dict__, "from_graph": False})
        for path, module in model.named_modules()
        if is_linear_module(module)
    ]


def find_linears(model: nn.Module, example_inputs: Optional[Any] = None) -> List[LinearSite]:
    """Every linear call site of ``model``, in call order, without running a real forward.

    Captures the model with non-strict ``torch.export``; if that fails, warns with the reason and
    walks the modules instead (then call counts and shared inputs are unknown).
    """
    try:
        program = capture(model, example_inputs)
    except CaptureError as err:
        warnings.warn(
            f"pymllm_fx: graph capture of {type(model).__name__} failed ({err}); falling back to walking "
            f"its modules, so shared inputs (q/k/v, gate/up) and unused layers are not detected",
            stacklevel=2,
        )
        return _from_modules(model)
    return _from_graph(model, program)


def swap_linears(model: nn.Module, replacements: Dict[str, nn.Module]) -> None:
    """Replace the modules at the given paths, all or nothing: on any error nothing is changed."""
    resolved = []
    for path, new in replacements.items():
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            getattr(parent, name)
        except AttributeError:
            raise ValueError(f"swap_linears: the model has no module at {path!r}") from None
        if not isinstance(new, nn.Module):
            raise TypeError(f"swap_linears: replacement for {path!r} is a {type(new).__name__}, not an nn.Module")
        resolved.append((parent, name, new))
    done = []
    try:
        for parent, name, new in resolved:
            old = getattr(parent, name)
            setattr(parent, name, new)
            done.append((parent, name, old))
    except BaseException:
        for parent, name, old in reversed(done):
            setattr(parent, name, old)
        raise
