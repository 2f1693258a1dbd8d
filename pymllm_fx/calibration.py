"""GPTQ calibration of a decoder-only model, one decoder block at a time.

``api.quantize(model, {"quant_method": "int4", "gptq": True, ...}, calibration=...)`` calls
:func:`gptq_calibrate`, which returns every planned linear's GPTQ result and never changes the
model: api then builds and swaps the layers through its usual all-or-nothing path.

How it runs (the sequential scheme of GPTQ, AutoGPTQ and GPTQModel, without a per-model table):

1. The blocks are the ``nn.ModuleList`` whose children hold the most of the linears to quantize.
2. Calibration sequences of equal length are stacked into batches (up to ``BATCH_TOKENS`` tokens,
   no padding). Each batch runs through the model once with every block's ``forward`` replaced,
   for that call only, by a recorder: it keeps the positional and keyword arguments the model
   passes to that block (hidden states, position embeddings, the block's own attention mask, ...)
   and hands the hidden states on unchanged; the last block's recorder stops the forward. So only
   the embeddings run here, and a model that gives each layer its own mask (sliding-window
   layers) has it recorded per layer. Block 0 runs for real once, to learn what a block returns.
3. Block by block, a copy of the block on the compute device (the model's GPU, else a GPU if there
   is one, else the CPU) is quantized in the order its linears run: one forward of the first
   batch finds that order and which linears read the same input tensor (q/k/v, gate/up: one
   Hessian, one GPTQ call on their stacked rows). For each such group, the batches run through
   the copy with the earlier groups already quantized (GPTQ's "true sequential"), a forward
   pre-hook adds ``X^T X`` of the group's input and stops the forward, then GPTQ rounds the group
   and its dequantized weights go into the copy. The fully quantized copy then turns this
   block's inputs into the next block's.

Memory: the model as it is, plus one block copy, one Hessian, the results so far (packed int4), and
the hidden states of the calibration tokens twice (a block's inputs and outputs).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from pymllm_fx.methods.int4_gptq import (
    GPTQInt4LinearMethod,
    GPTQWeight,
    add_to_hessian,
    dequantize,
    gptq_quantize,
    pack_result,
)


class _Stop(Exception):
    """Raised from a hook to end a forward once what it was run for has been recorded."""


# --- calibration inputs ---------------------------------------------------------------------------


def calibration_sequences(calibration: Any, vocab_size: Optional[int]) -> List[torch.Tensor]:
    """Token-id sequences (int64, ``(1, L)``, CPU) from ``calibration``: a list of token-id tensors
    (1-D, or 2-D with one sequence per row), or ``(texts, tokenizer)`` (each text one sequence).
    Anything else is a ValueError naming the entry, what is wrong, and how to fix it."""
    if isinstance(calibration, tuple) and len(calibration) == 2 and callable(calibration[1]) \
            and not isinstance(calibration[1], torch.Tensor):
        texts, tokenizer = calibration
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError("calibration=(texts, tokenizer) needs texts as a list of strings, got "
                             f"{type(texts).__name__}")
        sequences = []
        for i, text in enumerate(texts):
            ids = tokenizer(text)["input_ids"]
            sequences.append(torch.as_tensor(ids))
            if sequences[-1].numel() == 0:
                raise ValueError(f"calibration text {i} tokenizes to no tokens; pass texts with content")
        where = "text"
    elif isinstance(calibration, torch.Tensor):
        sequences, where = [calibration], "tensor"
    elif isinstance(calibration, (list, tuple)):
        sequences, where = list(calibration), "sequence"
    else:
        raise ValueError(f"calibration must be a list of token-id tensors or (texts, tokenizer), got "
                         f"{type(calibration).__name__}")
    if not sequences:
        raise ValueError("calibration is empty: GPTQ needs at least one sequence of token ids (typically 128 "
                         "sequences of 2048 tokens of text like the model's use), e.g. calibration=[ids, ...] or "
                         "calibration=(texts, tokenizer)")
    rows: List[torch.Tensor] = []
    for i, seq in enumerate(sequences):
        if not isinstance(seq, torch.Tensor):
            raise ValueError(f"calibration {where} {i} is a {type(seq).__name__}, not a tensor of token ids; pass "
                             f"torch.tensor(ids) (or calibration=(texts, tokenizer))")
        if seq.dtype == torch.bool or seq.dtype.is_floating_point or seq.dtype.is_complex:
            raise ValueError(f"calibration {where} {i} has dtype {seq.dtype}; token ids must be integers "
                             f"(torch.long), e.g. tokenizer(text, return_tensors='pt').input_ids")
        if seq.dim() == 1:
            seq = seq[None]
        if seq.dim() != 2:
            raise ValueError(f"calibration {where} {i} has shape {tuple(seq.shape)}; pass 1-D token ids, or 2-D "
                             f"(sequences, tokens)")
        if seq.shape[1] == 0:
            raise ValueError(f"calibration {where} {i} has no tokens (shape {tuple(seq.shape)}); every sequence "
                             f"needs at least one token")
        if vocab_size is not None and seq.numel() and (int(seq.min()) < 0 or int(seq.max()) >= vocab_size):
            raise ValueError(f"calibration {where} {i} holds token ids in [{int(seq.min())}, {int(seq.max())}], "
                             f"outside the model's vocabulary [0, {vocab_size}); tokenize with the model's own "
                             f"tokenizer")
        rows.extend(row[None].to("cpu", torch.long) for row in seq)
    return rows


BATCH_TOKENS = 16384  # tokens per forward: sequences of one length run together, up to this many


def batch_sequences(sequences: List[torch.Tensor], max_tokens: int = BATCH_TOKENS) -> List[torch.Tensor]:
    """Sequences of equal length stacked into batches ``(B, L)`` of at most ``max_tokens`` tokens (at
    least one sequence each): fewer, larger forwards, and no padding, so the model builds every
    block's arguments (masks, positions) for exactly the batch it runs."""
    by_length: Dict[int, List[torch.Tensor]] = {}
    for seq in sequences:
        by_length.setdefault(seq.shape[1], []).append(seq)
    batches = []
    for length, rows in by_length.items():
        step = max(1, max_tokens // length)
        batches.extend(torch.cat(rows[i:i + step]) for i in range(0, len(rows), step))
    return batches


def vocabulary_size(model: nn.Module) -> Optional[int]:
    """Rows of the input embedding (or the config's ``vocab_size``), None when the model has neither."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


# --- the blocks -----------------------------------------------------------------------------------


def find_blocks(model: nn.Module, paths: Sequence[str]) -> Tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` (path, list) whose children hold the most of ``paths``: a decoder's
    layers, found from the module structure rather than a table of model types."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{name}." if name else ""
        count = sum(path.startswith(prefix) and path[len(prefix):].split(".")[0].isdigit() for path in paths)
        if count > best_count:
            best, best_count = name, count
    if best is None:
        raise ValueError(f"GPTQ calibration runs a model block by block, but no nn.ModuleList of {type(model).__name__} "
                         f"holds any of the linears to quantize; it needs a decoder whose layers sit in a ModuleList "
                         f"(e.g. model.layers), or use the calibration-free {{'quant_method': 'int4'}}")
    return best, model.get_submodule(best)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def compute_device(model: nn.Module, device: Optional[Any]) -> torch.device:
    """Where the blocks are calibrated: ``device`` when it is CUDA, else the model's GPU, else a GPU
    when there is one (blocks are copied there one at a time), else the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.device(device)
    here = _device_of(model)
    if here.type == "cuda":
        return here
    return torch.device("cuda") if torch.cuda.is_available() else here


def _hidden_slot(args: tuple, kwargs: dict, where: str) -> Tuple[str, Any]:
    if args and isinstance(args[0], torch.Tensor):
        return "arg", 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "kw", "hidden_states"
    raise ValueError(f"{where} was called without its hidden states as the first argument or as hidden_states=; "
                     f"GPTQ calibration cannot feed it block by block")


class _BlockCall:
    """One recorded call of a block, with its hidden-states argument left out (fed per block)."""

    def __init__(self, args: tuple, kwargs: dict, where: str, device: torch.device, moved: dict) -> None:
        self.slot = _hidden_slot(args, kwargs, where)

        def move(value):
            if isinstance(value, torch.Tensor):  # tensors several blocks share are moved once
                if id(value) not in moved:  # the source is kept in ``moved``, so its id stays its own
                    moved[id(value)] = (value, value.to(device))
                return moved[id(value)][1]
            if isinstance(value, tuple):
                return tuple(move(v) for v in value)
            if isinstance(value, list):
                return [move(v) for v in value]
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        kind, key = self.slot
        self.args = tuple(None if (kind == "arg" and i == key) else move(a) for i, a in enumerate(args))
        self.kwargs = {k: None if (kind == "kw" and k == key) else move(v) for k, v in kwargs.items()}

    def hidden(self, args: tuple, kwargs: dict) -> torch.Tensor:
        kind, key = self.slot
        return args[key] if kind == "arg" else kwargs[key]

    def run(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        kind, key = self.slot
        args = tuple(hidden if (kind == "arg" and i == key) else a for i, a in enumerate(self.args))
        kwargs = {k: hidden if (kind == "kw" and k == key) else v for k, v in self.kwargs.items()}
        return block(*args, **kwargs)


def _block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned: the tensor itself, or the first item of a tuple."""
    return out if isinstance(out, torch.Tensor) else out[0]


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, list_path: str, batches: List[torch.Tensor],
                         device: torch.device) -> Tuple[List[torch.Tensor], List[List[_BlockCall]]]:
    """Block 0's hidden states per batch of token ids, and every block's recorded call per batch, on
    ``device``. The model is left as it was (forwards restored, training flags restored)."""
    model_device = _device_of(model)
    accepts = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in accepts else {}
    last = len(blocks) - 1
    calls: List[List[_BlockCall]] = [[] for _ in blocks]
    hidden0: List[torch.Tensor] = []
    returns: List[Any] = []  # what block 0 returns, learned from one real call: a tensor, or a tuple's length
    originals = [block.forward for block in blocks]
    own = [block.__dict__.get("forward") for block in blocks]  # a forward already set on the instance
    training = {module: module.training for module in model.modules()}
    moved: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(index: int):
        def forward(*args, **kwargs):
            where = f"{list_path}.{index}"
            call = _BlockCall(args, kwargs, where, device, moved)
            calls[index].append(call)
            hidden = call.hidden(args, kwargs)
            if index == 0:
                hidden0.append(hidden.to(device))
            if index == last:
                raise _Stop
            if not returns:
                out = originals[0](*args, **kwargs)
                if not isinstance(out, (torch.Tensor, tuple, list)):
                    raise ValueError(f"{where} returns a {type(out).__name__}; GPTQ calibration needs blocks that "
                                     f"return their hidden states as a tensor or as the first item of a tuple")
                returns.append(None if isinstance(out, torch.Tensor) else len(out))
            # Every block hands its input on unchanged: the blocks' real outputs come later, one at a time.
            return hidden if returns[0] is None else (hidden,) + (None,) * (returns[0] - 1)

        return forward

    try:
        model.eval()
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        with torch.no_grad():
            for batch in batches:
                moved.clear()
                try:
                    model(batch.to(model_device), **extra)
                except _Stop:
                    pass
                if len(calls[last]) != len(hidden0):
                    raise ValueError(f"{type(model).__name__}'s forward did not call every block of {list_path} on "
                                     f"calibration data (block {min(i for i, c in enumerate(calls) if len(c) < len(hidden0))} "
                                     f"was skipped); GPTQ calibration needs each block called once per forward")
    finally:
        for block, before in zip(blocks, own):
            if before is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = before
        for module, mode in training.items():
            module.training = mode
    if any(len(c) != len(batches) for c in calls):
        raise ValueError(f"{type(model).__name__}'s forward called a block of {list_path} more than once per forward; "
                         f"GPTQ calibration needs each block called once per forward")
    return hidden0, calls


# --- one block ------------------------------------------------------------------------------------


class _Group:
    """Linears of one block that read the same input tensor (q/k/v): one Hessian, one GPTQ call."""

    def __init__(self, leader: str) -> None:
        self.paths = [leader]
        self.once = True  # each member runs once per forward: the forward may stop at the leader


def _linear_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _find_groups(work: nn.Module, members: Dict[str, nn.Module], call: _BlockCall, hidden: torch.Tensor) -> List[_Group]:
    """The block's linears in the order one forward runs them, grouped by shared input tensor."""
    seen: Dict[str, List[torch.Tensor]] = {}
    order: List[str] = []

    def hook(path):
        def record(module, args, kwargs):
            if path not in seen:
                order.append(path)
                seen[path] = []
            seen[path].append(_linear_input(args, kwargs))  # kept alive, so identity is meaningful
        return record

    handles = [m.register_forward_pre_hook(hook(p), with_kwargs=True) for p, m in members.items()]
    try:
        call.run(work, hidden)
    finally:
        for handle in handles:
            handle.remove()
    groups: List[_Group] = []
    for path in order:
        first = seen[path][0]
        group = next((g for g in groups if seen[g.paths[0]][0] is first), None)
        if group is None:
            groups.append(_Group(path))
            group = groups[-1]
        else:
            group.paths.append(path)
        group.once = group.once and len(seen[path]) == 1
    return groups


def _weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    return module.weight.t() if conv1d else module.weight


@torch.no_grad()
def calibrate_block(work: nn.Module, prefix: str, members: Dict[str, nn.Module], conv1d: Dict[str, bool],
                    calls: List[_BlockCall], hidden: List[torch.Tensor], method: GPTQInt4LinearMethod,
                    result_device: Dict[str, torch.device]) -> Tuple[Dict[str, GPTQWeight], List[torch.Tensor]]:
    """GPTQ for the linears of one block copy ``work``, group by group in the order they run; returns
    their results and the quantized block's outputs (the next block's inputs). ``work`` is changed."""
    results: Dict[str, GPTQWeight] = {}
    groups = _find_groups(work, members, calls[0], hidden[0]) if members else []
    for group in groups:
        leader = members[group.paths[0]]
        k = _weight(leader, conv1d[group.paths[0]]).shape[1]
        device = hidden[0].device
        hessian = torch.zeros(k, k, dtype=torch.float32, device=device)
        rows = [0]

        def accumulate(module, args, kwargs):
            rows[0] += add_to_hessian(hessian, _linear_input(args, kwargs))
            if group.once:
                raise _Stop  # nothing after the group's input matters for its Hessian

        handle = leader.register_forward_pre_hook(accumulate, with_kwargs=True)
        try:
            for call, h in zip(calls, hidden):
                try:
                    call.run(work, h)
                except _Stop:
                    pass
        finally:
            handle.remove()
        hessian.mul_(2 / rows[0])
        weights = [_weight(members[p], conv1d[p]) for p in group.paths]
        names = ", ".join(group.paths)
        codes, scales, zeros, perm = gptq_quantize(
            torch.cat([w.detach() for w in weights]), hessian, method.group_size, method.sym, method.desc_act,
            method.damp_percent, scale_dtype=weights[0].dtype, where=names)
        del hessian
        start = 0
        for path, w in zip(group.paths, weights):
            part = slice(start, start + w.shape[0])
            start += w.shape[0]
            z = None if zeros is None else zeros[part]
            results[path] = pack_result(codes[part], scales[part], z, perm, result_device[path])
            # The copy runs on with this group quantized, as the quantized model will.
            fake = dequantize(codes[part], scales[part], z, method.group_size, perm).to(w.dtype)
            members[path].weight.copy_(fake.t() if conv1d[path] else fake)
    outputs = [_block_output(call.run(work, h)) for call, h in zip(calls, hidden)]
    return results, outputs


# --- the whole model ------------------------------------------------------------------------------


@torch.no_grad()
def gptq_calibrate(model: nn.Module, sites: Sequence[Any], method: GPTQInt4LinearMethod,
                   sequences: List[torch.Tensor], device: Optional[Any] = None,
                   progress: bool = True) -> Dict[str, GPTQWeight]:
    """GPTQ results (module path -> ``GPTQWeight``) for the linears ``sites`` (``LinearSite``-like:
    ``path``, ``kind``, ``device``), on the device each layer will be built on (``device``, else the
    site's). The model is not changed. Sites outside the decoder blocks, and linears no calibration
    token reaches, get no result (they are rounded without calibration, with a warning).
    ``sequences``: from :func:`calibration_sequences`."""
    paths = [site.path for site in sites]
    for site in sites:
        if site.device.type == "meta":
            raise ValueError(f"{site.path}: the model's weights are on the meta device; GPTQ calibrates the loaded "
                             f"float model (load it with transformers, then quantize with calibration=)")
    list_path, blocks = find_blocks(model, paths)
    compute = compute_device(model, device)
    conv1d = {site.path: site.kind == "conv1d" for site in sites}
    result_device = {site.path: torch.device(device) if device is not None else site.device for site in sites}
    hidden, calls = capture_block_inputs(model, blocks, list_path, batch_sequences(sequences), compute)

    results: Dict[str, GPTQWeight] = {}
    reached = set()
    for index, block in enumerate(tqdm(blocks, desc="GPTQ", unit="block", disable=not progress)):
        prefix = f"{list_path}.{index}." if list_path else f"{index}."
        inside = [p for p in paths if p.startswith(prefix)]
        work = copy.deepcopy(block).to(compute).eval()
        members = {p: work.get_submodule(p[len(prefix):]) for p in inside}
        found, hidden = calibrate_block(work, prefix, members, conv1d, calls[index], hidden, method, result_device)
        results.update(found)
        reached.update(inside)
        del work
    missing = [p for p in paths if p not in results]
    if missing:
        outside = [p for p in missing if p not in reached]
        unused = [p for p in missing if p in reached]
        parts = []
        if outside:
            parts.append(f"{len(outside)} outside the decoder blocks {list_path}.* ({', '.join(outside[:3])}"
                         + (" ..." if len(outside) > 3 else "") + ")")
        if unused:
            parts.append(f"{len(unused)} that the calibration forward never called ({', '.join(unused[:3])}"
                         + (" ..." if len(unused) > 3 else "") + ")")
        warnings.warn("pymllm_fx: GPTQ had no calibration inputs for " + " and ".join(parts)
                      + "; they are rounded as plain int4 is. explain(model) marks them", stacklevel=3)
    return results
