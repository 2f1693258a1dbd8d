"""Tiny randomly initialised transformers models for the tests, one builder for every file."""

import pytest
import torch
from torch import nn

from pymllm_fx.passes import find_linears

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "bert", "opt", "phi3", "gemma"]
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128)


def build_model(arch: str, **overrides) -> nn.Module:
    """A tiny randomly initialised model of ``arch`` (hidden 64, 2 layers, 4 heads, 2 kv heads), in eval mode."""
    t = transformers
    gqa = dict(_COMMON, num_key_value_heads=2)
    if arch == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**{**gqa, **overrides}))
    elif arch == "qwen2":
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**{**gqa, **overrides}))
    elif arch == "mistral":
        model = t.MistralForCausalLM(t.MistralConfig(**{**gqa, **overrides}))
    elif arch == "phi3":
        model = t.Phi3ForCausalLM(t.Phi3Config(**{**gqa, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                                  **overrides}))
    elif arch == "gemma":
        model = t.GemmaForCausalLM(t.GemmaConfig(**{**gqa, "head_dim": 16, **overrides}))
    elif arch == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(**{**dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                                                         n_positions=64, bos_token_id=1, eos_token_id=2), **overrides}))
    elif arch == "bert":
        model = t.BertModel(t.BertConfig(**{**_COMMON, "max_position_embeddings": 64, **overrides}))
    elif arch == "opt":
        model = t.OPTForCausalLM(t.OPTConfig(**{**dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                                                       max_position_embeddings=64), **overrides}))
    else:
        raise ValueError(arch)
    return model.eval()


_SHARED: dict = {}


def model_and_sites(arch: str):
    """(float model, its linear sites) per arch, built once per test run (seed 0).

    Shared across test files: callers must not modify the model; quantize a deep copy.
    """
    if arch not in _SHARED:
        torch.manual_seed(0)
        model = build_model(arch)
        _SHARED[arch] = (model, find_linears(model))
    return _SHARED[arch]
