"""GreedyDecoder (the demo's decode loop) agrees with HF generate, eager and compiled, when quantized."""

import pytest
import torch

import pymllm_fx
from pymllm_fx.evaluation import GreedyDecoder, perplexity

transformers = pytest.importorskip("transformers")

from hf_models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def int4_llama():
    torch.manual_seed(0)
    model = build_model("llama")
    return pymllm_fx.quantize(model, {"quant_method": "int4", "group_size": 32}, progress=False)


def test_greedy_decoder_matches_hf_generate_eager_and_compiled(int4_llama):
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        expected = int4_llama.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[:, 7:]
    eager, _ = GreedyDecoder(int4_llama, max_cache_len=32).generate(ids, 12)
    assert torch.equal(eager, expected)
    compiled, seconds = GreedyDecoder(int4_llama, max_cache_len=32, compile=True).generate(ids, 12)
    assert torch.equal(compiled, expected)
    assert seconds > 0


def test_greedy_decoder_keeps_one_cache_across_calls(int4_llama):
    """Later prompts reuse the emptied cache (same tensors, so a CUDA graph replays rather than
    records again), and nothing of an earlier prompt leaks into a later one's tokens."""
    torch.manual_seed(1)
    first, second, wide = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (2, 5))
    decoder = GreedyDecoder(int4_llama, max_cache_len=32)
    decoder.generate(first, 12)
    cache = decoder._cache
    keys = [layer.keys.data_ptr() for layer in cache.layers]
    again, _ = decoder.generate(second, 8)
    assert decoder._cache is cache and [layer.keys.data_ptr() for layer in cache.layers] == keys
    fresh, _ = GreedyDecoder(int4_llama, max_cache_len=32).generate(second, 8)
    assert torch.equal(again, fresh)
    both, _ = decoder.generate(wide, 6)  # another batch size: a cache of its own
    assert decoder._cache is not cache and both.shape == (2, 6)
    assert torch.equal(both, GreedyDecoder(int4_llama, max_cache_len=32).generate(wide, 6)[0])


def test_greedy_decoder_stops_at_eos_and_checks_cache_length(int4_llama):
    ids = torch.randint(0, 128, (1, 5))
    full, _ = GreedyDecoder(int4_llama, max_cache_len=32).generate(ids, 10)
    eos = int(full[0, 2])
    stopped, _ = GreedyDecoder(int4_llama, max_cache_len=32).generate(ids, 10, eos_token_id=eos)
    first = int((full[0] == eos).nonzero()[0])
    assert torch.equal(stopped, full[:, : first + 1])
    with pytest.raises(ValueError, match="max_cache_len"):
        GreedyDecoder(int4_llama, max_cache_len=8).generate(ids, 10)


@torch.no_grad()
def test_perplexity_matches_a_direct_computation(int4_llama):
    ids = torch.randint(0, 128, (1, 40))
    logits = int4_llama(ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert perplexity(int4_llama, ids, window=64) == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    # Two windows score every token but the first of each window.
    windows = [ids[:, :20], ids[:, 20:]]
    total = sum(torch.nn.functional.cross_entropy(int4_llama(w, use_cache=False).logits[0, :-1], w[0, 1:],
                                                  reduction="sum") for w in windows)
    assert perplexity(int4_llama, ids, window=20) == pytest.approx(float(torch.exp(total / 38)), rel=1e-5)
