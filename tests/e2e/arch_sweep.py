"""Sweep every transformers architecture that builds from a tiny config through ``pymllm_fx.quantize``.

A measurement harness, not a test by itself (``test_arch_sweep.py`` runs it against a recorded
baseline). For each model type in transformers' auto mappings (``transformers.models.auto.
modeling_auto.*_MAPPING_NAMES``) it:

1. picks a model class (a generation / LM head first, then the base model, then any other head),
2. builds a tiny config from the config class defaults, shrinking the size fields generically
   (hidden 32, intermediate 64, 2 layers, 4 heads / 2 key-value heads, head dim 8, vocabulary 99,
   images 32x32 in patches of 4, recursing into every sub-config) -- the transformers test suite's
   conventions, except intermediate 64 instead of 37 (int4 needs ``in_features % 8 == 0``),
3. builds example inputs from ``main_input_name`` and the forward signature (token ids, images,
   audio features or waveforms, decoder ids; image tokens sized from ``get_image_features``),
   trying a few layouts until the float model runs,
4. per method: deep-copies the float model, ``pymllm_fx.quantize(model, method,
   example_inputs=inputs)``, runs it, and compares the main output tensor with the float one.

Outcome per (architecture, method), first that applies:
``build_failed``, ``float_forward_failed``, ``quantize_refused`` (quantize raised),
``forward_broken_after_quantize``, ``wrong_output``, ``unswapped_linears``, ``ok``; plus
``timeout`` / ``crashed`` when the worker process ran out of time or died.

``wrong_output``: the output is not finite; or it disagrees with the float model run with the
same layers fake-quantized by the method's documented scheme (``simulated_output``; on CPU a right
swap agrees bit for bit), whatever the error against the float model; or model code computes with
a swapped layer's stand-in ``.weight``; or, with no simulation, the relative error against the
float model is over ``REL_ERR`` (int8 3e-2, int4 0.3). Over the bound but agreeing with the
simulation is ``ok`` (noted: the tiny random model amplifies quantization noise).
``unswapped_linears``: a plain nn.Linear / Conv1D whose weight the forward touches is still in
place with no reason anywhere (not found by find_linears, or found and not swapped); layers the
default ``skip=("lm_head",)`` or weight tying leave float are excluded, and layers quantize
records as left float with a reason (``float_with_reason``, e.g. int4 and in_features=2) keep
the outcome ``ok``.

Each record also says whether ``find_linears`` fell back to its module walk (its warning and the
``from_graph`` flag of its sites) and why, how it does with its default inputs (what
``quantize(model, method)`` without ``example_inputs`` gets), which sites it reported
unswappable, the float parameters used as matmul weights outside any linear module (fused MoE
experts, XLNet's q/k/v) and their share of the matmul weights, and (``--compile``) graph breaks and
``fullgraph=True`` under ``torch.compile(backend="eager")``.

    python tests/e2e/arch_sweep.py --jobs 2 --json sweep.json          # every architecture
    python tests/e2e/arch_sweep.py --only llama,t5,falcon --methods int8
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import inspect
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import time
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch

METHODS = ("int8", "int4")
# Relative error ||q - fp|| / ||fp|| of the main output tensor, random-init weights. See
# BOUNDS_NOTE in the summary / README of the sweep for the measured distribution.
REL_ERR = {"int8": 3e-2, "int4": 0.3}
# The quantized output is also compared with the float model run with the same layers' weights
# fake-quantized by the method's documented scheme (an independent re-implementation,
# simulated_output); on CPU the two agree bit for bit when the swap is right (0.0 in every
# architecture of the recorded sweep). They "agree" within max(AGREE_ABS, AGREE_REL x the
# simulation's own error). Over the bound and agreeing is "ok" (the model amplifies quantization
# noise; the swap is right); not agreeing is "wrong_output" even under the bound (the swapped
# model computes something else, hidden by an insensitive output), as is model code computing
# with a swapped layer's stand-in ``.weight``.
AGREE_ABS, AGREE_REL = 1e-3, 0.05
OUTCOMES = ("ok", "unswapped_linears", "wrong_output", "forward_broken_after_quantize", "quantize_refused",
            "float_forward_failed", "build_failed", "timeout", "crashed")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 32, 64, 2, 4, 2, 8, 99
IMAGE, PATCH, MAX_POS, RANK, EXPERTS, TOP_K = 32, 4, 512, 16, 4, 2
MAX_PARAMS = 3_000_000  # ~12 MB in float32; a bigger tiny model means a size field was not found
BATCH, SEQ = 2, 8

# Mappings whose class is preferred for a model type, in this order; every other mapping follows
# in alphabetical order (so each type gets the head that exercises most of the model first: an encoder-decoder's
# seq2seq head before its decoder-only causal LM, a multimodal model's image-text head before its
# text-only one).
HEAD_PRIORITY = (
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_CTC_MAPPING_NAMES",
    "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)


# --------------------------------------------------------------------------------------------
# Enumeration


def architectures() -> Dict[str, List[Tuple[str, str]]]:
    """model_type -> [(class name, mapping name)], every class of every auto mapping, best first."""
    from transformers.models.auto import modeling_auto

    names = sorted(n for n in dir(modeling_auto) if n.startswith("MODEL") and n.endswith("_MAPPING_NAMES"))
    order = [n for n in HEAD_PRIORITY if n in names] + [n for n in names if n not in HEAD_PRIORITY]
    found: Dict[str, List[Tuple[str, str]]] = {}
    for mapping in order:
        for model_type, classes in getattr(modeling_auto, mapping).items():
            for cls in (classes,) if isinstance(classes, str) else tuple(classes):
                entry = found.setdefault(model_type, [])
                if cls not in [c for c, _ in entry]:
                    entry.append((cls, mapping))
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------------------------
# Tiny configs


def _rx(*patterns: str) -> "re.Pattern[str]":
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_VOCAB = _rx(r"(?!type_)(?!.*position).*vocab_size(_per_layer_input)?")
_LAYERS = _rx(r"num_hidden_layers|num_layers|n_layers?|(encoder|decoder)_layers|num_(encoder|decoder)_layers",
              r"depth|.*_depth|.*_num_layers|num_(?!feat_extract).*_layers|.*_num_hidden_layers|num_hidden_layers_.*")
_KV_HEADS = _rx(r"num_key_value_heads|num_kv_heads|n_kv_heads?|multi_query_group_num|.*_key_value_heads",
                r".*_kv_heads|.*num_key_heads")
_HEADS = _rx(r"num_attention_heads|n_heads?|num_heads|.*_attention_heads|.*_num_heads|num_.*_heads|.*_n_heads")
_HEAD_DIM = _rx(r"head_dim|d_kv|d_head|.*_head_dim|kv_channels|attention_head_dim|attention_head_size|rotary_dim")
_FFN = _rx(r"intermediate_size|.*_intermediate_size|ffn_dim|.*_ffn_dim|d_ff|n_inner|mlp_dim|dim_feedforward",
           r".*ffn_hidden_size|.*feed_forward.*size|.*feedforward_dim|d_inner|.*_intermediate_dim|intermediate_dim",
           r".*linear_units")
_HIDDEN = _rx(r"hidden_size|d_model|n_embd|n_embed|embed_dim|hidden_dim|dim|model_dim|d_embed|emb_dim",
              r"embedding_size|embedding_dim|word_embed_proj_dim|projection_dim|projection_size|d_latents",
              r".*_hidden_size|.*_hidden_dim|.*_embed_dim|.*_embedding_dim|.*_proj_size|.*codevector_dim",
              r"hidden_size_per_layer_input|.*_d_model|.*_dim_size|.*_model_dim|output_dim|.*_output_dim",
              r"codebook_dim|condition_dim|lru_width|.*_width|hidden_size_global")
_RANK = _rx(r".*_rank|time_step_rank")
_EXPERTS = _rx(r"num_experts|num_local_experts|n_routed_experts|moe_num_experts|.*_num_experts|num_.*_experts")
_TOP_K = _rx(r"num_experts_per_tok|num_experts_per_token|moe_topk|moe_top_k|top_k|num_selected_experts|moe_k",
             r".*_experts_per_tok")
_GROUPS = _rx(r"n_group|topk_group|num_expert_group|topk_groups|n_groups|num_groups|mamba_n_groups")
_MULTIPLIER = _rx(r"(depth|width)_(multiplier|coefficient)|width_mult")
_SIZE_LIST_ANY = _rx(r".*(dim|dims|hidden|channels|width|widths|sizes)(_per_stage)?|embed_dim.*|hidden_size.*")
_BLOCK_LIST = _rx(r"depths|.*blocks_per_stage|num_block_repeats|stage_num_blocks|.*_depths|block_repeats")
_POSITIONS = _rx(r"max_position_embeddings|n_positions|max_target_positions|n_ctx|max_seq_len|max_sequence_length",
                 r"max_text_len|.*_max_position_embeddings")
_IMAGE = _rx(r"image_size|img_size|.*_image_size")
_PATCH = _rx(r"patch_size")
_TOKEN_ID = _rx(r".*token_id|.*token_index|.*_token_ids|.*token_id_.*|.*token_index_.*")
_SIZE_LIST = _rx(r".*hidden_sizes|.*_channels|.*_dims|embed_dims|conv_dim|tdnn_dim|.*_channel_list|.*_sizes_list")
_INDEX_LIST = _rx(r".*_indexes|.*_indices|.*_layer_ids|.*_layers_ids|.*_block_indexes|.*_layer_idx|mlp_only_layers")
_SUB_SKIP = {"id2label", "label2id", "rope_parameters", "rope_scaling", "task_specific_params", "quantization_config"}
# Size fields some default configs leave None (to be read from a checkpoint), filled when shrinking.
_NONE_FILL = ((_VOCAB, VOCAB), (_EXPERTS, EXPERTS), (_TOP_K, TOP_K), (_GROUPS, 1), (_rx("prediction_length"), 4),
              (_rx(r"n_shared_experts|num_shared_experts"), 1))


def _round8(v: float) -> int:
    return max(8, int(round(v / 8)) * 8)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Shrinker:
    """Shrinks one config dict tree (from ``to_dict()``) in place; token ids above the new
    vocabulary are remapped to distinct ids at its top, consistently across the whole tree.

    ``lists=False`` leaves lists of channel sizes alone (conv nets whose stage sizes must agree
    with each other in ways no field name tells)."""

    def __init__(self, lists: bool = True) -> None:
        self.token_map: Dict[int, int] = {}
        self.untouched: List[str] = []
        self.lists = lists
        self.scaled_lists = False

    def token(self, value: int) -> int:
        if value < VOCAB - 16:
            return value
        if value not in self.token_map:
            self.token_map[value] = VOCAB - 1 - len(self.token_map)
        return self.token_map[value]

    def shrink(self, d: Dict[str, Any], where: str = "") -> Dict[str, Any]:
        layers_key = next((k for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                                       "decoder_layers", "depth") if _is_int(d.get(k))), None)
        old_layers = d.get(layers_key) if layers_key else None
        has_depths = isinstance(d.get("depths"), (list, tuple))
        heads_before = {k: v for k, v in d.items() if _is_int(v) and _HEADS.fullmatch(str(k))}
        for key, value in list(d.items()):
            skey = str(key)
            if isinstance(value, bool):
                continue
            if value is None:
                fill = next((v for rx, v in _NONE_FILL if rx.fullmatch(skey)), None)
                if fill is not None:
                    d[key] = fill
                continue
            if isinstance(value, dict):
                if skey in ("rope_parameters", "rope_scaling"):
                    d[key] = self.rope(value)
                elif skey not in _SUB_SKIP:
                    d[key] = self.shrink(value, f"{where}{skey}.")
                continue
            if isinstance(value, float) and _MULTIPLIER.fullmatch(skey):
                d[key] = min(value, 0.25)
                continue
            d[key] = self.field(skey, value, has_depths, heads_before)
        if d.get("head_dim", 0) is None and _is_int(d.get("num_attention_heads")) and _is_int(d.get("hidden_size")):
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("num_key_value_heads", 0) is None and _is_int(d.get("num_attention_heads")):
            d["num_key_value_heads"] = d["num_attention_heads"]
        self.derived(d)
        new_layers = d.get(layers_key) if layers_key else None
        if old_layers and new_layers != old_layers:
            self.per_layer_lists(d, old_layers, layers_key)
        for key, value in list(d.items()):
            skey = str(key)
            if _is_int(value) and value > 64 and not _TOKEN_ID.fullmatch(skey) and "token" not in skey \
                    and skey not in ("max_position_embeddings", "num_labels", "vocab_size"):
                self.untouched.append(f"{where}{skey}={value}")
        return d

    def derived(self, d: Dict[str, Any]) -> None:
        """Sizes other sizes must agree with (Mamba-2 heads x head dim = expand x hidden, ...)."""
        hidden = d.get("hidden_size")
        if _is_int(hidden):
            for expand, heads, head_dim in (("mamba_expand", "mamba_n_heads", "mamba_d_head"),
                                            ("expand", "num_heads", "head_dim")):
                if all(_is_int(d.get(k)) for k in (expand, heads, head_dim)) and d[heads] > 0:
                    if d[expand] * hidden % d[heads] == 0:
                        d[head_dim] = d[expand] * hidden // d[heads]
        # Per-layer override maps keyed by layer index ({"5": {...}, "11": {...}}).
        layers = next((d[k] for k in ("num_hidden_layers", "num_layers") if _is_int(d.get(k))), None)
        for key, value in list(d.items()):
            if layers and isinstance(value, dict) and value and all(str(k).lstrip("-").isdigit() for k in value):
                kept = {k: v for k, v in value.items() if int(k) < layers}
                if not kept:  # keep the first override, on the last layer
                    first = sorted(value, key=lambda k: int(k))[0]
                    kept = {type(first)(layers - 1) if not isinstance(first, str) else str(layers - 1): value[first]}
                d[key] = kept

    def field(self, key: str, value: Any, has_depths: bool, heads_before: Dict[str, int]) -> Any:
        if _is_int(value):
            if _TOKEN_ID.fullmatch(key):
                return self.token(value) if value >= 0 else value
            if _VOCAB.fullmatch(key):
                return min(value, VOCAB)
            if _LAYERS.fullmatch(key):
                if key == "num_layers" and has_depths:
                    return value
                return min(value, LAYERS)
            if _KV_HEADS.fullmatch(key):
                heads = max(heads_before.values(), default=value)
                return value if value <= 1 else (KV_HEADS if value < heads else min(value, HEADS))
            if _HEADS.fullmatch(key):
                return min(value, HEADS)
            if _HEAD_DIM.fullmatch(key):
                return min(value, HEAD_DIM)
            if _FFN.fullmatch(key):
                return min(value, FFN)
            if _RANK.fullmatch(key):
                return min(value, RANK)
            if _TOP_K.fullmatch(key):
                return min(value, TOP_K)
            if _EXPERTS.fullmatch(key):
                return min(value, EXPERTS)
            if _GROUPS.fullmatch(key):
                return 1
            if key == "first_k_dense_replace":
                return min(value, 1)
            if _POSITIONS.fullmatch(key):
                return min(value, MAX_POS)
            if key == "max_source_positions":
                return min(value, 32)
            if key == "window_size":
                return min(value, 2)
            if key == "num_frames":
                return min(value, 4)
            if _IMAGE.fullmatch(key):
                return min(value, IMAGE)
            if _PATCH.fullmatch(key):  # hierarchical (Swin-like) models halve the grid per stage
                return min(value, 2 if has_depths else PATCH)
            if _HIDDEN.fullmatch(key):
                return min(value, HIDDEN)
            return value
        if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
            kind = type(value)
            if _TOKEN_ID.fullmatch(key):
                return kind(self.token(v) if v >= 0 else v for v in value)
            if _IMAGE.fullmatch(key):
                return kind(min(v, IMAGE) for v in value)
            if _PATCH.fullmatch(key):
                return kind(min(v, PATCH) for v in value)
            if _BLOCK_LIST.fullmatch(key):
                return kind(min(v, 2) for v in value)
            if _FFN.fullmatch(key):  # per-layer intermediate sizes
                return kind(min(v, FFN) for v in value)
            if key in ("num_heads", "num_attention_heads") or _HEADS.fullmatch(key) or "heads" in key:
                return kind(min(v, 2) for v in value)
            if self.lists and (_SIZE_LIST.fullmatch(key) or _SIZE_LIST_ANY.fullmatch(key)) and max(value) > 64:
                self.scaled_lists = True
                scale = 64 / max(value)
                return kind(_round8(v * scale) for v in value)
        return value

    def per_layer_lists(self, d: Dict[str, Any], old: int, layers_key: str) -> None:
        """Per-layer lists (``layer_types``, ...) of the old depth: keep one layer of each kind;
        backbone stage names and layer-index lists follow the new depth."""
        keys = [k for k, v in d.items() if isinstance(v, (list, tuple)) and len(v) == old and k != "depths"
                and not _TOKEN_ID.fullmatch(str(k))]
        typed = [k for k in keys if any(isinstance(x, (str, bool)) for x in d[k])]
        if typed:
            rows = list(zip(*(d[k] for k in typed)))
            picked, seen = [], set()
            for i, row in enumerate(rows):
                if row not in seen:
                    seen.add(row)
                    picked.append(i)
            while len(picked) < LAYERS:
                picked.append(picked[-1])
            picked = sorted(picked[:4])
            shared = [k for k, v in d.items() if _is_int(v) and v > 0 and "shared" in str(k) and _LAYERS.fullmatch(str(k))]
            if shared:  # layers reusing earlier layers' KV (Gemma-3n): one of each kind before them, then again
                picked = picked + picked
            for k in keys:
                d[k] = [d[k][i] for i in picked]
            for k, v in list(d.items()):  # the other depth fields follow
                if v == LAYERS and (k == layers_key or _LAYERS.fullmatch(str(k))):
                    d[k] = len(picked)
        else:
            for k in keys:
                d[k] = list(d[k][: d[layers_key]])
        new = d[layers_key]
        for k, v in list(d.items()):  # layers sharing earlier layers' KV at the end of the stack: the second half
            if k != layers_key and _is_int(v) and v > 0 and "shared" in str(k) and _LAYERS.fullmatch(str(k)):
                d[k] = new // 2
        stages = d.get("stage_names")
        if isinstance(stages, list) and len(stages) == old + 1:  # a ViT as a backbone: one stage per layer
            wanted = len(d.get("out_indices") or d.get("out_features") or [1])
            if wanted > new:
                d[layers_key] = new = wanted
            d["stage_names"] = ["stem"] + [f"stage{i}" for i in range(1, new + 1)]
            d["out_indices"] = list(range(new - wanted + 1, new + 1))
            d["out_features"] = [f"stage{i}" for i in d["out_indices"]]
        for k, v in list(d.items()):
            if k in ("out_indices", "out_features"):
                continue
            if isinstance(v, (list, tuple)) and _INDEX_LIST.fullmatch(str(k)) and v and all(_is_int(x) for x in v):
                kept = sorted({x for x in v if x < new}) or [new - 1]
                d[k] = kept

    def rope(self, params: Dict[str, Any]) -> Dict[str, Any]:
        params = {k: (self.rope(v) if isinstance(v, dict) else v) for k, v in params.items()}
        if _is_int(params.get("original_max_position_embeddings")):
            params["original_max_position_embeddings"] = min(params["original_max_position_embeddings"], MAX_POS // 2)
        return params


def _fix_mrope(config) -> None:
    """Multimodal RoPE sections (defaulted in the modeling code to a full-size head) split the
    rotary half of the tiny head: set them explicitly wherever the config class accepts them."""
    todo = [config]
    seen = set()
    while todo:
        c = todo.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        for name in dir(c) if hasattr(c, "to_dict") else ():
            if name.endswith("_config") or name in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
                sub = getattr(c, name, None)
                if hasattr(sub, "to_dict"):
                    todo.append(sub)
        rope = getattr(c, "rope_parameters", None)
        accepts = "mrope_section" in (getattr(type(c), "ignore_keys_at_rope_validation", None) or ())
        if not isinstance(rope, dict) or not (accepts or "mrope_section" in rope):
            continue
        heads = getattr(c, "num_attention_heads", None)
        head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None)
        if not head_dim:
            continue
        groups = [rope] if "rope_type" in rope or "mrope_section" in rope else [v for v in rope.values() if isinstance(v, dict)]
        for r in groups:
            factor = r.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0) or 1.0)
            half = int(head_dim * factor) // 2
            old = r.get("mrope_section") or [2, 3, 3]
            new = [half * s // sum(old) for s in old]
            new[0] += half - sum(new)
            r["mrope_section"] = new


def tiny_config(model_type: str, lists: bool = True):
    """The config class's defaults with every size field shrunk (see the module docstring)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    shrinker = _Shrinker(lists=lists)
    d = shrinker.shrink(default.to_dict())
    for key in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    config = config_class.from_dict(d)
    _fix_mrope(config)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    return config, shrinker


