"""Linear layers that hold a ``quant_method``: the seed's layer side of the plugin contract.

Each layer asks its method to ``create_weights`` in ``__init__`` and calls ``apply`` in
``forward``; it owns the weight loaders, which place a checkpoint tensor (or one logical shard of
it, for merged layers) into this tensor-parallel rank's slice of a parameter. The arithmetic is
written for any ``tp_size``; a RowParallelLinear given a process group all-reduces its output.
"""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Union

import torch
from torch import nn
from torch.nn import Parameter

from pymllm_fx.layers.all_reduce import AllReduce, all_reduce
from pymllm_fx.layers.parameter import copy_into, holds_values, narrow_for_rank, set_weight_attrs, stored_size
from pymllm_fx.layers.quantize_base import LinearMethodBase, UnquantizedLinearMethod
from pymllm_fx.layers.siblings import fuse_again_after_move


def is_conv1d(module: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2): a linear with its weight stored transposed, ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_module(module: nn.Module) -> bool:
    """A float linear a model may hold: what quantize replaces and save_quantized lists as left float."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _divide(numerator: int, denominator: int, what: str, prefix: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{prefix or 'linear layer'}: {what} {numerator} is not divisible by the "
            f"tensor-parallel size {denominator}"
        )
    return numerator // denominator


class LinearBase(nn.Module):
    """Shared constructor: sizes, tensor-parallel position, and the quant method's weights."""

    # True when the module this layer replaced stored its weight (in, out), as transformers' Conv1D
    # (GPT-2) does: its checkpoints keep that layout, so loading and saving transpose ``weight``.
    checkpoint_transposed: bool = False

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_size_per_partition: int,
        output_partition_sizes: List[int],
        bias: bool = True,
        params_dtype: Optional[torch.dtype] = None,
        quant_method: Optional[LinearMethodBase] = None,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        if quant_method is None:
            quant_method = UnquantizedLinearMethod()
        if not isinstance(quant_method, LinearMethodBase):
            raise TypeError(
                f"{prefix or 'linear layer'}: quant_method must be a LinearMethodBase, "
                f"got {type(quant_method).__name__}"
            )
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"{prefix or 'linear layer'}: tp_rank {tp_rank} not in [0, {tp_size})")
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = list(output_partition_sizes)
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.quant_method = quant_method
        self.prefix = prefix
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        quant_method.create_weights(
            self,
            input_size_per_partition,
            self.output_partition_sizes,
            input_size,
            output_size,
            self.params_dtype,
            weight_loader=self.weight_loader,
        )
        self.bias: Optional[Parameter]
        if bias:
            self.bias = Parameter(torch.empty(self._bias_size(), dtype=self.params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": self.weight_loader, **self._bias_attrs()})
        else:
            self.register_parameter("bias", None)

    # nn.Linear-compatible names, so user code that reads them keeps working.
    @property
    def in_features(self) -> int:
        return self.input_size_per_partition

    def refresh_weight_view(self) -> None:
        """Give a layer whose method stores codes instead of a ``weight`` the ``weight`` that model
        code reads of an ``nn.Linear``: its shape (``(in, out)`` for a replaced Conv1D), dtype (the
        layer's float dtype) and device, as a zero-stride view of one zero, so no float copy is
        held. It is a plain attribute, not a parameter or buffer: state_dict, parameters() and
        memory counts do not see it. Arithmetic with it would be wrong, which is why the graph pass
        swaps only layers whose weight the model uses in nothing but their own linear call."""
        if "weight" in self._parameters or "weight" in self._buffers:
            self.__dict__.pop("weight", None)
            return
        anchor = next(iter(self.parameters(recurse=False)), None)
        device = anchor.device if anchor is not None else torch.device("cpu")
        rows, cols = self.out_features, self.input_size_per_partition
        shape = (cols, rows) if self.checkpoint_transposed else (rows, cols)
        self.__dict__["weight"] = torch.zeros((), dtype=self.params_dtype, device=device).expand(shape)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves everything. A cast (``.half()``, ``.to(dtype)``) changes the layer's
        float dtype and the float tensors that hold values in it (scales, zero points, bias, a float
        weight), never stored codes (integers, fp8) nor an fp8 layer's float32 scales (its op reads
        them in float32). Scales and zero points that the new dtype cannot hold (a value that would
        overflow or flush to zero) stay in their dtype, with a warning; the kernels read either."""
        params = {n: p for n, p in self._parameters.items() if p is not None}
        # fp8 layers and methods that declare float32_scales read their scales in float32 (the W8A8 ops).
        method = getattr(self, "scheme", self.quant_method)
        fp8_layer = any(p.is_floating_point() and not holds_values(p) for p in params.values()) or getattr(
            method, "float32_scales", False)
        keep, new_dtype, lossy = set(), None, []
        for name, param in params.items():
            if not holds_values(param):
                continue
            if fp8_layer and param.dtype == torch.float32 and name != "bias":
                keep.add(name)
                continue
            if param.device.type == "meta":
                continue
            out = fn(param.detach())
            if out.dtype != param.dtype and out.is_floating_point():
                new_dtype = out.dtype
                if name != "bias" and bool(((torch.isfinite(param) & ~torch.isfinite(out)) | ((param != 0) & (out == 0))).any()):
                    lossy.append(name)
        if lossy:  # keep the group together: the ops need scales and zero points in one dtype
            keep |= {n for n, p in params.items() if holds_values(p) and n != "bias" and p.dim() > 0}
            warnings.warn(f"pymllm_fx: {self.prefix or type(self).__name__} keeps {sorted(keep)} in "
                          f"{params[lossy[0]].dtype}: {new_dtype} would overflow or flush {lossy} to zero", stacklevel=3)
        kept = {id(params[n]) for n in keep}

        def cast(t):
            out = fn(t)
            if out.dtype != t.dtype and (not holds_values(t) or id(t) in kept):
                return t.to(device=out.device)  # codes (and kept scales) keep their dtype
            return out

        result = super()._apply(cast, recurse)
        if new_dtype is None and "bias" in params:
            probe = fn(torch.empty(0, dtype=self.params_dtype))
            new_dtype = probe.dtype if probe.dtype != self.params_dtype and probe.is_floating_point() else None
        if new_dtype is not None:
            self.params_dtype = new_dtype
        self.refresh_weight_view()
        fuse_again_after_move(self)  # sibling fusion survives model.to(...)
        return result

    @property
    def out_features(self) -> int:
        return sum(self.output_partition_sizes)

    def _bias_size(self) -> int:
        return sum(self.output_partition_sizes)

    def _bias_attrs(self) -> dict:
        return {"output_dim": 0}

    def weight_loader(self, param: Parameter, loaded_weight: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_method={type(self.quant_method).__name__}"
            + (f", tp={self.tp_rank}/{self.tp_size}" if self.tp_size > 1 else "")
        )


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        params_dtype: Optional[torch.dtype] = None,
        quant_method: Optional[LinearMethodBase] = None,
        prefix: str = "",
    ) -> None:
        super().__init__(
            input_size, output_size, input_size, [output_size], bias, params_dtype, quant_method, prefix
        )

    def weight_loader(self, param: Parameter, loaded_weight: torch.Tensor) -> None:
        copy_into(param.data, loaded_weight)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows ``[r*n/tp, (r+1)*n/tp)``."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        params_dtype: Optional[torch.dtype] = None,
        quant_method: Optional[LinearMethodBase] = None,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
        output_sizes: Optional[List[int]] = None,
    ) -> None:
        self.output_sizes = list(output_sizes) if output_sizes is not None else [output_size]
        partition_sizes = [_divide(s, tp_size, "output size", prefix) for s in self.output_sizes]
        super().__init__(
            input_size, output_size, input_size, partition_sizes, bias, params_dtype, quant_method,
            prefix, tp_rank, tp_size,
        )

    def weight_loader(self, param: Parameter, loaded_weight: torch.Tensor) -> None:
        output_dim = getattr(param, "output_dim", None)
        if output_dim is not None:
            shard = param.shape[output_dim]
            loaded_weight = narrow_for_rank(loaded_weight, output_dim, shard, self.tp_rank, shard * self.tp_size)
        copy_into(param.data, loaded_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel weights sharing one input, stored side by side (gate_up_proj).

    Its loader takes ``loaded_shard_id`` = the index of the logical weight in ``output_sizes``;
    with no shard id the tensor is the fused weight and is split into its logical shards.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: List[int],
        bias: bool = True,
        params_dtype: Optional[torch.dtype] = None,
        quant_method: Optional[LinearMethodBase] = None,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__(
            input_size, sum(output_sizes), bias, params_dtype, quant_method, prefix, tp_rank, tp_size,
            output_sizes=output_sizes,
        )

    def _shard_layout(self, shard_id: Union[int, str]):
        """(offset in this rank's param, size on this rank, block index and full size in the checkpoint)."""
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"{self.prefix or 'merged layer'}: shard id {shard_id!r} is not an integer in "
                f"0..{len(self.output_sizes) - 1}"
            )
        offset = sum(self.output_partition_sizes[:shard_id])
        size = self.output_partition_sizes[shard_id]
        return offset, size, self.tp_rank, self.output_sizes[shard_id]

    def _shard_ids(self) -> list:
        return list(range(len(self.output_sizes)))

    def _full_shard_sizes(self) -> List[int]:
        return list(self.output_sizes)

    def weight_loader(
        self, param: Parameter, loaded_weight: torch.Tensor, loaded_shard_id: Optional[Union[int, str]] = None
    ) -> None:
        output_dim = getattr(param, "output_dim", None)
        if output_dim is None:
            if loaded_shard_id is not None:
                raise ValueError(
                    f"{self.prefix}: this parameter has no output_dim, so it cannot take shard "
                    f"{loaded_shard_id!r}; load it whole"
                )
            copy_into(param.data, loaded_weight)
            return
        if loaded_shard_id is None:
            # A fused checkpoint tensor: split it along the output dim into its logical weights.
            sizes = [stored_size(param, output_dim, s) for s in self._full_shard_sizes()]
            if loaded_weight.dim() <= output_dim or loaded_weight.shape[output_dim] != sum(sizes):
                raise ValueError(
                    f"expected {sum(sizes)} along dim {output_dim} of the fused tensor, found shape "
                    f"{tuple(loaded_weight.shape)}"
                )
            for shard_id, piece in zip(self._shard_ids(), loaded_weight.split(sizes, dim=output_dim)):
                self.weight_loader(param, piece, shard_id)
            return
        offset, size, block, full = self._shard_layout(loaded_shard_id)
        offset = stored_size(param, output_dim, offset)
        size = stored_size(param, output_dim, size)
        full = stored_size(param, output_dim, full)
        loaded_weight = narrow_for_rank(loaded_weight, output_dim, size, block, full)
        copy_into(param.data.narrow(output_dim, offset, size), loaded_weight)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Query, key and value projections fused into one layer, split by heads across ranks.

    Shard ids are ``"q"``, ``"k"``, ``"v"``. When there are fewer key/value heads than ranks,
    each key/value head is replicated on ``tp_size / total_num_kv_heads`` ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: Optional[int] = None,
        bias: bool = True,
        params_dtype: Optional[torch.dtype] = None,
        quant_method: Optional[LinearMethodBase] = None,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "number of attention heads", prefix)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            if tp_size % total_num_kv_heads:
                raise ValueError(
                    f"{prefix or 'qkv layer'}: cannot replicate {total_num_kv_heads} kv heads evenly: the "
                    f"tensor-parallel size {tp_size} is not divisible by {total_num_kv_heads}"
                )
            self.num_kv_head_replicas = tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "number of key/value heads", prefix)
            self.num_kv_head_replicas = 1
        q_size = self.num_heads * head_size * tp_size
        kv_size = self.num_kv_heads * head_size * tp_size
        super().__init__(
            hidden_size, [q_size, kv_size, kv_size], bias, params_dtype, quant_method, prefix, tp_rank, tp_size
        )

    def _shard_ids(self) -> list:
        return ["q", "k", "v"]

    def _full_shard_sizes(self) -> List[int]:
        kv = self.total_num_kv_heads * self.head_size
        return [self.total_num_heads * self.head_size, kv, kv]

    def _shard_layout(self, shard_id: Union[int, str]):
        q = self.num_heads * self.head_size
        kv = self.num_kv_heads * self.head_size
        if shard_id == "q":
            return 0, q, self.tp_rank, self.total_num_heads * self.head_size
        if shard_id in ("k", "v"):
            offset = q if shard_id == "k" else q + kv
            return offset, kv, self.tp_rank // self.num_kv_head_replicas, self.total_num_kv_heads * self.head_size
        raise ValueError(f"{self.prefix or 'qkv layer'}: shard id {shard_id!r} is not one of 'q', 'k', 'v'")


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the bias is added once, on rank 0.

    With a ``process_group`` the partial sums are all-reduced over it through torch's functional
    collectives, which ``torch.compile`` traces into the graph (no graph break), or through
    symmetric memory after ``use_symmetric_memory`` (``all_reduce_with``); without one the layer
    returns this rank's partial sum.
    """

    all_reduce_with: Optional[AllReduce] = None  # None: the functional collective (NCCL)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        params_dtype: Optional[torch.dtype] = None,
        quant_method: Optional[LinearMethodBase] = None,
        prefix: str = "",
        tp_rank: int = 0,
        tp_size: int = 1,
        process_group: Optional[Any] = None,
    ) -> None:
        self.process_group = process_group
        per_partition = _divide(input_size, tp_size, "input size", prefix)
        super().__init__(
            input_size, output_size, per_partition, [output_size], bias, params_dtype, quant_method,
            prefix, tp_rank, tp_size,
        )

    def _bias_size(self) -> int:
        return self.output_size

    def _bias_attrs(self) -> dict:
        return {}

    def weight_loader(self, param: Parameter, loaded_weight: torch.Tensor) -> None:
        input_dim = getattr(param, "input_dim", None)
        if input_dim is not None:
            shard = param.shape[input_dim]
            loaded_weight = narrow_for_rank(loaded_weight, input_dim, shard, self.tp_rank, shard * self.tp_size)
        copy_into(param.data, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        out = self.quant_method.apply(self, x, bias)
        if self.process_group is not None and self.tp_size > 1:
            out = all_reduce(out, self.process_group, self.all_reduce_with)
        return out
