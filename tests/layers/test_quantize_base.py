"""The seed plugin interface: abstract base classes, a user-written method, and the unquantized one."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Parameter

import pymllm_fx
from pymllm_fx.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pymllm_fx.layers.parameter import set_weight_attrs
from pymllm_fx.layers.quantize_base import LinearMethodBase, QuantizeMethodBase, UnquantizedLinearMethod

# --- (1) the abstract interface --------------------------------------------------------------


def test_base_classes_are_abstract():
    with pytest.raises(TypeError, match="abstract"):
        QuantizeMethodBase()
    with pytest.raises(TypeError, match="abstract"):
        LinearMethodBase()


class _OnlyCreate(LinearMethodBase):
    def create_weights(self, layer, *args, **kwargs):
        pass


class _OnlyApply(LinearMethodBase):
    def apply(self, layer, x, bias=None):
        return x


class _GenericOnlyApply(QuantizeMethodBase):
    def apply(self, layer, *args, **kwargs):
        return args[0]


@pytest.mark.parametrize(
    "cls, missing",
    [(_OnlyCreate, "apply"), (_OnlyApply, "create_weights"), (_GenericOnlyApply, "create_weights")],
)
def test_subclass_missing_a_method_cannot_be_instantiated(cls, missing):
    with pytest.raises(TypeError, match=missing):
        cls()


class _Complete(LinearMethodBase):
    def create_weights(self, layer, *args, **kwargs):
        pass

    def apply(self, layer, x, bias=None):
        return x


def test_default_process_weights_after_loading_is_a_noop():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert _Complete().process_weights_after_loading(layer) is None
    assert UnquantizedLinearMethod().process_weights_after_loading(layer) is None
    after = layer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(_Complete(), QuantizeMethodBase)


def test_layer_refuses_a_non_method():
    class NotAMethod:
        def create_weights(self, *a, **k):
            pass

    with pytest.raises(TypeError, match="my.proj.*LinearMethodBase"):
        ReplicatedLinear(8, 4, quant_method=NotAMethod(), prefix="my.proj")


# --- (2) a method written only against LinearMethodBase --------------------------------------


class TransposedStoreMethod(LinearMethodBase):
    """Keeps the weight as (in, out) and computes ``x @ W_kn``.

    Its own weight_loader transposes the checkpoint's (out, in) tensor and hands it to the layer's
    loader; because the param says ``output_dim=1, input_dim=0``, the layer shards the right dim.
    After loading, the param is swapped for a contiguous buffer-like param ``w_kn``.
    """

    def __init__(self) -> None:
        self.processed: List[str] = []

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: List[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        weight = Parameter(
            torch.empty(input_size_per_partition, sum(output_partition_sizes), dtype=params_dtype),
            requires_grad=False,
        )
        layer_loader = extra_weight_attrs.pop("weight_loader")

        def loader(param, loaded_weight, *shard_id):
            layer_loader(param, loaded_weight.t(), *shard_id)

        set_weight_attrs(weight, {"input_dim": 0, "output_dim": 1, "weight_loader": loader, **extra_weight_attrs})
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.processed.append(getattr(layer, "prefix", ""))
        w_kn = layer.weight.data.contiguous()
        del layer.weight
        layer.register_parameter("w_kn", Parameter(w_kn, requires_grad=False))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.matmul(x, layer.w_kn)
        return out if bias is None else out + bias


class ScaledByTwoMethod(LinearMethodBase):
    """Stores half the weight after loading and multiplies by two at run time (exact in float)."""

    def __init__(self) -> None:
        self.processed: List[str] = []

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        weight = Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer):
        self.processed.append(getattr(layer, "prefix", ""))
        half = layer.weight.data / 2
        del layer.weight
        layer.register_parameter("half_weight", Parameter(half, requires_grad=False))

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.half_weight * 2, bias)


USER_METHODS = [TransposedStoreMethod, ScaledByTwoMethod]


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.act = nn.GELU()
        self.down = nn.Linear(48, 16, bias=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.down(self.act(self.up(x))))


@pytest.mark.parametrize("method_cls", USER_METHODS, ids=lambda c: c.__name__)
def test_user_method_through_quantize(method_cls):
    torch.manual_seed(1)
    model = TinyMLP().eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        ref = model(x)
    method = method_cls()
    returned = pymllm_fx.quantize(model, method, example_inputs=(x,), progress=False)
    assert returned is model
    for path in ("up", "down"):
        layer = model.get_submodule(path)
        assert isinstance(layer, ReplicatedLinear) and layer.quant_method is method
        assert "weight" not in dict(layer.named_parameters())  # post-processing ran
    assert sorted(method.processed) == ["down", "up"]  # once per layer
    assert isinstance(model.norm, nn.LayerNorm)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("method_cls", USER_METHODS, ids=lambda c: c.__name__)
def test_user_method_through_layers_directly(method_cls):
    """Replicated, column (tp 2), row (tp 2) and merged layers load through the method's params."""
    torch.manual_seed(2)
    in_f, out_f = 24, 16
    w, b = torch.randn(out_f, in_f), torch.randn(out_f)
    x = torch.randn(4, in_f)
    full = F.linear(x, w, b)

    def finish(layer):
        layer.quant_method.process_weights_after_loading(layer)
        return layer

    rep = ReplicatedLinear(in_f, out_f, quant_method=method_cls(), prefix="rep")
    rep.weight.weight_loader(rep.weight, w)
    rep.bias.weight_loader(rep.bias, b)
    torch.testing.assert_close(finish(rep)(x), full)

    cols = []
    for rank in range(2):
        col = ColumnParallelLinear(in_f, out_f, quant_method=method_cls(), prefix="col", tp_rank=rank, tp_size=2)
        col.weight.weight_loader(col.weight, w)
        col.bias.weight_loader(col.bias, b)
        cols.append(finish(col)(x))
    torch.testing.assert_close(torch.cat(cols, dim=-1), full)

    partial = []
    for rank in range(2):
        row = RowParallelLinear(in_f, out_f, quant_method=method_cls(), prefix="row", tp_rank=rank, tp_size=2)
        row.weight.weight_loader(row.weight, w)
        row.bias.weight_loader(row.bias, b)
        partial.append(finish(row)(x[:, rank * 12:(rank + 1) * 12]))
    torch.testing.assert_close(partial[0] + partial[1], full)

    merged = MergedColumnParallelLinear(in_f, [6, 10], quant_method=method_cls(), prefix="merged")
    merged.weight.weight_loader(merged.weight, w[6:], 1)
    merged.weight.weight_loader(merged.weight, w[:6], 0)
    merged.bias.weight_loader(merged.bias, b)
    torch.testing.assert_close(finish(merged)(x), full)


