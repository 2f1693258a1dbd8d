"""``save_quantized``: write a quantized model as a checkpoint that other tools load.

The inverse of loading: every quantized layer's runtime tensors (the W4A16 / W8A16 / fp8 layouts
of ``kernels/``) are turned back into one checkpoint format's tensors, the other tensors are
written as they are, and ``config.json`` gets the ``quantization_config`` the format's own tools
write. A layer the asked format cannot hold exactly is refused with a ValueError naming the layer
and the format to use instead, before anything is written: nothing is ever rounded to fit.

This module is format-agnostic. Formats are found by name in ``loading/formats.py``; each one's
writer (``checkpoint_config`` / ``checkpoint_tensors``) lives beside its reader in its method file
(``methods/awq.py``, ``gptq.py``, ``compressed_tensors.py``, ``fp8_checkpoint.py``), which documents
the format and the tool it follows.

How a layer is recognised: its quant method's optional ``checkpoint_view(layer, where)`` hook (see
``layers/quantize_base.py``) says what the layer is in checkpoint terms (a ``Quantized``). The
runtime tensors alone do not say the checkpoint's group size (AWQ / GPTQ groups of 256 run as
runtime groups of 128) nor how activations are quantized, and a hook keeps the seed interface
(``create_weights`` / ``apply`` / ``process_weights_after_loading``) untouched. A method without
the hook cannot be saved.

Quantized experts (``FusedMoE``) are written one linear per expert and projection, named as
transformers' ``save_pretrained`` names the float experts (``renames.expert_checkpoint_names``);
the experts method's ``checkpoint_expert_view`` reads one expert's stack in checkpoint terms, and
every format's writer takes it as it takes a linear layer.

Merged layers (``MergedColumnParallelLinear`` / ``QKVParallelLinear``) are written split into the
checkpoint names given by ``merged_layers``. GPT-2 ``Conv1D`` sites keep their original names and
their ``(in, out)`` float / fp8 ``weight`` layout (what ``api.quantize``'s loader transposes back);
packed int tensors have one layout for every module. Tied weights are written once, under the
name ``save_pretrained`` keeps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from pymllm_fx.layers.checkpoint_view import Quantized
from pymllm_fx.layers.fused_moe import FusedMoE
from pymllm_fx.layers.linear import LinearBase, is_linear_module
from pymllm_fx.layers.quantize_base import UnquantizedLinearMethod
from pymllm_fx.loading.formats import Site, format_writer
from pymllm_fx.loading.renames import expert_checkpoint_names

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|\.pymllm_fx-shard-\d{5}\.tmp")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# --- a layer in checkpoint terms, through its method's hooks ------------------------------------------


def read_layer(layer: nn.Module, where: str = "") -> Optional[Quantized]:
    """The quantized weight of a pymllm_fx linear layer in checkpoint terms, or None if it is float."""
    where = where or getattr(layer, "prefix", "") or "layer"
    method = layer.quant_method
    left_float = getattr(layer, "left_float", None)  # a layer its checkpoint left unquantized (methods/common.LeftFloat)
    if isinstance(method, UnquantizedLinearMethod) or isinstance(left_float, UnquantizedLinearMethod):
        return None
    view = getattr(method, "checkpoint_view", None)
    if view is None:
        raise ValueError(
            f"{where}: save_quantized does not know how to export layers quantized with {type(method).__name__}; "
            f"skip this layer when quantizing, or give the method a checkpoint_view (pymllm_fx/layers/quantize_base.py)"
        )
    return view(layer, where)


def read_expert(layer: FusedMoE, which: str, expert: int, where: str = "") -> Quantized:
    """One expert's ``which`` ("w13": gate and up rows, "w2": down) of a quantized experts layer in
    checkpoint terms."""
    where = where or layer.prefix or "experts"
    view = getattr(layer.quant_method, "checkpoint_expert_view", None)
    if view is None:
        raise ValueError(f"{where}: save_quantized does not know how to export experts quantized with "
                         f"{type(layer.quant_method).__name__}; skip these experts when quantizing")
    return view(layer, which, expert, where)



def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy: safetensors refuses tensors that share memory (views, tied weights)."""
    return t.detach().to("cpu").clone(memory_format=torch.contiguous_format)