# --------------------------------------------------------------------------------------------
# Building


def build_model(config, shrinker, candidates: Sequence[Tuple[str, str]]):
    """(model, class name, mapping, notes): the first candidate class that builds small enough, in eval mode."""
    import torch
    import transformers

    notes: List[str] = []
    for class_name, mapping in candidates:
        cls = getattr(transformers, class_name, None)
        if cls is None:
            notes.append(f"{class_name}: not importable")
            continue
        try:
            with torch.device("meta"):
                meta = cls._from_config(copy.deepcopy(config))
            n = sum(p.numel() for p in meta.parameters())
            if n > MAX_PARAMS:
                sizes = collections.Counter()
                for name, p in meta.named_parameters():
                    sizes[".".join(name.split(".")[:2])] += p.numel()
                top = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sizes.most_common(3))
                unshrunk = ", ".join(shrinker.untouched[:5])
                raise ValueError(f"tiny model too large: {n / 1e6:.1f}M parameters (largest: {top}; "
                                 f"fields left large: {unshrunk or 'none'})")
            del meta
            torch.manual_seed(0)
            model = cls._from_config(copy.deepcopy(config)).eval()
            return model, class_name, mapping, notes
        except Exception as err:  # try the next head
            notes.append(f"{class_name}: {_message(err)}")
    raise RuntimeError("; ".join(notes) if notes else "no model class")