def test_user_method_apply_needs_post_processing():
    """apply() reads the runtime param, so forgetting process_weights_after_loading is loud."""
    layer = ReplicatedLinear(8, 4, quant_method=TransposedStoreMethod())
    with pytest.raises(AttributeError, match="w_kn"):
        layer(torch.randn(2, 8))


# --- (3) the unquantized method --------------------------------------------------------------


def test_unquantized_create_weights_contract():
    calls = []

    def loader(param, loaded):
        calls.append(loaded)

    layer = nn.Module()
    UnquantizedLinearMethod().create_weights(layer, 24, [8, 12], 48, 20, torch.bfloat16, weight_loader=loader, extra_flag=7)
    w = layer.weight
    assert isinstance(w, Parameter) and w.shape == (20, 24) and w.dtype == torch.bfloat16
    assert not w.requires_grad
    assert (w.input_dim, w.output_dim, w.extra_flag) == (1, 0, 7)
    assert w.weight_loader is loader


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_unquantized_matches_f_linear(dtype, bias, lead):
    torch.manual_seed(3)
    layer = ReplicatedLinear(40, 24, bias=bias, params_dtype=dtype)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    w = torch.randn(24, 40).to(dtype)
    b = torch.randn(24).to(dtype) if bias else None
    layer.weight.weight_loader(layer.weight, w)
    if bias:
        layer.bias.weight_loader(layer.bias, b)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(*lead, 40).to(dtype)
    out = layer(x)
    assert torch.equal(out, F.linear(x, w, b))
    assert torch.equal(layer.quant_method.apply(layer, x, None), F.linear(x, w))