# --- a model's layers, split and named as the checkpoint names them -----------------------------------


@dataclass
class _Layer:
    layer: LinearBase
    names: List[str]  # one checkpoint module name per logical weight (output partition)
    conv1d: bool


@dataclass
class _Experts:
    """A quantized experts layer, written as one linear per expert and projection."""

    layer: FusedMoE
    names: Dict[Tuple[str, int, int], str]  # (stack, expert, first row) -> checkpoint module name

    def sites(self, path: str) -> Iterator[Site]:
        part = {"w13": self.layer.intermediate_size_per_partition, "w2": self.layer.hidden_size}
        for (which, expert, first), name in self.names.items():
            q = read_expert(self.layer, which, expert, path)
            yield Site(name, q.rows(first, first + part[which]), expert=True)


def _shards(layer: _Layer, q: Optional[Quantized]) -> Iterator[Tuple[str, Optional[Quantized], int, int]]:
    """(checkpoint name, its rows of ``q``, first row, end row) for each logical weight of the layer."""
    start = 0
    for name, size in zip(layer.names, layer.layer.output_partition_sizes):
        yield name, None if q is None else q.rows(start, start + size), start, start + size
        start += size


class _Export:
    """One format's plan for a set of layers: checks every layer first, then yields tensors."""

    def __init__(self, fmt: str, layers: Dict[str, _Layer], floats: List[str]) -> None:
        self.writer = format_writer(fmt)
        self.layers = layers
        floats = list(floats)
        sites = []
        for path, entry in layers.items():
            if isinstance(entry, _Experts):
                sites.extend(entry.sites(path))
                continue
            q = read_layer(entry.layer, path)
            for name, part, _, _ in _shards(entry, q):
                if part is None:
                    floats.append(name)
                else:
                    sites.append(Site(name, part, entry.conv1d))
        self.floats = floats
        self.quantized = len(sites)
        self.config = self.writer.checkpoint_config(sites, floats)

    def tensors(self, path: str) -> Iterator[Tuple[str, torch.Tensor]]:
        entry = self.layers[path]
        if isinstance(entry, _Experts):
            for site in entry.sites(path):
                for key, tensor in self.writer.checkpoint_tensors(site, self.config).items():
                    yield f"{site.name}.{key}", _cpu(tensor)
            return
        layer = entry.layer
        q = read_layer(layer, path)
        bias = layer.bias.data if layer.bias is not None else None
        for name, part, start, stop in _shards(entry, q):
            if part is None:
                weight = layer.weight.data[start:stop]
                tensors = {"weight": weight.t() if entry.conv1d else weight}
            else:
                tensors = self.writer.checkpoint_tensors(Site(name, part, entry.conv1d), self.config)
            if bias is not None:
                tensors["bias"] = bias[start:stop]
            for key, tensor in tensors.items():
                yield f"{name}.{key}", _cpu(tensor)


def _check_layer(path: str, layer: LinearBase, names: Sequence[str]) -> None:
    if layer.tp_size != 1:
        raise ValueError(
            f"{path}: this layer holds tensor-parallel rank {layer.tp_rank} of {layer.tp_size}, not the whole "
            f"weight; export from a model built with tp_size=1"
        )
    sizes = layer.output_partition_sizes
    if len(names) != len(sizes):
        raise ValueError(
            f"{path}: this layer holds {len(sizes)} merged weights (output sizes {sizes}) but {len(names)} "
            f"checkpoint name(s) were given ({list(names)}); pass merged_layers={{{path!r}: [one name per weight]}}"
        )


