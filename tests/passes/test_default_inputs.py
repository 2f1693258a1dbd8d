"""Without example_inputs, a transformers model is captured from inputs of its own kind (images,
audio features, waveforms, decoder ids, images with their image tokens), so every linear is
found from the graph: no module-walk fallback, nothing unreached."""

from __future__ import annotations

import warnings

import pytest
import torch

from pymllm_fx.passes import find_linears

transformers = pytest.importorskip("transformers")


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8))


def _whisper():
    return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=16, max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=3,
        decoder_start_token_id=2))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0))


def _wav2vec2():
    return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2))


def _llava():
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    text = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=100,
                                      image_seq_length=16, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full")
    return transformers.LlavaForConditionalGeneration(config)


@pytest.mark.parametrize("build", [_vit, _whisper, _t5, _wav2vec2, _llava], ids=lambda f: f.__name__.strip("_"))
def test_default_inputs_reach_every_linear_from_the_graph(build):
    torch.manual_seed(0)
    model = build().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="pymllm_fx: graph capture")
        sites = [site for site in find_linears(model) if not site.param]
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert {site.path for site in sites} == set(linears)
    assert all(site.from_graph for site in sites)
    unreached = [site.path for site in sites if "not reached" in site.reason]
    assert not unreached, unreached
