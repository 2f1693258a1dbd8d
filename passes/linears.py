"""Find every linear call site of a model, and swap modules by path atomically."""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from pymllm_fx.layers.linear import is_conv1d, is_linear_module  # noqa: F401  (re-exported by passes)
from pymllm_fx.passes.capture import CaptureError, capture

aten = torch.ops.aten
# Ops that only re-view the activation: two linears consume "the same input" through them.
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
             aten.contiguous.default, aten.flatten.using_ints}
# Ops between a parameter and the matmul that consumes it: value True when the op transposes a 2-D
# weight. ``expand`` / ``unsqueeze`` add the batch dims a ``bmm`` or a batched ``matmul`` needs.
_WEIGHT_OPS = {aten.t.default: True, aten.numpy_T.default: True, aten.mT.default: True, aten.permute.default: True,
               aten.transpose.int: True, aten.alias.default: False, aten._to_copy.default: False,
               aten.to.dtype: False, aten.detach.default: False, aten.expand.default: False,
               aten.unsqueeze.default: False}
# Calls that multiply an activation by a (possibly transposed, batch-expanded) 2-D weight.
_MATMUL_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
               aten.einsum.default}
# What a module's own forward may do and still be "a linear of its weight and bias" (FalconLinear's
# ``x @ W.T + b``, a cast to the weight's dtype): anything else (a top-k of the logits in a router
# that subclasses nn.Linear) and the module is not swapped.
_PLAIN_LINEAR_OPS = set(_WEIGHT_OPS) | _VIEW_OPS | _MATMUL_OPS | {aten.add.Tensor}

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
    param: str = ""  # for a matmul weight outside any nn.Linear: its parameter's name
    experts: int = 0  # for a stacked 3-D weight multiplied one expert slice at a time: how many slices


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


def _caller(node: torch.fx.Node) -> str:
    """The path of the innermost module whose forward ran ``node`` ("" for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


@dataclass
class _Use:
    """One op that consumes a parameter: a matmul against it, or anything else."""

    node: torch.fx.Node
    caller: str
    layout: str = ""  # "out_in": x @ W.T (nn.Linear), "in_out": x @ W (Conv1D), "left": W @ x, "": not a matmul
    x: Any = None  # the activation of a matmul use


def _einsum_layout(equation: str, weight_index: int, transposed: bool) -> str:
    """``out_in`` / ``in_out`` when a two-operand einsum is ``x @ W.T`` / ``x @ W`` over x's last dim."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    specs = inputs.split(",")
    if len(specs) != 2 or "." in inputs or len(specs[weight_index]) != 2:
        return ""
    w, x = specs[weight_index], specs[1 - weight_index]
    if not x or x[-1] not in w or len(set(w)) != 2:
        return ""
    contracted = x[-1]
    other = w.replace(contracted, "")
    if output != x[:-1] + other or other in x:
        return ""
    out_in = w[1] == contracted
    return "out_in" if out_in != transposed else "in_out"


def _matmul_use(node: torch.fx.Node, operand: torch.fx.Node, transposed: bool) -> _Use:
    """What ``node`` does with ``operand`` (the weight, transposed on the way when ``transposed``)."""
    use = _Use(node, _caller(node))
    target, args = node.target, node.args
    if target == aten.einsum.default:
        operands = list(args[1])
        index = operands.index(operand)
        use.layout = _einsum_layout(args[0], index, transposed) if len(operands) == 2 else ""
        use.x = operands[1 - index] if use.layout else None
        return use
    position = next(i for i, arg in enumerate(args) if arg is operand)
    right = {aten.linear.default: 1, aten.addmm.default: 2}.get(target, 1)
    left = right - 1
    if position == right:
        use.x = args[left]
        as_stored = "out_in" if target == aten.linear.default else "in_out"
        use.layout = as_stored if not transposed else ("in_out" if as_stored == "out_in" else "out_in")
    elif position == left and target != aten.linear.default:
        use.layout = "left"
    return use


def _transposes(node: torch.fx.Node) -> Optional[bool]:
    """Whether a weight op swaps the weight's two matrix dims (None: it moves a batch dim, unknown)."""
    if node.target in (aten.permute.default, aten.transpose.int):
        value = node.meta.get("val")
        rank = value.dim() if value is not None else 2
        dims = list(node.args[1]) if node.target == aten.permute.default else [node.args[1], node.args[2]]
        dims = [d % rank for d in dims]
        if node.target == aten.transpose.int:
            return True if sorted(dims) == [rank - 2, rank - 1] else (False if dims[0] == dims[1] else None)
        return {tuple(range(rank)): False,
                tuple(range(rank - 2)) + (rank - 1, rank - 2): True}.get(tuple(dims))
    if node.target == aten.unsqueeze.default:
        value = node.meta.get("val")
        return False if value is None or node.args[1] % value.dim() < value.dim() - 2 else None
    return _WEIGHT_OPS[node.target]


