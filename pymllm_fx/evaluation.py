"""Quality checks a user runs after quantizing: perplexity of a causal LM on a text."""

from __future__ import annotations

import inspect
import math
import time

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


class GreedyDecoder:
    """Greedy decoding of a transformers causal LM over a static KV cache, eager or compiled.

    The gpt-fast loop: one prefill, then one fixed-shape step per token, so a compiled step is
    traced once (``fullgraph=True``: a graph break is an error) and reused for every token.
    """

    def __init__(self, model: nn.Module, max_cache_len: int = 256, compile: bool = False, mode: str | None = None):
        from transformers import StaticCache  # transformers is the optional "hf" extra

        self.model = model
        self.max_cache_len = max_cache_len
        self._cache_cls = StaticCache
        # transformers 5 renamed past_key_values to cache; use whichever this version takes.
        accepted = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in accepted else "past_key_values"
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode) if compile else self._step
        self._cache = None
        self._cache_for = None  # (batch, device) the kept cache was built for

    def _step(self, token: torch.Tensor, cache) -> torch.Tensor:
        return self.model(token, use_cache=True, **{self._cache_kw: cache}).logits[:, -1].argmax(-1, keepdim=True)

    def _empty_cache(self, batch: int, device: torch.device):
        """One static cache per decoder, emptied in place for each prompt. Its tensors are marked
        static addresses for the compiled step, and CUDA graphs record again whenever those
        addresses change: a new cache per call re-recorded the graph inside some timed decodes."""
        if self._cache is not None and self._cache_for == (batch, device):
            self._cache.reset()
        else:
            self._cache = self._cache_cls(config=self.model.config, max_cache_len=self.max_cache_len)
            self._cache_for = (batch, device)
        return self._cache

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor):
        """Run the prompt (eager) into the decoder's emptied static cache; returns (first new token
        ``(1, 1)``, cache), from which ``step`` continues one token at a time."""
        device = next(self.model.parameters()).device
        cache = self._empty_cache(input_ids.shape[0], device)
        logits = self.model(input_ids.to(device), use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}).logits
        return logits[:, -1].argmax(-1, keepdim=True), cache

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
        """Returns (new token ids ``(1, n)``, seconds spent in decode steps, the prefill excluded)."""
        if input_ids.shape[1] + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new exceeds max_cache_len={self.max_cache_len}"
            )
        device = next(self.model.parameters()).device
        token, cache = self.prefill(input_ids)
        tokens = [token]
        _sync(device)
        start = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and int(token) == eos_token_id:
                break
            # Under CUDA graphs the next replay overwrites a step's output, so neither the kept
            # token nor the next step's input may be that output itself: clone it once.
            token = self.step(token, cache).clone()
            tokens.append(token)
        _sync(device)
        return torch.cat(tokens, dim=1), time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
