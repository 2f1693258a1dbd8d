"""Sibling fusion: linears that read the same input (q/k/v, gate/up) run as one GEMM when compiled.

Two halves:

- **Storage** (``fuse_sibling_storage``, at quantize time; the mechanics are in
  ``pymllm_fx.layers.siblings``). The layers of a sibling group that can share a kernel call get
  one buffer per tensor, their rows concatenated in group order, and their parameters become
  views into it. ``state_dict``, loading, saving and ``explain()`` stay per module, and no memory
  is added. Each parameter carries a ``SiblingTag``.
- **The rewrite** (``SiblingFusionPass``, an Inductor pre-grad pass installed by ``install``). In
  a graph Dynamo captured, the calls of one op on one input whose tensor arguments are all the
  members of one group, at their offsets of one buffer (checked on the real tensors), become one
  call on an ``as_strided`` view of the whole buffer and a split. Graphs without tagged
  parameters are left untouched, and eager runs never see the pass.

Depends only on torch and the layers' interface (``quant_method``, ``output_partition_sizes``).
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pymllm_fx.layers.siblings import TAG, SiblingTag, at_its_rows, fuse_group

GROUPS_ATTR = "_pymllm_fx_sibling_groups"  # on the model: {"fused": [[paths]], "unfused": {paths: why}}


def fuse_sibling_storage(model: nn.Module, groups: Sequence[Sequence[str]]) -> Dict[str, Any]:
    """Give each fusable group of swapped layers (module paths, in the order their rows go) one buffer
    per tensor; record on the model and return what was fused and why the rest was not."""
    fused, unfused = [], {}
    for paths in groups:
        layers = [model.get_submodule(p) for p in paths]
        if len(layers) < 2:
            continue
        if not all(hasattr(layer, "quant_method") and hasattr(layer, "output_partition_sizes") for layer in layers):
            unfused[", ".join(paths)] = "not every sibling is quantized (a skipped or float layer among them)"
            continue
        why = fuse_group(layers)
        if why:
            unfused[", ".join(paths)] = why
        else:
            fused.append(list(paths))
    known = getattr(model, GROUPS_ATTR, None) or {"fused": [], "unfused": {}}
    object.__setattr__(model, GROUPS_ATTR, {"fused": known["fused"] + fused, "unfused": {**known["unfused"], **unfused}})
    return {"fused": fused, "unfused": unfused}


# --- the compiled-graph rewrite ------------------------------------------------------------------

FUSION_LOG: List[Dict[str, int]] = []  # one entry per graph the pass rewrote: op calls before, after


def _real(node) -> Optional[torch.Tensor]:
    """The real tensor behind a placeholder of a Dynamo graph (a parameter), if any."""
    if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
        return None
    arg = node.meta.get("grapharg")
    example = getattr(arg, "example", None) if arg is not None else None
    return example if isinstance(example, torch.Tensor) else None


def _is_linear_op(target) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target).startswith("pymllm_fx.") or str(target).startswith("aten.linear")
    return target is torch._C._nn.linear or target is torch.nn.functional.linear


@dataclass
class _Call:
    node: Any
    tag: SiblingTag  # the member's place in its group (every one of its tensors carries the same)
    positions: Tuple[int, ...]  # the arguments that are its tensors


def _describe(node) -> Optional[_Call]:
    """A linear op call whose tensor arguments (after the input) are all of one member of a group."""
    if node.op != "call_function" or not _is_linear_op(node.target) or node.kwargs or not node.args:
        return None
    tags = {}
    for pos, arg in enumerate(node.args[1:], start=1):
        if isinstance(arg, torch.fx.Node):
            real = _real(arg)
            tags[pos] = getattr(real, TAG, None) if real is not None else None
    if not tags or None in tags.values() or len(set(tags.values())) > 1:
        return None
    return _Call(node, next(iter(tags.values())), tuple(tags))


def rewrite_siblings(graph: torch.fx.Graph) -> int:
    """Fuse the sibling calls of ``graph`` in place; the number of groups fused."""
    calls = [c for c in (_describe(n) for n in graph.nodes) if c is not None]
    if not calls:
        return 0
    before = sum(1 for n in graph.nodes if n.op == "call_function" and _is_linear_op(n.target))
    by_key: Dict[Tuple, List[_Call]] = {}
    for c in calls:
        statics = tuple(a if not isinstance(a, torch.fx.Node) else "node" for a in c.node.args[1:])
        key = (c.node.target, c.node.args[0], c.tag.group, c.positions, statics)
        by_key.setdefault(key, []).append(c)
    order = {n: i for i, n in enumerate(graph.nodes)}  # insertions below keep the original nodes' order
    fused = 0
    for members in by_key.values():
        members.sort(key=lambda c: c.tag.index)
        tags = [c.tag for c in members]
        if [t.index for t in tags] != list(range(tags[0].members)):
            continue  # not every member is called on this input in this graph
        if not all(at_its_rows(_real(m.node.args[pos]), _real(members[0].node.args[pos]))
                   for pos in members[0].positions for m in members):
            continue  # moved or replaced since quantize: run unfused
        first_node = min((m.node for m in members), key=order.__getitem__)
        head = members[0].node
        with graph.inserting_before(first_node):
            args = list(head.args)
            for pos in members[0].positions:
                real = _real(head.args[pos])
                size = [tags[0].total, *real.shape[1:]]
                args[pos] = graph.call_function(torch.ops.aten.as_strided.default,
                                                (head.args[pos], size, list(real.stride()), real.storage_offset()))
            out = graph.call_function(head.target, tuple(args))
            parts = graph.call_function(torch.ops.aten.split_with_sizes.default, (out, [t.rows for t in tags], -1))
            pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
        for m, piece in zip(members, pieces):
            for user in list(m.node.users):  # a piece is a strided slice: views of it may need a copy
                if user.op == "call_method" and user.target == "view" and user.args[0] is m.node:
                    user.target = "reshape"
            m.node.replace_all_uses_with(piece)
            graph.erase_node(m.node)
        fused += 1
    if fused:
        after = sum(1 for n in graph.nodes if n.op == "call_function" and _is_linear_op(n.target))
        FUSION_LOG.append({"calls_before": before, "calls_after": after, "groups": fused})
    return fused


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # an older torch: the pass still works, without Inductor's cache key
    CustomGraphPass = object


class SiblingFusionPass(CustomGraphPass):
    """The pre-grad pass: sibling fusion, then whatever pass was installed before it."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, graph: torch.fx.Graph) -> None:
        try:
            rewrite_siblings(graph)
        except Exception as err:  # a torch whose graphs look otherwise: run unfused rather than fail
            graph.lint()  # the rewrite changes the graph only after every check passed
            warnings.warn(f"pymllm_fx: sibling fusion skipped for this graph ({type(err).__name__}: {err})")
        if self.previous is not None:
            self.previous(graph)

    def uuid(self) -> Optional[Any]:
        """Inductor's cache key for this pass, or None (no caching of its result) on a torch that
        cannot run pre-grad passes before its cache lookup: the rewrite depends on where the real
        tensors sit, which the captured graph does not show, so a cached result must be keyed by
        the rewritten graph."""
        import torch._inductor.config as inductor_config

        if getattr(inductor_config, "pre_grad_pass_timing", None) != "early":
            return None
        source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        before = self.previous.uuid() if hasattr(self.previous, "uuid") else repr(self.previous)
        return f"{source}:{before}"


def install() -> None:
    """Put the pass in front of Inductor's pre-grad passes, once (keeping any pass already there).
    Pre-grad passes then run before Inductor's cache lookup ("early"), so that a compiled graph is
    cached under its rewritten form; a graph without tagged parameters is not changed."""
    import torch._inductor.config as inductor_config

    current = inductor_config.pre_grad_custom_pass
    if isinstance(current, SiblingFusionPass):
        return
    if hasattr(inductor_config, "pre_grad_pass_timing"):
        inductor_config.pre_grad_pass_timing = "early"
    inductor_config.pre_grad_custom_pass = SiblingFusionPass(current)
