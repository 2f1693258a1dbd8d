"""Example inputs for a transformers model, built from what the model says about itself.

The graph is captured on fake tensors, so the inputs only need the right names, shapes and
dtypes: ``main_input_name`` says which kind (token ids, images, audio features, waveforms), the
forward's signature which extras it takes (decoder ids, masks, ``use_cache``), and the config the
sizes (image size and channels, mel bins, vocabulary, special token ids). A model that mixes
inputs (a vision-language model) gets its images with as many image tokens as the config says an
image becomes, so every branch is traced. The candidates are tried in order; the first that
captures wins.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

BATCH, SEQ = 2, 8
_TOKEN_ID = re.compile(r".*(token_id|token_index|_id)$")
_SUB_CONFIGS = ("vision_config", "audio_config", "text_config", "encoder_config", "decoder_config", "encoder",
                "decoder", "speech_config", "image_config", "vision_encoder_config", "audio_encoder_config")


def _configs(config: Any, depth: int = 0) -> List[Any]:
    """The config and its sub-configs (vision, audio, text, ...), outermost first."""
    found = [config]
    if depth < 3:
        for name in _SUB_CONFIGS:
            sub = getattr(config, name, None)
            if sub is not None and hasattr(sub, "to_dict") and sub is not config:
                found += _configs(sub, depth + 1)
    return found


def _first(config: Any, *names: str, prefer: Tuple[str, ...] = ()) -> Any:
    """The first of ``names`` set on the config or a sub-config (``prefer``red sub-configs first)."""
    configs = _configs(config)
    preferred = [getattr(config, p, None) for p in prefer]
    for c in [p for p in preferred if p is not None] + configs:
        for name in names:
            value = getattr(c, name, None)
            if value is not None and not isinstance(value, bool):
                return value
    return None


def _special_ids(config: Any) -> set:
    ids = set()
    for c in _configs(config):
        for key, value in vars(c).items():
            if isinstance(value, int) and not isinstance(value, bool) and _TOKEN_ID.fullmatch(key) and value >= 0:
                ids.add(value)
    return ids


def _token_ids(config: Any, shape: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """Ordinary token ids (no special token, in the vocabulary), deterministic."""
    vocab = int(_first(config, "vocab_size", prefer=("text_config",)) or 100)
    special = _special_ids(config)
    allowed = [t for t in range(3, max(4, min(vocab, 1000))) if t not in special] or [0]
    count = shape[0] * shape[1]
    picks = [allowed[(7 * i + 3) % len(allowed)] for i in range(count)]
    return torch.tensor(picks, dtype=torch.long, device=device).reshape(shape)


def _image(config: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    channels = int(_first(config, "num_channels", "in_channels", "in_chans", prefer=("vision_config",)) or 3)
    size = _first(config, "image_size", "img_size", "input_size", prefer=("vision_config",)) or 224
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    height, width = (size[-2], size[-1]) if isinstance(size, (list, tuple)) else (size, size)
    return torch.zeros(BATCH, channels, int(height), int(width), device=device, dtype=dtype)


def _image_tokens(config: Any) -> Optional[int]:
    """How many tokens one image becomes in the language model, from the config's own numbers."""
    count = _first(config, "image_seq_length", "mm_tokens_per_image", "num_image_tokens", "image_token_count",
                   "num_query_tokens")
    if isinstance(count, int) and count > 0:
        return count
    size = _first(config, "image_size", prefer=("vision_config",))
    patch = _first(config, "patch_size", prefer=("vision_config",))
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        merge = _first(config, "spatial_merge_size", "downsample_ratio", prefer=("vision_config",))
        tokens = (size // patch) ** 2
        return tokens // int(merge) ** 2 if isinstance(merge, int) and merge > 0 else tokens
    return None


def _audio(config: Any, main: str, device: torch.device, dtype: torch.dtype) -> List[Tuple[str, Dict[str, Any]]]:
    if main == "input_values":  # raw waveforms, as long as the feature encoder's strides need
        strides = _first(config, "conv_stride", prefer=("audio_config",))
        hop = math.prod(strides) if isinstance(strides, (list, tuple)) else 320
        length = max(1600, hop * 16)
        return [("input_values (B, L)", {"input_values": torch.zeros(BATCH, length, device=device, dtype=dtype)})]
    bins = int(_first(config, "num_mel_bins", "feature_size", "input_feat_per_channel", "n_mels",
                      prefer=("audio_config",)) or 80)
    frames = int(_first(config, "max_source_positions", prefer=("audio_config",)) or 1500) * 2
    frames = min(frames, 3000)
    return [
        (f"input_features (B, {bins}, T)", {"input_features": torch.zeros(BATCH, bins, frames, device=device, dtype=dtype)}),
        (f"input_features (B, T, {bins})", {"input_features": torch.zeros(BATCH, frames, bins, device=device, dtype=dtype)}),
    ]


def candidate_inputs(model: torch.nn.Module) -> List[Tuple[str, Dict[str, Any]]]:
    """Named example-input dicts for a transformers model, most specific first."""
    config = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype if param.dtype.is_floating_point else torch.float32
    accepted = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    main = getattr(model, "main_input_name", "input_ids")
    if main not in accepted and not takes_any:
        main = next((n for n in ("input_ids", "pixel_values", "input_features", "input_values") if n in accepted),
                    main)

    ids = _token_ids(config, (BATCH, SEQ), device)
    tries: List[Tuple[str, Dict[str, Any]]] = []
    if main in ("pixel_values", "pixel_values_videos"):
        pixels = _image(config, device, dtype)
        if main == "pixel_values_videos":
            frames = int(_first(config, "num_frames", prefer=("vision_config",)) or 2)
            pixels = pixels.unsqueeze(1).expand(-1, frames, -1, -1, -1).contiguous()
        if "input_ids" in accepted:
            tries.append((f"{main} + input_ids", {main: pixels, "input_ids": ids}))
        tries.append((main, {main: pixels}))
    elif main in ("input_features", "input_values"):
        tries += _audio(config, main, device, dtype)
    else:
        text: Dict[str, Any] = {"input_ids": ids}
        if "attention_mask" in accepted:
            text["attention_mask"] = torch.ones_like(ids)
        if "pixel_values" in accepted:  # a vision-language model: reach the vision tower too
            count = _image_tokens(config)
            token = _first(config, "image_token_id", "image_token_index", "image_pad_token_id")
            pixels = _image(config, device, dtype)
            if isinstance(token, int) and count and count < 4096:
                with_images = torch.cat([ids[:, :2], torch.full((BATCH, count), token, device=device), ids[:, 2:]], 1)
                tries.append((f"input_ids with {count} image tokens + pixel_values",
                              {"input_ids": with_images, "attention_mask": torch.ones_like(with_images),
                               "pixel_values": pixels} if "attention_mask" in accepted else
                              {"input_ids": with_images, "pixel_values": pixels}))
        tries.append(("input_ids", text))
        dummy = {k: v.to(device) for k, v in getattr(model, "dummy_inputs", {}).items() if torch.is_tensor(v)}
        if dummy and set(dummy) != {"input_ids"}:
            tries.append(("the model's dummy_inputs", dummy))

    extras: Dict[str, Any] = {}
    if "decoder_input_ids" in accepted:
        extras["decoder_input_ids"] = _token_ids(config, (BATCH, SEQ // 2), device)
    if "use_cache" in accepted or (takes_any and _first(config, "use_cache") is not None):
        extras["use_cache"] = False  # a cache object in the outputs cannot be captured
    return [(name, {**inputs, **{k: v for k, v in extras.items() if k not in inputs}}) for name, inputs in tries]