def build_and_run_float(model_type: str, candidates: Sequence[Tuple[str, str]]):
    """Build the tiny model and find inputs its float forward accepts.

    Tries the fully shrunk config, then (where it scaled lists of channel sizes) one that keeps
    them. Returns (model, inputs, float output, float parameter uses, info) or raises
    ``_Stage("build_failed" | "float_forward_failed", message)``."""
    import torch

    info: Dict[str, Any] = {}
    failures: List[Tuple[str, str]] = []
    for lists in (True, False):
        try:
            config, shrinker = tiny_config(model_type, lists=lists)
        except Exception as err:
            failures.append(("build_failed", "config: " + _message(err, 600)))
            break
        try:
            model, class_name, mapping, notes = build_model(config, shrinker, candidates)
        except Exception as err:
            failures.append(("build_failed", _message(err, 600)))
            if not shrinker.scaled_lists:
                break
            continue
        info.update(cls=class_name, mapping=mapping, params=sum(p.numel() for p in model.parameters()),
                    config_variant="shrunk" if lists else "shrunk, channel lists kept")
        if notes:
            info["build_notes"] = notes
        if hasattr(model, "set_default_language") and getattr(model.config, "languages", None):
            model.set_default_language(list(model.config.languages)[0])
        errors = []
        for name, candidate in _candidate_inputs(model, model.config):
            try:
                out, use = run_forward(model, candidate, _all_params(model))
                if out is None:
                    raise ValueError("the output holds no floating-point tensor")
                again, _ = run_forward(model, candidate)
                if again is None or again.shape != out.shape or (not torch.equal(out, again)
                                                                 and rel_err(again, out) > 1e-6):
                    info["nondeterministic"] = True
                info["inputs"] = name
                if errors:
                    info["input_attempts"] = errors[:4]
                return model, candidate, out, use, info
            except Exception as err:
                errors.append(f"[{name}] {_message(err, 250)}")
        failures.append(("float_forward_failed", " | ".join(errors[:3]) or "no candidate inputs"))
        if not shrinker.scaled_lists:
            break
    stage, message = next((f for f in failures if f[0] == "float_forward_failed"), failures[0])
    raise _Stage(stage, message, info)


class _Stage(Exception):
    def __init__(self, outcome: str, message: str, info: Dict[str, Any]) -> None:
        super().__init__(message)
        self.outcome, self.message, self.info = outcome, message, info


