"""``explain()``: what was quantized, how, and what it saved, as a readable table."""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, TextIO

import torch
from torch import nn

from pymllm_fx.passes import is_conv1d, is_linear_module


@dataclass
class LayerRow:
    path: str
    method: str
    detail: str
    shape: str  # out x in
    bytes_before: int
    bytes_after: int


@dataclass
class Explanation:
    rows: List[LayerRow] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    # sibling groups (layers reading one input): fused ones run as one GEMM under torch.compile
    fused_groups: List[List[str]] = field(default_factory=list)
    unfused_groups: Dict[str, str] = field(default_factory=dict)  # "a, b, c" -> why not

    @property
    def linear_bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def linear_bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def quantized_layers(self) -> int:
        return sum(r.method not in ("-", "none") for r in self.rows)

    def table(self) -> str:
        headers = ["layer", "method", "detail", "out x in", "before", "after", "ratio"]
        body = [
            [r.path, r.method, r.detail, r.shape, human_bytes(r.bytes_before), human_bytes(r.bytes_after),
             f"{r.bytes_before / max(r.bytes_after, 1):.2f}x"]
            for r in self.rows
        ]
        totals = [
            [f"linear layers ({len(self.rows)}, {self.quantized_layers} quantized)", "", "", "",
             human_bytes(self.linear_bytes_before), human_bytes(self.linear_bytes_after),
             f"{self.linear_bytes_before / max(self.linear_bytes_after, 1):.2f}x"],
            ["whole model (all parameters and buffers)", "", "", "", human_bytes(self.model_bytes_before),
             human_bytes(self.model_bytes_after),
             f"{self.model_bytes_before / max(self.model_bytes_after, 1):.2f}x"],
        ]
        table = format_table(headers, body, totals)
        return table + self.sibling_lines()

    def sibling_lines(self) -> str:
        """The sibling groups: which share one GEMM when compiled, which do not and why."""
        if not self.fused_groups and not self.unfused_groups:
            return ""
        lines = [f"\nsibling groups fused into one GEMM under torch.compile: {len(self.fused_groups)}"]
        shapes = collections.Counter(" + ".join(p.rpartition(".")[2] for p in g) for g in self.fused_groups)
        lines += [f"  {shape} x{n}" for shape, n in shapes.most_common()]
        if self.unfused_groups:
            lines.append(f"not fused: {len(self.unfused_groups)}")
            lines += [f"  {paths}: {why}" for paths, why in list(self.unfused_groups.items())[:8]]
            if len(self.unfused_groups) > 8:
                lines.append(f"  ... and {len(self.unfused_groups) - 8} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_table(headers: List[str], rows: List[List[str]], footer: Optional[List[List[str]]] = None) -> str:
    """Columns padded to fit; text left-aligned, the rest right-aligned; a rule above the footer."""
    footer = footer or []
    all_rows = [headers] + rows + footer
    widths = [max(len(str(r[i])) for r in all_rows) for i in range(len(headers))]
    numeric = [i >= 3 for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if num else str(c).ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [line(headers), rule] + [line(r) for r in rows]
    if footer:
        out += [rule] + [line(r) for r in footer]
    return "\n".join(out)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def explain(model: nn.Module, file: Optional[TextIO] = sys.stdout) -> Explanation:
    """Print (to ``file``; None to stay quiet) and return a per-layer table of methods and sizes."""
    report = Explanation()
    reasons = getattr(model, "_pymllm_fx_float_layers", None) or {}
    for path, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(module, "num_experts"):  # a FusedMoE layer: every expert of a block
            after = _tensor_bytes(module.parameters(recurse=False))
            rows = (2 if module.has_gate else 1) * module.intermediate_size_per_partition
            report.rows.append(LayerRow(
                path, getattr(method, "name", type(method).__name__), method.describe(module),
                f"{module.num_experts} x ({rows} x {module.hidden_size} + {module.hidden_size} x "
                f"{module.intermediate_size_per_partition})", module.float_bytes(), after,
            ))
        elif method is not None:
            dtype = module.params_dtype
            elements = module.input_size_per_partition * sum(module.output_partition_sizes)
            bias = module.bias.numel() if module.bias is not None else 0
            before = (elements + bias) * torch.empty((), dtype=dtype).element_size()
            after = _tensor_bytes(module.parameters(recurse=False)) + _tensor_bytes(module.buffers(recurse=False))
            describe = getattr(method, "describe", None)
            report.rows.append(LayerRow(
                path, getattr(method, "name", type(method).__name__), describe(module) if describe else "",
                f"{sum(module.output_partition_sizes)} x {module.input_size_per_partition}", before, after,
            ))
        elif is_linear_module(module):
            size = _tensor_bytes(module.parameters(recurse=False))
            w = module.weight
            out_f, in_f = (w.shape[1], w.shape[0]) if is_conv1d(module) else (w.shape[0], w.shape[1])
            why = f": {reasons[path]}" if path in reasons else ""
            report.rows.append(LayerRow(path, "-", f"not quantized ({w.dtype}){why}".replace("torch.", ""), f"{out_f} x {in_f}",
                                        size, size))
    named = dict(model.named_parameters(remove_duplicate=False))
    for name, why in (getattr(model, "_pymllm_fx_float_params", None) or {}).items():
        if name in named:  # matmul weights outside nn.Linear: fused MoE experts, raw projections
            weight = named[name]
            size = weight.numel() * weight.element_size()
            report.rows.append(LayerRow(name, "-", f"not quantized ({weight.dtype}): {why}".replace("torch.", ""),
                                        " x ".join(map(str, weight.shape)), size, size))
    groups = getattr(model, "_pymllm_fx_sibling_groups", None) or {}
    report.fused_groups = [list(g) for g in groups.get("fused", [])]
    report.unfused_groups = dict(groups.get("unfused", {}))
    everything = list(model.parameters()) + list(model.buffers())
    report.model_bytes_after = _tensor_bytes(everything)
    report.model_bytes_before = report.model_bytes_after + report.linear_bytes_before - report.linear_bytes_after
    if file is not None:
        print(report.table(), file=file)
    return report