def _uses(placeholder: torch.fx.Node) -> List[_Use]:
    """Every op that consumes a parameter, looking through transposes, casts and batch expands."""
    found: List[_Use] = []
    frontier = [(placeholder, False)]
    while frontier:
        node, transposed = frontier.pop()
        for user in node.users:
            if user.op == "call_function" and user.target in _WEIGHT_OPS and user.args and user.args[0] is node:
                flips = _transposes(user)
                if flips is not None:
                    frontier.append((user, transposed ^ flips))
                    continue
            if user.op == "call_function" and user.target in _MATMUL_OPS:
                found.append(_matmul_use(user, node, transposed))
            else:
                found.append(_Use(user, _caller(user) if user.op == "call_function" else ""))
    return found


# Ops that take a slice or a view of a stacked weight on its way to a matmul (MoE experts).
_SLICE_OPS = {aten.select.int, aten.index.Tensor, aten.slice.Tensor, aten.unbind.int, aten.split.Tensor,
              aten.chunk.default, aten.index_select.default}


def _indexed_matmul(placeholder: torch.fx.Node, depth: int = 5) -> Optional[torch.fx.Node]:
    """The first matmul a parameter reaches through slicing, viewing and transposing ops, if any."""
    frontier = [placeholder]
    for _ in range(depth):
        following = []
        for node in frontier:
            for user in node.users:
                if user.op != "call_function":
                    continue
                if user.target in _MATMUL_OPS or "grouped_mm" in getattr(user.target, "__name__", ""):
                    operands = list(user.args[1]) if user.target == aten.einsum.default else list(user.args)
                    if node in operands[1:]:  # the weight side; operand 0 is an activation (a looked-up row)
                        return user
                    continue
                if user.target in _SLICE_OPS or user.target in _WEIGHT_OPS or user.target in _VIEW_OPS or \
                        user.target is operator.getitem:
                    following.append(user)
        frontier = following
    return None


_STANDARD_FORWARDS = {nn.Linear.forward}


def _has_standard_forward(module: nn.Module) -> bool:
    if type(module).forward in _STANDARD_FORWARDS:
        return True
    if is_conv1d(module):  # transformers' own Conv1D, not a look-alike with another forward
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - transformers is what defines Conv1D
            return False
        return type(module).forward is Conv1D.forward
    return False


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)).split(".")[0] if node.op == "call_function" else node.op


def _why_not_a_plain_linear(
    path: str, module: nn.Module, calls: List[_Use], other: List[_Use], bias_uses: List[_Use],
    scope: List[torch.fx.Node],
) -> str:
    """Why swapping ``module`` would change the model's math, or "" when its uses are exactly linear calls."""
    kind = type(module).__name__
    if other:
        use = other[0]
        where = f"{use.caller or 'the model'}'s forward"
        if use.layout == "left":
            return f"its weight multiplies from the left (W @ x) in {where}"
        if use.layout:
            return f"its weight is used in a matmul by {where}, not through a call of the {kind}"
        return f"its weight is read directly ({_op_name(use.node)}) in {where}"
    call_nodes = {use.node for use in calls}
    for use in bias_uses:
        if use.node in call_nodes and use.node.target in (aten.linear.default, aten.addmm.default):
            continue
        if use.node.target == aten.add.Tensor and use.caller == path and any(
                _strip_views(arg) in call_nodes for arg in use.node.args):
            continue
        return f"its bias is read directly ({_op_name(use.node)}) in {use.caller or 'the model'}'s forward"
    if not _has_standard_forward(module):
        extra = sorted({_op_name(n) for n in scope if n.op == "call_function" and n.target not in _PLAIN_LINEAR_OPS})
        if extra:
            return (f"{kind}.forward does more than a linear ({', '.join(extra[:4])}); swapping it for a linear "
                    f"would change what it returns")
    return ""