def _message(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {str(err).strip()}"
    text = re.sub(r"\s+", " ", text)
    return text[:limit]


# --------------------------------------------------------------------------------------------
# Inputs


def _sub(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None and hasattr(value, "to_dict"):
            return value
    return None


def _get(config, name, default=None):
    """A config attribute, looked up on the config and then its vision / audio / text sub-configs."""
    for c in (config, _sub(config, "vision_config", "vision_encoder_config", "image_config"),
              _sub(config, "audio_config", "audio_encoder_config", "speech_config", "encoder"),
              _sub(config, "text_config", "decoder")):
        value = getattr(c, name, None) if c is not None else None
        if value is not None:
            return value
    return default


def _image_shape(config) -> Tuple[int, int, int]:
    channels = _get(config, "num_channels", None) or _get(config, "in_channels", None) or 3
    size = _get(config, "image_size", IMAGE)
    if isinstance(size, dict):
        size = size.get("height", IMAGE)
    if isinstance(size, (list, tuple)):
        return int(channels), int(size[0]), int(size[-1])
    return int(channels), int(size), int(size)


def _special_ids(config) -> Dict[str, int]:
    ids: Dict[str, int] = {}

    def walk(c, depth=0):
        if c is None or depth > 3:
            return
        for key, value in c.to_dict().items() if hasattr(c, "to_dict") else []:
            if isinstance(value, int) and not isinstance(value, bool) and _TOKEN_ID.fullmatch(key) and value >= 0:
                ids.setdefault(key, value)
        for name in ("text_config", "vision_config", "audio_config"):
            walk(getattr(c, name, None), depth + 1)

    walk(config)
    return ids


def _vocab(config) -> int:
    vocab = getattr(config, "vocab_size", None) or _get(config, "vocab_size", None) or VOCAB
    return int(vocab)


def _token_ids(config, gen, batch=BATCH, seq=SEQ):
    import torch

    vocab = _vocab(config)
    high = max(4, min(vocab, VOCAB) - 20)
    return torch.randint(3, high, (batch, seq), generator=gen)


def _candidate_inputs(model, config) -> List[Tuple[str, Dict[str, Any]]]:
    """Named input dicts to try, in order, for the model's forward (the first the float model
    runs is used): built from ``main_input_name``, the forward's parameter names and the config."""
    import torch

    gen = torch.Generator().manual_seed(1)
    sig = inspect.signature(model.forward).parameters
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.values())
    main = getattr(model, "main_input_name", "input_ids")
    ids = _token_ids(config, gen)
    common: Dict[str, Any] = {}
    if "use_cache" in sig:
        common["use_cache"] = False
    if "return_dict" in sig:
        common["return_dict"] = True
    decoder: Dict[str, Any] = {}
    if "decoder_input_ids" in sig:
        decoder["decoder_input_ids"] = _token_ids(config, gen, seq=SEQ // 2)

    tries: List[Tuple[str, Dict[str, Any]]] = []
    c, h, w = _image_shape(config)
    pixels = torch.randn(BATCH, c, h, w, generator=gen)
    frames = int(_get(config, "num_frames", 0) or 0)
    video = torch.randn(BATCH, max(frames, 2), c, h, w, generator=gen)
    grid_arg = next((n for n in ("image_grid_thw", "grid_thw") if n in sig), None)
    if grid_arg is not None:  # Qwen2-VL style: flattened patches with their (t, h, w) grid
        tries.extend(_patch_grid_inputs(model, config, sig, grid_arg, gen))
    if main == "pixel_values" or (main not in sig and "pixel_values" in sig and "input_ids" not in sig):
        if "input_ids" in sig:
            tries.append(("pixel_values+input_ids", {"pixel_values": pixels, "input_ids": ids}))
        if frames:
            tries.append((f"pixel_values video (B, {video.shape[1]}, C, H, W)", {"pixel_values": video}))
        tries.append(("pixel_values", {"pixel_values": pixels}))
        tries.append(("pixel_values 224x224", {"pixel_values": torch.randn(BATCH, c, 224, 224, generator=gen)}))
        if not frames:
            tries.append(("pixel_values video (B, 2, C, H, W)", {"pixel_values": video}))
    elif main == "pixel_values_videos" or ("pixel_values_videos" in sig and "input_ids" not in sig):
        tries.append(("pixel_values_videos", {"pixel_values_videos": video}))
    elif main == "input_features" or ("input_features" in sig and "input_ids" not in sig):
        n_frames = 2 * int(_get(config, "max_source_positions", 32) or 32)
        n_frames = min(max(n_frames, 16), 256)
        sizes = []
        for name in ("num_mel_bins", "feature_size", "input_feat_per_channel", "n_mels", "input_dim",
                     "feature_projection_input_dim"):
            v = _get(config, name, None)
            if _is_int(v) and v not in sizes:
                sizes.append(v)
        for mels in sizes or [80]:
            tries.append((f"input_features (B, {mels}, T)", {"input_features": torch.randn(BATCH, mels, n_frames, generator=gen)}))
            tries.append((f"input_features (B, T, {mels})", {"input_features": torch.randn(BATCH, n_frames, mels, generator=gen)}))
            mask = {n: torch.ones(BATCH, n_frames, dtype=torch.long)
                    for n in ("attention_mask", "input_features_mask", "feature_attention_mask") if n in sig}
            if mask:
                tries.append((f"input_features (B, T, {mels}) + mask", {
                    "input_features": torch.randn(BATCH, n_frames, mels, generator=gen), **mask}))
        tries.append(("input_features (B, 80, 3000)", {"input_features": torch.randn(BATCH, (sizes or [80])[0], 3000,
                                                                                     generator=gen)}))
    elif main == "input_values" or ("input_values" in sig and "input_ids" not in sig):
        strides = _get(config, "conv_stride", None)
        hop = math.prod(strides) if isinstance(strides, (list, tuple)) else 320
        length = max(1600, hop * 16)
        tries.append(("input_values (B, L)", {"input_values": torch.randn(BATCH, length, generator=gen)}))
        tries.append(("input_values (B, 1, L)", {"input_values": torch.randn(BATCH, 1, length, generator=gen)}))
        feat = _get(config, "num_mel_bins", None) or _get(config, "feature_size", 1) or 1
        tries.append(("input_values (B, 128, F)", {"input_values": torch.randn(BATCH, 128, int(feat), generator=gen)}))
    elif main in ("past_values",):
        ctx = int(_get(config, "context_length", 32) or 32)
        tries.append(("past_values", {"past_values": torch.randn(BATCH, ctx, 1, generator=gen)}))
    else:
        text: Dict[str, Any] = {"input_ids": ids}
        if "attention_mask" in sig:
            text["attention_mask"] = torch.ones_like(ids)
        if "pixel_values" in sig and grid_arg is None:
            tries.extend(_multimodal(model, config, ids, pixels, sig, gen))
        if "bbox" in sig:
            text["bbox"] = _boxes(ids)
        tries.append(("input_ids", text))
        tries.append(("input_ids only", {"input_ids": ids}))
        if "inputs_embeds" in sig and main not in ("input_ids",):
            tries.append(("inputs_embeds", {"inputs_embeds": torch.randn(BATCH, SEQ, _get(config, "hidden_size", HIDDEN),
                                                                        generator=gen)}))
    out = []
    for name, inputs in tries:
        full = {**inputs, **({k: v for k, v in decoder.items() if k not in inputs})}
        full.update({k: v for k, v in common.items() if k in sig or accepts_kwargs})
        out.append((name, full))
        if decoder:
            out.append((name + " without decoder ids", {**inputs, **common}))
    return out


def _boxes(ids):
    import torch

    b, s = ids.shape
    x0 = torch.arange(s).repeat(b, 1) * 10
    return torch.stack([x0, x0, x0 + 5, x0 + 5], dim=-1)


def _special(config, *names) -> Optional[int]:
    ids = _special_ids(config)
    return next((ids[n] for n in names if n in ids), None)


def _image_token(config) -> Optional[int]:
    return _special(config, "image_token_id", "image_token_index", "img_token_id", "image_pad_token_id")


def _text_with_images(config, sig, gen, count: int):
    """Token ids for BATCH sequences, each with one image of ``count`` image tokens, wrapped in the
    config's image start / end tokens where it has them."""
    import torch

    token = _image_token(config)
    start = _special(config, "vision_start_token_id", "image_start_token_id", "boi_token_id", "boi_token_index")
    end = _special(config, "vision_end_token_id", "image_end_token_id", "eoi_token_id", "eoi_token_index")
    high = max(4, min(_vocab(config), VOCAB) - 20)
    text = torch.randint(3, high, (BATCH, SEQ + count + 2), generator=gen)
    if start is not None:
        text[:, 2] = start
    text[:, 3:3 + count] = token
    if end is not None:
        text[:, 3 + count] = end
    inputs = {"input_ids": text}
    if "attention_mask" in sig:
        inputs["attention_mask"] = torch.ones_like(text)
    return inputs


def _image_feature_count(model, pixels) -> Optional[int]:
    """Image tokens an image becomes: rows of ``get_image_features`` per image, if the model has it."""
    import torch

    owner = model if hasattr(model, "get_image_features") else getattr(model, "model", None)
    if owner is None or not hasattr(owner, "get_image_features"):
        return None
    try:
        with torch.no_grad():
            feats = owner.get_image_features(pixel_values=pixels[:1])
    except Exception:
        return None
    if hasattr(feats, "pooler_output") and feats.pooler_output is not None:
        feats = feats.pooler_output
    elif hasattr(feats, "to_tuple"):
        feats = feats.to_tuple()[0]
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    if not torch.is_tensor(feats):
        return None
    return int(feats.numel() // feats.shape[-1])


def _multimodal(model, config, ids, pixels, sig, gen) -> List[Tuple[str, Dict[str, Any]]]:
    """Token ids holding the image tokens the images become, with the images."""
    tries = []
    count = _image_feature_count(model, pixels)
    if _image_token(config) is not None and count:
        inputs = {**_text_with_images(config, sig, gen, count), "pixel_values": pixels}
        tries.append((f"input_ids with {count} image tokens + pixel_values", inputs))
    tries.append(("input_ids + pixel_values", {"input_ids": ids, "pixel_values": pixels}))
    return tries


def _patch_grid_inputs(model, config, sig, grid_arg, gen) -> List[Tuple[str, Dict[str, Any]]]:
    """Qwen2-VL-style inputs: each image as rows of flattened (C, T, P, P) patches and its grid
    (t, h, w); a language model gets h*w / merge^2 image tokens per image."""
    import torch

    vision = _sub(config, "vision_config") or config
    patch = int(getattr(vision, "patch_size", PATCH) or PATCH)
    temporal = int(getattr(vision, "temporal_patch_size", 1) or 1)
    merge = int(getattr(vision, "spatial_merge_size", 2) or 2)
    channels = int(getattr(vision, "in_channels", None) or getattr(vision, "num_channels", None) or 3)
    side = 2 * merge
    rows = side * side
    grid = torch.tensor([[1, side, side]] * BATCH)
    flat = torch.randn(BATCH * rows, channels * temporal * patch * patch, generator=gen)
    tries = []
    if "input_ids" in sig:
        pixel_arg = "pixel_values" if "pixel_values" in sig else None
        if pixel_arg and _image_token(config) is not None:
            count = rows // (merge * merge)
            inputs = {**_text_with_images(config, sig, gen, count), pixel_arg: flat, grid_arg: grid}
            tries.append((f"input_ids with {count} image tokens + patches ({flat.shape[0]}, {flat.shape[1]}) "
                          f"+ {grid_arg}", inputs))
    else:
        pixel_arg = next((n for n in ("hidden_states", "pixel_values") if n in sig), None)
        if pixel_arg:
            tries.append((f"{pixel_arg} patches ({flat.shape[0]}, {flat.shape[1]}) + {grid_arg}",
                          {pixel_arg: flat, grid_arg: grid}))
    return tries


def main_tensor(output) -> Optional["torch.Tensor"]:
    """The first floating-point tensor of a model's output (logits, last_hidden_state, ...)."""
    import torch

    if torch.is_tensor(output):
        return output if output.is_floating_point() or output.is_complex() else None
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            found = main_tensor(item)
            if found is not None:
                return found
    return None


def rel_err(out, ref) -> float:
    if out.shape != ref.shape:
        return float("inf")
    ref64, out64 = ref.detach().double(), out.detach().double()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    if not math.isfinite(diff):
        return float("inf")
    return diff / denom if denom > 0 else (0.0 if diff == 0 else float("inf"))


class _ParamUse:
    """A torch function mode recording which parameters reach which torch ops, directly or through
    views and casts of them (``x @ self.weight.T``, ``weight.to(dtype)``, ``weight[:, :k]``)."""

    def __init__(self, params: Dict[int, Tuple[str, ...]]) -> None:
        import torch
        from torch.overrides import TorchFunctionMode

        outer = self
        self.used: Dict[str, set] = collections.defaultdict(set)
        derived: Dict[int, Tuple[str, ...]] = {}
        keep: List[Any] = []  # derived tensors stay alive for the forward, so their ids stay unique

        def source(value):
            return params.get(id(value)) or derived.get(id(value))  # every name of a (tied) parameter

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", str(func))
                hits = []
                for value in list(args) + list(kwargs.values()):
                    for v in (value if isinstance(value, (list, tuple)) else (value,)):
                        names = source(v)
                        if names is not None:
                            hits.append(names)
                            for n in names:
                                outer.used[n].add(name)
                out = func(*args, **kwargs)
                if hits and name in _PASS_THROUGH and len(set(hits)) == 1 and isinstance(out, torch.Tensor):
                    derived[id(out)] = hits[0]
                    keep.append(out)
                return out

        self.mode = Mode()


# Calls that read a tensor's metadata, not its values.
_BENIGN = {"size", "dim", "numel", "__len__", "is_floating_point", "is_complex", "element_size", "stride",
           "__get__", "data_ptr", "__format__", "__repr__", "__bool__", "get_device", "nelement", "ndimension"}
# Ops that hand a weight on unchanged in substance (views, casts, slices) before it is multiplied.
_PASS_THROUGH = {"__get__", "t", "transpose", "permute", "to", "float", "half", "bfloat16", "type", "contiguous",
                 "view", "reshape", "__getitem__", "unsqueeze", "squeeze", "expand", "flatten", "detach", "clone",
                 "type_as", "view_as", "reshape_as", "chunk", "split", "narrow", "mT"}
_MATMUL_FUNCS = {"linear", "matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "__matmul__", "__rmatmul__",
                 "multi_head_attention_forward", "tensordot", "addmv", "mv", "_grouped_mm", "grouped_mm",
                 "scaled_grouped_mm", "_scaled_grouped_mm", "dot", "inner", "outer", "chain_matmul"}


def run_forward(model, inputs, params: Optional[Dict[int, Tuple[str, ...]]] = None):
    """(main output tensor, parameter uses) of a no-grad forward, seeded so any sampling repeats."""
    import torch

    torch.manual_seed(1234)
    tracker = _ParamUse(params or {})
    with torch.no_grad(), tracker.mode:
        out = model(**inputs)
    return main_tensor(out), tracker.used


def _linear_weights(model) -> Dict[int, str]:
    from pymllm_fx.passes import is_linear_module

    return {id(m.weight): name for name, m in model.named_modules() if is_linear_module(m)}


def _all_params(model) -> Dict[int, Tuple[str, ...]]:
    names: Dict[int, Tuple[str, ...]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), ()) + (n,)
    return names


@contextlib.contextmanager
def _record_find_linears(sink: Dict[str, Any]):
    """Keep the sites quantize's find_linears returns, and its fallback warning, for the record."""
    import pymllm_fx.api.quantize_model as api  # the module whose quantize looks find_linears up

    original = api.find_linears

    def wrapper(model, example_inputs=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sites = original(model, example_inputs)
        for w in caught:
            text = str(w.message)
            if "falling back to walking" in text:
                m = re.search(r"graph capture of \S+ failed \((.*)\); falling back", text, re.S)
                sink["fallback"] = m.group(1) if m else text
        sink["sites"] = sites
        return sites

    api.find_linears = wrapper
    try:
        yield
    finally:
        api.find_linears = original


def graph_breaks(model, inputs) -> Dict[str, Any]:
    """``torch._dynamo.explain`` graph and break counts (with reasons) of the model's forward, and
    whether ``torch.compile(model, fullgraph=True, backend="eager")`` runs it."""
    import torch

    result: Dict[str, Any] = {}
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(**inputs)
        reasons = [re.sub(r"\s+", " ", str(getattr(b, "reason", b)))[:200] for b in explanation.break_reasons]
        result.update(graphs=explanation.graph_count, breaks=explanation.graph_break_count,
                      reasons=sorted(set(reasons))[:5])
    except Exception as err:
        result["explain_error"] = _message(err)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="eager")(**inputs)
        result["fullgraph"] = "ok"
    except Exception as err:
        result["fullgraph"] = _message(err, 200)
    finally:
        torch._dynamo.reset()
    return result


def fake_quantize(weight, method) -> "torch.Tensor":
    """Round-trip a ``(N, K)`` float weight through the method's documented scheme, in float:
    int8 symmetric per output channel; int4 per group of ``group_size`` inputs (a shorter tail
    group last), asymmetric with the range widened to include 0, or symmetric: min/max for
    ``rtn=True``; the default searches each group's scale, so its grid is taken from
    ``quantize_int4`` (tested on its own in tests/methods/test_int4_search.py) and only the
    dequantization is written here."""
    import torch

    w = weight.detach().float()
    tiny = torch.finfo(torch.float32).tiny
    name = getattr(method, "name", "")
    if name == "int8":
        s = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=tiny)
        return (torch.round(w / s).clamp(-127, 127) * s).to(weight.dtype)
    if name == "int4" and not method.rtn:
        from pymllm_fx.methods.int4 import quantize_int4

        codes, scales, zeros = quantize_int4(weight.detach(), int(method.group_size), bool(method.sym))
        group = torch.arange(w.shape[1], device=w.device) // int(method.group_size)
        zero = 8.0 if zeros is None else zeros.float()[:, group]
        return ((codes.float() - zero) * scales.float()[:, group]).to(weight.dtype)
    if name == "int4":
        group, sym = int(method.group_size), bool(getattr(method, "sym", False))
        out = torch.empty_like(w)
        for k in range(0, w.shape[1], group):
            g = w[:, k:k + group]
            if sym:
                s = (g.abs().amax(dim=1, keepdim=True) / 7).clamp(min=tiny)
                out[:, k:k + group] = torch.round(g / s).clamp(-8, 7) * s
            else:
                lo, hi = g.amin(dim=1, keepdim=True).clamp(max=0), g.amax(dim=1, keepdim=True).clamp(min=0)
                s = ((hi - lo) / 15).clamp(min=tiny)
                z = torch.round(-lo / s).clamp(0, 15)
                out[:, k:k + group] = ((torch.round(g / s) + z).clamp(0, 15) - z) * s
        return out.to(weight.dtype)
    if name == "fp8":  # the weight side only: e4m3 per output channel
        s = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
        return ((w / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(weight.dtype)
    raise ValueError(f"no fake quantization for method {name!r}")


def fake_quantize_experts(module, method) -> None:
    """A transformers experts module's stacked weights, in place, replaced by their fake-quantized
    values expert by expert, in the (out, in) layout a FusedMoE layer quantizes."""
    import torch

    with torch.no_grad():
        for name in ("gate_up_proj" if module.has_gate else "up_proj", "down_proj"):
            param = getattr(module, name)
            w = param.transpose(1, 2) if module.is_transposed else param
            fake = torch.stack([fake_quantize(w[e], method) for e in range(w.shape[0])])
            param.copy_(fake.transpose(1, 2) if module.is_transposed else fake)


def simulated_output(model, quantized, swapped: Sequence[str], inputs):
    """The float model's output with the weights of the layers ``quantized`` swapped replaced by
    their fake-quantized values: what a correct swap computes, up to float rounding. Returns
    (output or None, why the simulation failed or None)."""
    import torch
    from pymllm_fx.passes import is_conv1d

    try:
        sim = copy.deepcopy(model)
        with torch.no_grad():
            for path in swapped:
                old = sim.get_submodule(path)
                method = quantized.get_submodule(path).quant_method
                if hasattr(quantized.get_submodule(path), "num_experts"):  # a FusedMoE layer
                    fake_quantize_experts(old, method)
                    continue
                w = old.weight.data
                old.weight.data = fake_quantize(w.t(), method).t().contiguous() if is_conv1d(old) \
                    else fake_quantize(w, method)
        out, _ = run_forward(sim, inputs)
        return out, None
    except Exception as exc:  # recorded by the caller; the check then falls back to the REL_ERR bound
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def default_capture(model, used_linears) -> Dict[str, Any]:
    """How ``find_linears`` sees the model with its default example inputs (what a user gets
    calling ``quantize(model, method)`` without ``example_inputs``): the capture ("graph" or the
    fallback reason), and the used linears (with the sweep's inputs) that capture does not find."""
    from pymllm_fx.passes import find_linears

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sites = find_linears(model)
        except Exception as err:
            return {"capture": "error: " + _message(err)}
    result: Dict[str, Any] = {"capture": "graph"}
    for w in caught:
        m = re.search(r"graph capture of \S+ failed \((.*)\); falling back", str(w.message), re.S)
        if m:
            result["capture"] = "fallback: " + re.sub(r"\s+", " ", m.group(1))[:300]
    missed = sorted(set(used_linears) - {s.path for s in sites})
    if missed:
        result["missed_used_linears"] = len(missed)
        result["missed_examples"] = missed[:5]
    return result


DEFAULT_OPTIONS = {"compile": False, "simulate": "always", "default_capture": True}


def run_architecture(model_type: str, candidates: Sequence[Tuple[str, str]], methods: Sequence[str] = METHODS,
                     options: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """One record per method for ``model_type`` (see the module docstring for the fields).

    ``options``: ``compile`` (count graph breaks), ``simulate`` ("always": compare every quantized
    output with the fake-quantized float model; "over_bound": only where the error is over the
    bound, which is all the classification needs), ``default_capture`` (also capture the float
    model with find_linears' default inputs, to record whether that falls back)."""
    options = {**DEFAULT_OPTIONS, **(options or {})}
    compile_check = options["compile"]
    import torch
    import transformers
    import pymllm_fx
    from pymllm_fx.api import DEFAULT_SKIP, skip_reason

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    start = time.time()
    base: Dict[str, Any] = {"arch": model_type}

    def records(outcome: str, message: str = "", **extra) -> List[Dict[str, Any]]:
        return [{**base, "method": m, "outcome": outcome, "message": message, **extra,
                 "seconds": round(time.time() - start, 2)} for m in methods]

    try:
        model, inputs, ref, float_use, info = build_and_run_float(model_type, candidates)
    except _Stage as stage:
        base.update(stage.info)
        return records(stage.outcome, stage.message)
    base.update(info)
    base["inputs_shapes"] = {k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)}

    linear_modules = set(_linear_weights(model).values())
    used_linears = {n[: -len(".weight")] for n, funcs in float_use.items() if n.endswith(".weight")
                    and n[: -len(".weight")] in linear_modules and set(funcs) - _BENIGN}
    # Parameters of 2+ dims, outside any linear module, reaching a matmul: projections that stay float.
    raw = sorted(n for n, funcs in float_use.items()
                 if n.rpartition(".")[0] not in linear_modules and funcs & _MATMUL_FUNCS
                 and model.get_parameter(n).dim() >= 2 and "embed" not in n
                 and not isinstance(model.get_submodule(n.rpartition(".")[0]) if "." in n else model,
                                    (torch.nn.Embedding, torch.nn.modules.conv._ConvNd, torch.nn.LayerNorm)))
    base["linear_modules"] = len(linear_modules)
    base["used_linears"] = len(used_linears)
    if raw:
        base["raw_param_projections"] = raw[:20]
        # Share of the matmul weights (used linear weights + these) the raw parameters hold: what stays float.
        raw_numel = sum(model.get_parameter(n).numel() for n in raw)
        linear_numel = sum(model.get_submodule(p).weight.numel() for p in used_linears)
        base["raw_param_share"] = round(raw_numel / max(1, raw_numel + linear_numel), 4)
    if compile_check:
        base["compile_float"] = graph_breaks(model, inputs)
    if options["default_capture"]:
        found = default_capture(model, used_linears)
        base["default_inputs_capture"] = found["capture"]
        if found.get("missed_used_linears"):
            base["default_inputs_missed"] = found

    results = []
    for method in methods:
        rec: Dict[str, Any] = {**base, "method": method}
        t0 = time.time()
        sink: Dict[str, Any] = {}
        q = copy.deepcopy(model)
        try:
            with _record_find_linears(sink):
                pymllm_fx.quantize(q, method, example_inputs=inputs, progress=False)
        except Exception as err:
            rec.update(outcome="quantize_refused", message=_message(err, 400))
        _site_record(rec, sink, skip_reason, DEFAULT_SKIP)
        if "outcome" not in rec:
            q_linears = _linear_weights(q)
            # A swapped layer may keep a stand-in ``weight`` attribute (not a parameter) for code that
            # reads its shape or dtype; track it too, to see model code computing with it.
            views = {id(m.__dict__["weight"]): (f"{n}.weight_view",) for n, m in q.named_modules()
                     if hasattr(m, "quant_method") and torch.is_tensor(m.__dict__.get("weight"))}
            try:
                out, q_use = run_forward(q, inputs, {**_all_params(q), **views})
            except Exception as err:
                out = None
                rec.update(outcome="forward_broken_after_quantize", message=_message(err, 400))
            if out is not None:
                swapped = [n for n, m in q.named_modules() if hasattr(m, "quant_method")]
                rec["swapped"] = len(swapped)
                lm_children = [n for n in swapped if re.search(r"(^|\.)lm_head\.", n)]
                if lm_children:
                    rec["lm_head_children_swapped"] = lm_children
                skipped_ok, reported, unswapped = _unswapped(q, q_linears, q_use, sink.get("sites") or [],
                                                              skip_reason, DEFAULT_SKIP)
                rec["skipped_by_default"] = skipped_ok
                if reported:
                    rec["float_with_reason"] = reported
                err = rel_err(out, ref)
                rec["rel_err"] = err if math.isfinite(err) else None
                computed_with_view = {n[: -len(".weight_view")]: sorted(f) for n, f in q_use.items()
                                      if n.endswith(".weight_view") and set(f) - _BENIGN}
                if computed_with_view:
                    rec["weight_view_computed_with"] = computed_with_view
                sim = None
                wrong_method = sorted({getattr(q.get_submodule(n).quant_method, "name", "?") for n in swapped} - {method})
                if wrong_method:  # the simulation copies each layer's method, so check it is the one asked for
                    rec["wrong_method"] = wrong_method
                if options["simulate"] == "always" or not (err <= REL_ERR[method]):
                    sim, sim_failure = simulated_output(model, q, swapped, inputs)
                    if sim_failure:
                        rec["simulation_error"] = sim_failure
                sim_err = rel_err(sim, ref) if sim is not None else None
                vs_sim = rel_err(out, sim) if sim is not None else None
                if sim is not None:
                    rec["rel_err_simulated"] = sim_err if math.isfinite(sim_err) else None
                    rec["rel_err_vs_simulated"] = vs_sim if math.isfinite(vs_sim) else None
                explained = (vs_sim is not None and math.isfinite(vs_sim) and sim_err is not None
                             and vs_sim <= max(AGREE_ABS, AGREE_REL * sim_err))
                if vs_sim is not None and not explained:
                    rec["unexplained_by_simulation"] = True
                if unswapped:
                    rec["unswapped"] = unswapped
                if not math.isfinite(err) or not torch.isfinite(out).all():
                    rec.update(outcome="wrong_output", message=f"non-finite output or shape {list(out.shape)} "
                                                               f"vs {list(ref.shape)}")
                elif wrong_method:
                    rec.update(outcome="wrong_output", message=f"asked for {method}, layers hold {wrong_method}")
                elif computed_with_view or ((err > REL_ERR[method] or vs_sim is not None) and not explained):
                    detail = (f"; the same layers fake-quantized in float give {sim_err:.3g}, the output differs from "
                              f"that by {vs_sim:.3g}" if sim is not None else "")
                    if computed_with_view:
                        leaves = collections.Counter(p.rpartition(".")[2] for p in computed_with_view)
                        funcs = sorted(set().union(*computed_with_view.values()) - _BENIGN)
                        detail += (f"; model code computes with the stand-in .weight of swapped layer(s) "
                                   f"{', '.join(f'{k} x{v}' for k, v in leaves.most_common(4))} via {', '.join(funcs[:4])}")
                    bound = f" > {REL_ERR[method]}" if err > REL_ERR[method] else f" (bound {REL_ERR[method]})"
                    rec.update(outcome="wrong_output", message=f"relative error {err:.3g}{bound}{detail}")
                elif unswapped:
                    groups = collections.Counter((u["path"].rpartition(".")[2], u["why"]) for u in unswapped)
                    rec.update(outcome="unswapped_linears",
                               message=f"{len(unswapped)} used linear(s) still float: "
                                       + "; ".join(f"{leaf} x{n} ({why})" for (leaf, why), n in groups.most_common(4)))
                else:
                    note = (f" (over the {REL_ERR[method]} bound, but the same layers fake-quantized in float give "
                            f"{sim_err:.3g}: the model amplifies quantization noise)" if err > REL_ERR[method] else "")
                    if note:
                        rec["over_bound_explained"] = True
                    left = (f"; {len(reported)} used linear(s) left float with a reason: "
                            + "; ".join(f"{leaf} x{n} ({why})" for (leaf, why), n in collections.Counter(
                                (u["path"].rpartition(".")[2], u["why"]) for u in reported).most_common(2))
                            if reported else "")
                    rec.update(outcome="ok", message=f"{len(swapped)} swapped, rel err {err:.3g}{note}{left}")
                if compile_check:
                    rec["compile_quantized"] = graph_breaks(q, inputs)
        rec["seconds"] = round(time.time() - t0, 2)
        results.append(rec)
        del q
    for rec in results:
        rec["arch_seconds"] = round(time.time() - start, 2)
    return results


def _site_record(rec, sink, skip_reason, skip) -> None:
    if "fallback" in sink:
        rec["fallback"] = sink["fallback"]
    sites = sink.get("sites")
    if sites is None:
        return
    rec["sites"] = len(sites)
    rec["from_graph"] = all(s.from_graph for s in sites) if sites else None
    unswappable = [f"{s.path}: {s.reason}" for s in sites if not s.swappable]
    if unswappable:
        rec["reported_unswappable"] = unswappable[:10]
    skipped = [f"{s.path}: {skip_reason(s, skip)}" for s in sites if s.swappable and skip_reason(s, skip)]
    if skipped:
        rec["skipped_sites"] = skipped[:10]


def _unswapped(quantized, q_linears, q_use, sites, skip_reason, skip):
    """Plain linears of the quantized model whose weight its forward touched and that are still
    float, minus those the default skip or weight tying leaves float on purpose.

    Returns (skipped on purpose, reported: float with a reason quantize recorded or find_linears
    gave, silent: float with no reason anywhere), each an entry {"path", "why"}."""
    by_path = {s.path: s for s in sites}
    recorded = dict(getattr(quantized, "_pymllm_fx_float_layers", {}) or {})  # quantize's own record, if any
    used = {n[: -len(".weight")]: funcs for n, funcs in q_use.items() if n.endswith(".weight") and set(funcs) - _BENIGN}
    skipped_ok, reported, silent = [], [], []
    for path in sorted(set(q_linears.values())):
        if path not in used:
            continue
        site = by_path.get(path)
        reason = recorded.get(path) or (skip_reason(site, skip) if site is not None else None)
        if reason and (("skip pattern" in reason) or reason.startswith("weight tied")):
            skipped_ok.append(path)
            continue
        if site is None and not reason and any(p == path.rpartition(".")[2] or p == path for p in skip):
            skipped_ok.append(path)
            continue
        if reason:
            reported.append({"path": path, "why": f"reported: {reason}"[:200]})
        elif site is None:
            silent.append({"path": path, "why": "not found by find_linears; weight used via "
                                                + ",".join(sorted(used[path]))[:60]})
        else:
            silent.append({"path": path, "why": "found by find_linears but not swapped, no reason recorded"})
    return skipped_ok, reported, silent


# --------------------------------------------------------------------------------------------
# Worker processes (a hung or crashing architecture must not stop the sweep)


def _worker(conn, methods, options, threads) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    while True:
        task = conn.recv()
        if task is None:
            return
        model_type, candidates = task
        try:
            result = run_architecture(model_type, candidates, methods, options)
        except BaseException as err:  # a harness bug: still one record per method
            result = [{"arch": model_type, "method": m, "outcome": "crashed",
                       "message": "harness: " + _message(err) + " " + traceback.format_exc()[-300:]} for m in methods]
        conn.send(result)


STARTUP_S = 60.0  # added to the first task's time limit of a new worker process


def sweep(arch_list: Dict[str, List[Tuple[str, str]]], methods: Sequence[str] = METHODS, jobs: int = 2,
          timeout: float = 240.0, options: Optional[Dict[str, Any]] = None, progress: bool = True) -> List[Dict[str, Any]]:
    """Run every architecture in worker processes, ``jobs`` at a time; one record per (arch, method)."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(arch_list.items())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    threads = max(1, cores // max(1, jobs))
    workers: List[Dict[str, Any]] = []
    results: List[Dict[str, Any]] = []
    total = len(pending)

    def start_worker():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, list(methods), {**DEFAULT_OPTIONS, **(options or {})}, threads), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "task": None, "since": 0.0, "fresh": True}

    def assign(w):
        if pending:
            w["task"] = pending.pop(0)
            w["since"] = time.time()
            w["allowance"] = STARTUP_S if w.pop("fresh", False) else 0.0  # a new worker imports torch first
            w["conn"].send(w["task"])
        else:
            w["task"] = None

    def done(records):
        results.extend(records)
        if progress:
            line = "  ".join(f"{r['method']}:{r['outcome']}" for r in records)
            print(f"[{len(results) // len(methods)}/{total}] {records[0]['arch']:<32} {line}", file=sys.stderr, flush=True)

    for _ in range(min(jobs, len(pending))):
        w = start_worker()
        workers.append(w)
        assign(w)
    while any(w["task"] is not None for w in workers):
        busy = [w for w in workers if w["task"] is not None]
        ready = multiprocessing.connection.wait([w["conn"] for w in busy], timeout=1.0)
        for w in busy:
            model_type = w["task"][0]
            if w["conn"] in ready:
                try:
                    records = w["conn"].recv()
                except (EOFError, OSError):
                    code = w["proc"].exitcode
                    w["proc"].join(1)
                    if w["proc"].is_alive():
                        w["proc"].kill()
                    w["conn"].close()
                    records = [{"arch": model_type, "method": m, "outcome": "crashed",
                                "message": f"worker died (exit code {w['proc'].exitcode if code is None else code})"}
                               for m in methods]
                    w.update(start_worker())
                done(records)
                assign(w)
            elif time.time() - w["since"] > timeout + w.get("allowance", 0.0):
                w["proc"].kill()
                w["proc"].join()
                w["conn"].close()
                done([{"arch": model_type, "method": m, "outcome": "timeout",
                       "message": f"no result within {timeout:.0f}s"} for m in methods])
                w.update(start_worker())
                assign(w)
    for w in workers:
        try:
            w["conn"].send(None)
        except Exception:
            pass
        w["proc"].join(5)
        if w["proc"].is_alive():
            w["proc"].kill()
    return sorted(results, key=lambda r: (r["arch"], list(methods).index(r["method"])))


# --------------------------------------------------------------------------------------------
# Reporting


_MODEL_WORD = re.compile(r"\b[A-Z][A-Za-z0-9_]*(?:Model|For|Config|Backbone|Encoder|Decoder|Transformer|Vision|Text|"
                         r"Audio|Pretrained|PreTrained|Wrapper|Tokenizer|Mixer|Embedding|Processor|Layer|Block|"
                         r"Attention|Tower)[A-Za-z0-9_]*\b")


def message_pattern(message: str) -> str:
    """A message with its model-specific parts (numbers, module paths, model class names, long
    quoted text) replaced, so one failure in many architectures reads as one pattern."""
    text = re.sub(r"\[[^\]]*\] ", "", message or "")
    text = text.split(" | ")[0]  # the first input layout's error
    text = re.sub(r"'([^']*)'", lambda m: m.group(0) if re.fullmatch(r"[A-Za-z_]\w{0,40}", m.group(1)) else "'…'", text)
    text = re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e-?\d+)?(?![\w.])", "N", text)
    text = re.sub(r"\b[A-Za-z_]\w*(\.\w+)+\b", "<path>", text)
    text = _MODEL_WORD.sub("<Model>", text)
    text = re.sub(r"^RuntimeError: <Model>: ", "", text)
    return text[:160]


def table(records: List[Dict[str, Any]]) -> str:
    lines = [f"{'architecture':<34} {'method':<6} {'outcome':<30} message", "-" * 140]
    for r in records:
        lines.append(f"{r['arch']:<34} {r['method']:<6} {r['outcome']:<30} {(r.get('message') or '')[:120]}")
    return "\n".join(lines)


def summary(records: List[Dict[str, Any]], methods: Sequence[str] = METHODS) -> Dict[str, Any]:
    """Counts per outcome and method, failures grouped by message pattern, and the side findings."""
    archs = sorted({r["arch"] for r in records})
    built = sorted({r["arch"] for r in records if r.get("cls")})
    ran = sorted({r["arch"] for r in records if r["outcome"] not in ("build_failed", "float_forward_failed", "timeout",
                                                                        "crashed")})
    by_method = {m: dict(collections.Counter(r["outcome"] for r in records if r["method"] == m).most_common())
                 for m in methods}
    ok_per_method = {m: sum(r["outcome"] == "ok" for r in records if r["method"] == m) for m in methods}
    ok_all = [a for a in ran if all(r["outcome"] == "ok" for r in records if r["arch"] == a)]
    patterns: Dict[str, Dict[str, List[str]]] = {}
    for r in records:
        if r["outcome"] == "ok":
            continue
        key = f"{r['outcome']} | {message_pattern(r.get('message', ''))}"
        patterns.setdefault(key, {}).setdefault(r["method"], []).append(r["arch"])
    first = [r for r in records if r["method"] == methods[0]]

    def archs_with(field, rows=records):
        return sorted({r["arch"] for r in rows if r.get(field)})

    fallback_reasons: Dict[str, List[str]] = {}
    for r in first:
        if r.get("fallback"):
            fallback_reasons.setdefault(message_pattern(r["fallback"]), []).append(r["arch"])
    default_reasons: Dict[str, List[str]] = {}
    for r in first:
        capture = r.get("default_inputs_capture")
        if capture and capture != "graph":
            default_reasons.setdefault(message_pattern(capture), []).append(r["arch"])
    missed = {r["arch"]: r["default_inputs_missed"]["missed_used_linears"] for r in first
              if r.get("default_inputs_missed") and r.get("default_inputs_capture") == "graph"}
    return {
        "architectures": len(archs),
        "built": len(built),
        "float_forward_ran": len(ran),
        "outcomes_by_method": by_method,
        "ok_by_method": ok_per_method,
        "ok_every_method": len(ok_all),
        "ok_share_of_forward_ran": round(len(ok_all) / max(1, len(ran)), 4),
        "ok_share_by_method": {m: round(ok_per_method[m] / max(1, len(ran)), 4) for m in methods},
        "fallback_to_module_walk": archs_with("fallback", first),
        "fallback_reasons": dict(sorted(fallback_reasons.items(), key=lambda kv: -len(kv[1]))),
        "default_inputs_fallback": sorted(a for v in default_reasons.values() for a in v),
        "default_inputs_fallback_reasons": dict(sorted(default_reasons.items(), key=lambda kv: -len(kv[1]))),
        "default_inputs_graph_misses_used_linears": missed,
        "over_bound_explained": {m: archs_with("over_bound_explained", [r for r in records if r["method"] == m])
                                 for m in methods},
        "unexplained_by_simulation": {m: archs_with("unexplained_by_simulation",
                                                    [r for r in records if r["method"] == m]) for m in methods},
        "raw_param_projections": archs_with("raw_param_projections", first),
        "raw_param_share": {r["arch"]: r["raw_param_share"] for r in first if r.get("raw_param_share")},
        "lm_head_children_swapped": archs_with("lm_head_children_swapped", first),
        "reported_unswappable": archs_with("reported_unswappable", first),
        "float_with_reason": {m: archs_with("float_with_reason", [r for r in records if r["method"] == m])
                              for m in methods},
        "patterns": {k: v for k, v in sorted(patterns.items(), key=lambda kv: -sum(len(x) for x in kv[1].values()))},
        "compile": _compile_summary(records, methods),
    }


def _compile_summary(records, methods) -> Dict[str, Any]:
    """Where --compile ran: fullgraph failures and graph breaks, float vs quantized."""
    out: Dict[str, Any] = {}
    first = {r["arch"]: r for r in records if r["method"] == methods[0] and r.get("compile_float")}
    if not first:
        return out
    out["float_fullgraph_failed"] = sorted(a for a, r in first.items() if r["compile_float"].get("fullgraph") != "ok")
    for m in methods:
        rows = [r for r in records if r["method"] == m and r.get("compile_quantized")]
        out[m] = {
            "checked": len(rows),
            "fullgraph_failed": sorted(r["arch"] for r in rows if r["compile_quantized"].get("fullgraph") != "ok"),
            "fullgraph_failed_only_after_quantize": sorted(
                r["arch"] for r in rows if r["compile_quantized"].get("fullgraph") != "ok"
                and r["compile_float"].get("fullgraph") == "ok"),
            "more_breaks_than_float": sorted(
                r["arch"] for r in rows if (r["compile_quantized"].get("breaks") or 0)
                > (r["compile_float"].get("breaks") or 0)),
        }
    return out


def print_summary(s: Dict[str, Any], file=sys.stdout) -> None:
    print(f"\narchitectures {s['architectures']}, built {s['built']}, float forward ran {s['float_forward_ran']}, "
          f"ok for every method {s['ok_every_method']} ({100 * s['ok_share_of_forward_ran']:.1f}% of those that ran)",
          file=file)
    for method, counts in s["outcomes_by_method"].items():
        share = 100 * s["ok_share_by_method"][method]
        print(f"  {method}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"  (ok {share:.1f}% of ran)",
              file=file)
    for method, archs in s["over_bound_explained"].items():
        if archs:
            print(f"  {method}: over the bound but equal to the fake-quantized float model ({len(archs)}): "
                  f"{', '.join(archs)}", file=file)
    for method, archs in s["unexplained_by_simulation"].items():
        if archs:
            print(f"  {method}: output differs from the fake-quantized float model ({len(archs)}): {', '.join(archs)}",
                  file=file)
    print(f"\nfind_linears fell back to the module walk with the sweep's inputs: {len(s['fallback_to_module_walk'])}",
          file=file)
    for reason, archs in s["fallback_reasons"].items():
        print(f"  {len(archs):4d}  {reason}\n        {', '.join(archs)}", file=file)
    if s["default_inputs_fallback"]:
        print(f"\n... and with its default inputs (quantize without example_inputs): "
              f"{len(s['default_inputs_fallback'])}", file=file)
        for reason, archs in s["default_inputs_fallback_reasons"].items():
            print(f"  {len(archs):4d}  {reason}\n        {', '.join(archs)}", file=file)
    if s.get("default_inputs_graph_misses_used_linears"):
        print("\ncaptured with the default inputs, but the graph misses linears the sweep's inputs use "
              "(left float by quantize(model, method)): " + ", ".join(
                  f"{a} {n}" for a, n in s["default_inputs_graph_misses_used_linears"].items()), file=file)
    shares = s.get("raw_param_share", {})
    if shares:
        print("\nraw nn.Parameter matmul weights (not nn.Linear; stay float), share of the model's matmul "
              "weights: " + ", ".join(f"{a} {100 * v:.0f}%" for a, v in sorted(shares.items(), key=lambda kv: -kv[1])),
              file=file)
    for method, archs in s.get("float_with_reason", {}).items():
        print(f"\n{method}: ok, but used linears left float with a reason quantize recorded: {len(archs)}\n"
              f"  {', '.join(archs)}", file=file)
    for key, label in (("raw_param_projections", "raw nn.Parameter matmul weights left float"),
                       ("lm_head_children_swapped", "children of lm_head quantized (skip=('lm_head',) misses them)"),
                       ("reported_unswappable", "find_linears reported unswappable matmul weights")):
        if not s[key]:
            continue
        print(f"\n{label}: {len(s[key])}\n  {', '.join(s[key])}", file=file)
    if s.get("compile"):
        print(f"\ntorch.compile(fullgraph=True, backend='eager'): {json.dumps(s['compile'])}", file=file)
    print("\nby outcome and message pattern:", file=file)
    for key, per_method in s["patterns"].items():
        archs = sorted(set().union(*per_method.values()))
        counts = " ".join(f"{m}:{len(v)}" for m, v in per_method.items())
        print(f"  [{counts}] {key}\n      {', '.join(archs)}", file=file)


def versions() -> Dict[str, str]:
    import subprocess

    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/pymllm_fx", ":/passes"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        dirty = ""
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0], "commit": commit + (" (library files modified)" if dirty else "")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated model types (default: every one in the auto mappings)")
    p.add_argument("--exclude", default="", help="comma-separated model types to leave out")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per architecture (all methods)")
    p.add_argument("--shard", default=None, help="i/n: every n-th architecture starting at i")
    p.add_argument("--compile", action="store_true", help="also count torch.compile graph breaks (slow)")
    p.add_argument("--simulate", choices=("always", "over_bound"), default="always",
                   help="compare with the fake-quantized float model for every output, or only over the bound")
    p.add_argument("--no-default-capture", action="store_true",
                   help="skip the extra capture with find_linears' default inputs")
    p.add_argument("--json", default=None, help="write every record and the summary here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    archs = architectures()
    if args.only:
        wanted = [a.strip() for a in args.only.split(",") if a.strip()]
        missing = [a for a in wanted if a not in archs]
        if missing:
            p.error(f"not in the auto mappings: {missing}")
        archs = {a: archs[a] for a in wanted}
    for a in args.exclude.split(","):
        archs.pop(a.strip(), None)
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        archs = {a: c for k, (a, c) in enumerate(archs.items()) if k % n == i}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    at_start = versions()  # the workers import the library now; a later commit is not what ran
    t0 = time.time()
    options = {"compile": args.compile, "simulate": args.simulate, "default_capture": not args.no_default_capture}
    records = sweep(archs, methods, jobs=args.jobs, timeout=args.timeout, options=options, progress=not args.quiet)
    elapsed = time.time() - t0
    print(table(records))
    s = summary(records, methods)
    s["seconds"] = round(elapsed, 1)
    print_summary(s)
    print(f"\n{len(archs)} architectures x {len(methods)} methods in {elapsed:.0f}s with {args.jobs} workers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": s, "versions": at_start, "settings": vars(args), "records": records}, f,
                      indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
