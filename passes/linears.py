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
    # Tensor-parallel role read from the dataflow: "column" (shard the outputs: a row-parallel
    # layer consumes them), "row" (shard the inputs, all-reduce), or "replicated".
    parallel: str = "replicated"
    head_dim: Optional[int] = None  # when the output is viewed as heads right away (q/k/v)


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
    """Yield (weight name, calling module path, activation node, weight stored (in, out)?, the call's node)
    per matmul with a parameter."""
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
            yield name, caller, _strip_views(x), in_out != transposed, node


def _from_graph(model: nn.Module, program: torch.export.ExportedProgram) -> List[LinearSite]:
    aliases = _aliases(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    sites: Dict[str, LinearSite] = {}
    consumers: Dict[str, List[str]] = {}
    calls: List[Tuple[torch.fx.Node, str]] = []
    for weight_name, caller, source, in_out, call in _linear_calls(program):
        # A tied weight reaches the graph under one of its names: take the one the caller owns.
        names = aliases.get(id(params[weight_name]), [weight_name])
        owned = [n for n in names if n.rpartition(".")[0] == caller]
        weight_name = owned[0] if owned else weight_name
        path, _, leaf = weight_name.rpartition(".")
        calls.append((call, weight_name))
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
    for name, style in _parallel_styles(program, calls, sites).items():
        sites[name].parallel = style
    for call, name in calls:
        sites[name].head_dim = sites[name].head_dim or _head_dim(call, sites[name].out_features)
    return list(sites.values())


# Ops that mix all the features of their input. A column-parallel output must not reach one while
# its last dim is still the whole sharded feature dim (a norm over all of q, a split of a fused
# q/k/v by the full sizes): each rank would see only its slice. Per-head ops (a norm over the
# head dim after a view into heads) are fine, and told apart by the size of the last dim.
_MIXING_OPS = {
    aten.mean.dim, aten.sum.dim_IntList, aten.var.correction, aten.var_mean.correction, aten.std.correction,
    aten.amax.default, aten.amin.default, aten.max.dim, aten.argmax.default, aten.layer_norm.default,
    aten.native_layer_norm.default, aten._softmax.default, aten.softmax.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.slice.Tensor, aten.select.int,
    aten.index_select.default, aten.gather.default, aten.cumsum.default,
}


_SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
_NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default}  # over the trailing dims


def _parallel_styles(
    program: torch.export.ExportedProgram, calls: List[Tuple[torch.fx.Node, str]], sites: Dict[str, LinearSite]
) -> Dict[str, str]:
    """Column / row / replicated per site, from which linear outputs reach which linear inputs.

    Sharded-ness flows forward from each candidate column layer's output through every op. A
    linear whose input carries it is row-parallel (its all-reduced output is whole again). A
    column output that reaches a feature-mixing op or the graph's output cannot stay sharded:
    that layer is replicated, and the flow is recomputed until nothing changes.
    """
    site_of = dict(calls)
    replicated = {name for name, site in sites.items() if not site.swappable}
    while True:
        carried: Dict[torch.fx.Node, frozenset] = {}
        rows: set = set()
        fed: set = set()
        demote: set = set()
        for node in program.graph.nodes:
            inputs = frozenset().union(*(carried.get(arg, frozenset()) for arg in node.all_input_nodes))
            name = site_of.get(node)
            if name is not None:
                if inputs and name in replicated:
                    demote |= inputs  # a whole-input layer cannot take a sharded input
                elif inputs:
                    rows.add(name)
                    fed |= inputs
                carried[node] = frozenset() if (inputs or name in replicated) else frozenset({name})
                continue
            if inputs and (node.op == "output" or _mixes_features(node, inputs, sites)):
                demote |= inputs
                inputs = frozenset()  # those layers will be whole: what follows is not sharded
            carried[node] = inputs
        # A layer called both on a sharded and on a whole input (shared weights) cannot be either.
        whole_input = {name for node, name in calls if not any(carried.get(a) for a in node.all_input_nodes)}
        demote |= rows & whole_input
        if demote <= replicated:
            break
        replicated |= demote
    return {name: "row" if name in rows else "column" if name in fed else "replicated" for name in sites}


def _mixes_features(node: torch.fx.Node, inputs: frozenset, sites: Dict[str, LinearSite]) -> bool:
    if node.op != "call_function" or node.target not in _MIXING_OPS or not node.args:
        return False
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if value is None or not hasattr(value, "shape") or value.dim() == 0:
        return True  # unknown shape: assume the worst
    last = value.shape[-1]
    if node.target in _SPLIT_OPS:  # (self, split sizes or chunks, dim=0)
        dim = node.args[2] if len(node.args) > 2 else 0
    else:  # (self, dim or dims, ...)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    touches_last = node.target in _NORM_OPS or any(
        isinstance(d, int) and d % value.dim() == value.dim() - 1 for d in dims)
    return touches_last and any(last == sites[name].out_features for name in inputs)


def _head_dim(call: torch.fx.Node, out_features: int) -> Optional[int]:
    """The head size when the linear's output is viewed straight into ``(..., heads, head_dim)``."""
    for user in call.users:
        if user.op == "call_function" and user.target in _VIEW_OPS:
            value = user.meta.get("val")
            if value is not None and value.dim() > 1 and value.dim() > call.meta["val"].dim():
                head_dim = int(value.shape[-1])
                if 0 < head_dim < out_features and out_features % head_dim == 0:
                    return head_dim
    return None


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
