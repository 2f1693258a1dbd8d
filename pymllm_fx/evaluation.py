"""Quality checks a user runs after quantizing: perplexity of a causal LM on a text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity of a transformers causal LM on ``input_ids`` (1-D or ``(1, T)``) in non-overlapping windows of ``window`` tokens.

    Every token after the first of each window is scored once, so the number is comparable
    between two models on the same ids and window.
    """
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window].to(device)[None]
        if chunk.shape[1] < 2:
            break
        logits = model(chunk, use_cache=False).logits.float()
        total_nll += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total_nll / count)