def _from_graph(model: nn.Module, program: torch.export.ExportedProgram) -> List[LinearSite]:
    aliases = _aliases(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    in_graph = {name: placeholders[ph] for ph, name in program.graph_signature.inputs_to_parameters.items()}
    graph_name = {id(params[name]): name for name in in_graph}
    uses = {name: _uses(node) for name, node in in_graph.items()}
    order = {node: i for i, node in enumerate(program.graph.nodes)}
    scopes: Dict[str, List[torch.fx.Node]] = {}
    for node in program.graph.nodes:
        if node.op == "call_function":
            scopes.setdefault(_caller(node), []).append(node)

    sites: Dict[str, LinearSite] = {}
    first: Dict[str, int] = {}
    calls: List[Tuple[torch.fx.Node, str]] = []
    consumers: Dict[str, List[str]] = {}
    modules = set()
    for path, module in model.named_modules():
        if not is_linear_module(module) or not isinstance(module.weight, torch.Tensor):
            continue
        modules.add(id(module.weight))
        site = _site_for_module(path, module, aliases)
        name = graph_name.get(id(module.weight))
        if name is None or not uses[name]:
            site.swappable = False
            site.reason = "not reached by the example inputs (the forward never used it); pass example_inputs that do"
            sites[path] = site
            continue
        layout = "in_out" if site.kind == "conv1d" else "out_in"
        mine = [u for u in uses[name] if u.layout == layout and u.caller == path]
        other = [] if site.tied_to else [u for u in uses[name] if not (u.layout == layout and u.caller == path)]
        bias = getattr(module, "bias", None)
        bias_name = graph_name.get(id(bias)) if isinstance(bias, torch.Tensor) else None
        why = _why_not_a_plain_linear(path, module, mine, other, uses.get(bias_name, []), scopes.get(path, []))
        if not mine and not why:
            why = "its weight is in the graph but never multiplied by an input"
        if why:
            site.swappable, site.reason = False, why
        site.calls = max(len(mine), 1)
        sites[path] = site
        first[path] = min((order[u.node] for u in (mine or uses[name])), default=len(order))
        # Every matmul of the weight takes part in the tensor-parallel dataflow (a layer left whole
        # still must not receive a sharded input); the first call's input groups siblings.
        calls += [(use.node, path) for use in uses[name] if use.layout]
        if mine:
            source = _strip_views(mine[0].x)
            key = source.name if isinstance(source, torch.fx.Node) else str(source)
            consumers.setdefault(key, []).append(path)

    # Parameters outside any nn.Linear that a matmul multiplies (XLNet's q/k/v, an nn.MultiheadAttention
    # in_proj_weight): reported, not swapped.
    for name, node in in_graph.items():
        weight = params[name]
        if id(weight) in modules or weight.dim() < 2:
            continue
        matmuls = [u for u in uses[name] if u.layout in ("out_in", "in_out")]
        if not matmuls:
            indexed = _indexed_matmul(node)  # fused MoE experts: W[e] or a grouped mm of a 3-D tensor
            if indexed is not None and weight.dtype.is_floating_point:
                path = name.rpartition(".")[0]
                key = f"param:{name}"
                sites[key] = LinearSite(
                    path, int(weight.shape[-1]), int(weight.shape[-2]), False, weight.dtype, weight.device, "linear",
                    swappable=False, param=name, experts=int(weight.shape[0]) if weight.dim() == 3 else 0,
                    reason=f"{name} ({'x'.join(map(str, weight.shape))}) is multiplied slice by slice "
                           f"({_op_name(indexed)}), as fused MoE experts are; not an nn.Linear",
                )
                first[key] = order[indexed]
            continue
        path = name.rpartition(".")[0]
        owner = model.get_submodule(path) if path else model
        in_out = matmuls[0].layout == "in_out"
        in_f, out_f = (weight.shape[-2], weight.shape[-1]) if in_out else (weight.shape[-1], weight.shape[-2])
        key = f"param:{name}"
        sites[key] = LinearSite(path, int(in_f), int(out_f), False, weight.dtype, weight.device, "linear",
                                calls=len(matmuls), swappable=False, param=name,
                                reason=f"{name} is used in a matmul inside {type(owner).__name__}, not an nn.Linear")
        first[key] = min(order[u.node] for u in matmuls)
        calls += [(use.node, key) for use in matmuls]

    for group in consumers.values():
        for path in group:
            sites[path].siblings = tuple(other for other in group if other != path)
    ordered = sorted(sites, key=lambda key: first.get(key, len(order)))
    by_path = {path: sites[path] for path in ordered}
    for path, style in _parallel_styles(program, calls, by_path).items():
        by_path[path].parallel = style
    for call, path in calls:
        by_path[path].head_dim = by_path[path].head_dim or _head_dim(call, by_path[path].out_features)
    return list(by_path.values())


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
    """Every linear module, when the graph cannot be captured. A subclass with its own forward (a
    router returning a tuple) is not swapped: without the graph nothing shows it is a plain linear."""
    aliases = _aliases(model)
    sites = []
    for path, module in model.named_modules():
        if not is_linear_module(module):
            continue
        site = _site_for_module(path, module, aliases)
        site.from_graph = False
        if not _has_standard_forward(module):
            site.swappable = False
            site.reason = (f"{type(module).__name__} has its own forward, and without a captured graph nothing "
                           f"shows it is a plain linear")
        sites.append(site)
    return sites


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
