"""Each way a model's code can use a linear's weight, in the smallest module that shows it: the graph
pass swaps a module only when every use of its weight is a call of that module computing exactly
``x @ W.T + b``; anything else stays float with a reason in the warning and in explain()."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import pymllm_fx
from pymllm_fx.passes import find_linears
from checks import rel_err


class FalconStyleLinear(nn.Linear):
    """FalconLinear: ``input @ self.weight.T`` then ``+ self.bias``; exported as numpy_T + matmul + add."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class EinsumLinear(nn.Linear):
    def forward(self, x):
        return torch.einsum("bsi,oi->bso", x, self.weight) + self.bias


class BatchedLinear(nn.Linear):
    """``bmm`` against the weight expanded over the batch, the weight transposed with ``mT``."""

    def forward(self, x):
        return torch.bmm(x, self.weight.mT.expand(x.shape[0], -1, -1))


class Router(nn.Linear):
    """PhiMoE / Llama-4 routers: an nn.Linear subclass that returns more than the linear."""

    def forward(self, x):
        logits = super().forward(x)
        weights, experts = torch.topk(logits.softmax(-1), 2, dim=-1)
        return weights, experts


class Blocks(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(16, 32)
        self.proj = {"falcon": FalconStyleLinear, "einsum": EinsumLinear, "bmm": BatchedLinear}.get(kind, nn.Linear)(
            32, 32, bias=kind != "bmm")
        self.router = Router(32, 4, bias=False)
        self.down = nn.Linear(32, 16)
        self.unused = nn.Linear(16, 16)
        self.experts = nn.Parameter(torch.randn(4, 32, 32) * 0.1)  # fused MoE experts, (E, out, in)

    def forward(self, x):
        h = self.up(x)
        if self.kind == "left":  # Mamba: dt_proj.weight @ t
            h = (self.proj.weight @ h.transpose(1, 2)).transpose(1, 2)
        elif self.kind == "functional":  # a parent computing with the child's weight
            h = F.linear(h, self.proj.weight, self.proj.bias)
        elif self.kind == "cat":  # MobileBERT's prediction head
            h = h @ torch.cat([self.proj.weight[:16], self.proj.weight[16:]]).t()
        else:
            h = self.proj(h)
        weights, experts = self.router(h)
        h = h + (h @ self.experts[0].t()) * weights[..., :1]
        return self.down(torch.relu(h))


def sites_of(model, x):
    return {site.param or site.path: site for site in find_linears(model, (x,))}


X = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["plain", "falcon", "einsum", "bmm"])
def test_linear_written_any_way_is_swapped_and_exact(kind):
    torch.manual_seed(0)
    model = Blocks(kind).eval()
    sites = sites_of(model, X)
    assert sites["proj"].swappable and sites["proj"].calls == 1, sites["proj"]
    expected = model(X)
    with pytest.warns(UserWarning) as caught:
        quantized = pymllm_fx.quantize(model, "int8", example_inputs=(X,), progress=False)
    text = " ".join(str(w.message) for w in caught)
    assert hasattr(quantized.proj, "quant_method") and hasattr(quantized.up, "quant_method")
    assert rel_err(quantized(X), expected) < 3e-2
    # the router, the unused layer and the experts stay float, and the warning says so
    assert type(quantized.router) is Router and "router" in text and "2 linear layer(s) stay float" in text
    assert "experts" in text and "outside nn.Linear" in text


def test_router_that_returns_a_tuple_is_not_swapped():
    sites = sites_of(Blocks("plain").eval(), X)
    assert not sites["router"].swappable
    assert "Router.forward does more than a linear" in sites["router"].reason and "topk" in sites["router"].reason


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("left", r"multiplies from the left \(W @ x\)"),
        ("functional", r"used in a matmul by the model's forward, not through a call of the Linear"),
        ("cat", r"read directly \((slice|cat)\)"),
    ],
)
def test_weight_used_outside_its_call_stays_float_with_the_reason(kind, reason):
    torch.manual_seed(0)
    model = Blocks(kind).eval()
    site = sites_of(model, X)["proj"]
    assert not site.swappable
    assert __import__("re").search(reason, site.reason), site.reason
    expected = model(X)
    with pytest.warns(UserWarning, match="stay float"):
        quantized = pymllm_fx.quantize(model, "int8", example_inputs=(X,), progress=False)
    assert type(quantized.proj) is nn.Linear  # its weight is still the real tensor the code reads
    assert rel_err(quantized(X), expected) < 3e-2
    table = io.StringIO()
    pymllm_fx.explain(quantized, file=table)
    row = next(line for line in table.getvalue().splitlines() if line.lstrip().startswith("proj "))
    assert "not quantized" in row


def test_unreached_linear_and_experts_are_reported_in_explain():
    torch.manual_seed(0)
    model = Blocks("plain").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = pymllm_fx.quantize(model, "int8", example_inputs=(X,), progress=False)
    table = io.StringIO()
    pymllm_fx.explain(quantized, file=table)
    text = table.getvalue()
    assert "not reached by the example inputs" in text
    experts = next(line for line in text.splitlines() if "experts" in line)
    assert "4 x 32 x 32" in experts and "multiplied slice by slice" in experts


def test_multihead_attention_out_proj_is_not_swapped_under_its_functional_call():
    """nn.MultiheadAttention reads out_proj.weight itself: swapping out_proj would feed it a stand-in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.MultiheadAttention(16, 2, batch_first=True)).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            h = self.inner[0](x)
            return self.inner[1](h, h, h, need_weights=False)[0]

    wrapped = Wrap().eval()
    sites = sites_of(wrapped, X)
    assert sites["inner.0"].swappable
    assert not sites["inner.1.out_proj"].swappable
    assert "inner.1.in_proj_weight" in sites and not sites["inner.1.in_proj_weight"].swappable
    expected = wrapped(X)
    with pytest.warns(UserWarning, match="stay float"):
        pymllm_fx.quantize(wrapped, "int8", example_inputs=(X,), progress=False)
    assert rel_err(wrapped(X), expected) < 3e-2


def test_module_walk_does_not_swap_a_subclass_with_its_own_forward():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 32)
            self.router = Router(32, 4)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent: capture fails, the module walk runs
                h = h * 2
            return self.router(h)

    with pytest.warns(UserWarning, match="falling back"):
        sites = {s.path: s for s in find_linears(Untraceable(), (X,))}
    assert sites["a"].swappable and not sites["router"].swappable
    assert "has its own forward" in sites["router"].reason