def export_layer(layer: LinearBase, format: str, names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """One layer's checkpoint tensors in ``format``, named ``<name>.<tensor>``.

    ``names``: the checkpoint module names of a merged layer's weights (``[q_proj, k_proj, v_proj]``);
    default ``[layer.prefix]``. Format-wide choices (GPTQ v1 or v2, ...) are made for this layer alone.
    """
    path = getattr(layer, "prefix", "") or "layer"
    names = list(names) if names is not None else [path]
    _check_layer(path, layer, names)
    export = _Export(format, {path: _Layer(layer, names, False)}, [])
    return dict(export.tensors(path))


# --- the whole model ----------------------------------------------------------------------------------


def save_quantized(
    model: nn.Module,
    path: Union[str, Path],
    format: str = "awq",
    *,
    max_shard_size: Union[int, str] = "5GB",
    progress: bool = True,
    merged_layers: Optional[Mapping[str, Sequence[str]]] = None,
) -> Path:
    """Write a model quantized by ``pymllm_fx.quantize`` to the directory ``path``, as a ``format`` checkpoint.

    ``format``: ``"awq"``, ``"gptq"``, ``"compressed-tensors"``, ``"fp8"``, or one added with
    ``loading.formats.register_format``. Writes ``config.json``
    (the model's HF config with the format's ``quantization_config``) and ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_size`` (bytes, or "5GB",
    "500MiB", ...) with ``model.safetensors.index.json``. ``merged_layers`` maps a merged layer's
    path to the checkpoint names of its weights. Every layer is checked before anything is written:
    one the format cannot hold exactly raises ValueError naming it and the format to use instead.
    Returns the directory.
    """
    fmt = str(format).lower()
    format_writer(format)  # an unknown format is refused before anything else
    max_bytes = parse_size(max_shard_size)
    merged = {key: list(value) for key, value in (merged_layers or {}).items()}
    modules = dict(model.named_modules())
    unknown = sorted(name for name in merged if not isinstance(modules.get(name), LinearBase))
    if unknown:
        raise ValueError(
            f"merged_layers names {unknown}, which are not pymllm_fx linear layers of this model; use the paths "
            f"of its merged layers (MergedColumnParallelLinear / QKVParallelLinear)"
        )
    layers: Dict[str, Union[_Layer, _Experts]] = {}
    floats: List[str] = []
    for name, module in modules.items():
        if isinstance(module, FusedMoE):
            layers[name] = _Experts(module, _expert_names(model, name, module))
        elif isinstance(module, LinearBase):
            names = merged.get(name, [name])
            _check_layer(name, module, names)
            layers[name] = _Layer(module, names, module.checkpoint_transposed)
        elif is_linear_module(module):
            floats.append(name)
    export = _Export(fmt, layers, floats)  # raises before anything is written
    if not export.quantized:
        raise ValueError(
            f"{type(model).__name__} has no quantized layers; quantize it first, e.g. "
            f"pymllm_fx.quantize(model, 'int4'), then save it"
        )
    config = _config_json(model, export.config)

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; pass a directory to write the checkpoint into")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # a previous save's weights would mix with these
        if old.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.fullmatch(old.name):
            old.unlink()
    bar = tqdm(total=len(layers), desc="saving", unit="layer", disable=not progress)
    with bar:
        _write_shards(out, _model_tensors(model, layers, export, bar), max_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n")
    return out


def _expert_names(model: nn.Module, path: str, layer: FusedMoE) -> Dict[Tuple[str, int, int], str]:
    """Each expert projection's checkpoint name, as transformers saves the float model; refuses
    experts it cannot write one linear per expert for."""
    fix = "quantize it with skip=['lm_head', '*.experts'] to save it (its experts then stay float)"
    if layer.tp_size != 1:
        raise ValueError(f"{path}: this experts layer holds tensor-parallel rank {layer.tp_rank} of {layer.tp_size}, "
                         f"not the whole experts; export from a model built with tp_size=1")
    if layer.w13_bias is not None or layer.w2_bias is not None:
        raise ValueError(f"{path}: the checkpoint formats store experts as one linear per expert, but these experts "
                         f"have stacked biases, which such checkpoints do not hold; {fix}")
    names = expert_checkpoint_names(model, path, layer.num_experts, layer.has_gate, layer.intermediate_size_per_partition)
    if not names:
        raise ValueError(f"{path}: transformers' rules for {type(model).__name__} keep these experts stacked in "
                         f"checkpoints (no per-expert names), and the quantized formats store one linear per expert "
                         f"and projection; {fix}")
    return names


def _model_tensors(model: nn.Module, layers: Dict[str, _Layer], export: _Export, bar) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor to write, in state_dict order; a pymllm_fx layer's tensors where its first one was."""
    state = model.state_dict()
    duplicates = _tied_duplicates(model, state, layers)
    done: Set[str] = set()
    for name, tensor in state.items():
        owner = name.rpartition(".")[0]
        if owner in layers:
            if owner not in done:
                done.add(owner)
                yield from export.tensors(owner)
                bar.update(1)
            continue
        if name not in duplicates:
            yield name, _cpu(tensor)


def _tied_duplicates(model: nn.Module, state: Dict[str, torch.Tensor], layers: Dict[str, _Layer]) -> Set[str]:
    """Names of state_dict entries that are another entry's tensor (tied weights), to leave out.

    Of each tied set, the name save_pretrained keeps is kept: not a key of ``_tied_weights_keys``.
    """
    tied = getattr(model, "_tied_weights_keys", None) or ()
    targets = set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()
    kept: Dict[tuple, str] = {}
    drop: Set[str] = set()
    for name, t in state.items():
        if name.rpartition(".")[0] in layers:
            continue
        if t.device.type == "meta":
            raise ValueError(f"{name}: the tensor is on the meta device (never loaded); load the model's weights first")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        first = kept.get(key)
        if first is None:
            kept[key] = name
        elif first in targets and name not in targets:
            kept[key] = name
            drop.add(first)
        else:
            drop.add(name)
    return drop


def _write_shards(out: Path, tensors: Iterator[Tuple[str, torch.Tensor]], max_bytes: int) -> None:
    """Write ``model.safetensors``, or shards of at most ``max_bytes`` (a bigger tensor gets its own)
    plus the index, as save_pretrained names them."""
    files: List[Tuple[Path, List[str]]] = []
    current: Dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        temp = out / f".pymllm_fx-shard-{len(files):05d}.tmp"
        save_file(current, str(temp), metadata={"format": "pt"})
        files.append((temp, list(current)))
        current.clear()

    seen: Set[str] = set()
    try:
        for name, tensor in tensors:
            if name in seen:
                raise ValueError(f"{name}: two tensors would be written under this name; check merged_layers")
            seen.add(name)
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_bytes:
                flush()
                size = 0
            current[name] = tensor
            size += nbytes
            total += nbytes
        if current or not files:
            flush()
    except BaseException:
        for temp, _ in files:
            temp.unlink(missing_ok=True)
        raise
    if len(files) == 1:
        files[0][0].replace(out / WEIGHTS_NAME)
        return
    weight_map = {}
    for i, (temp, names) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        temp.replace(out / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "5GB" (10**9) or "500MiB" (2**20), as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
        if match is None or match.group(2) not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size; use bytes or a string such as '5GB' or '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _config_json(model: nn.Module, quantization_config: dict) -> dict:
    """The model's HF config as save_pretrained writes it, plus ``quantization_config``."""
    config = getattr(model, "config", None)
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config) if isinstance(config, dict) else {}
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    for key in ("dtype", "torch_dtype"):  # save_pretrained records the float weights' dtype
        if key in data and data[key] is None:
            data[key] = str(_float_dtype(model)).rpartition(".")[2]
    data["quantization_config"] = quantization_config
    return data


def _float_dtype(model: nn.Module) -> torch.dtype:
    plain = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    return next((p.dtype for p in model.parameters() if p.dtype in plain), torch.float32)


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).rpartition(".")[2]
    raise TypeError(f"config.json cannot hold a {type(value).__name__} ({value!r})")
