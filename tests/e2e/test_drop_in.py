"""A quantized transformers model is a drop-in for the original (issue 12): what HF code and users ask
of it keeps working, or refuses clearly, and never silently corrupts the model."""

import copy
import warnings

import pytest
import torch

import pymllm_fx
from hf_models import build_model

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def int4_llama():
    torch.manual_seed(0)
    return pymllm_fx.quantize(build_model("llama"), {"quant_method": "int4", "group_size": 32}, progress=False)


def test_swapped_layers_answer_what_code_asks_of_a_linear(int4_llama):
    layer = int4_llama.model.layers[0].mlp.down_proj
    assert not isinstance(layer, torch.nn.Linear)
    assert isinstance(layer.weight, torch.Tensor)
    assert layer.weight.shape == (64, 128) and layer.weight.dtype == torch.float32 and layer.weight.device.type == "cpu"
    assert (layer.in_features, layer.out_features) == (128, 64) and layer.bias is None
    # no second float copy: a zero-stride view of one element, outside parameters and state_dict
    assert layer.weight.untyped_storage().nbytes() == 4
    assert "model.layers.0.mlp.down_proj.weight" not in int4_llama.state_dict()
    assert all(p is not layer.weight for p in int4_llama.parameters())


def test_t5_reads_its_linear_weight_dtype_and_still_runs():
    """T5DenseActDense.forward checks self.wo.weight.dtype; after the swap that must answer."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymllm_fx.quantize(model, "int8", progress=False)
    assert not isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, torch.nn.Linear)
    decoder_ids = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=IDS, decoder_input_ids=decoder_ids).logits
        ref = reference(input_ids=IDS, decoder_input_ids=decoder_ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.03


def test_generate_matches_a_plain_greedy_loop(int4_llama):
    ids = IDS[:1]
    with torch.no_grad():
        out = int4_llama.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        greedy = ids
        for _ in range(5):
            nxt = int4_llama(greedy).logits[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], dim=1)
    assert torch.equal(out, greedy)


def test_save_pretrained_refuses_and_points_to_save_quantized(int4_llama, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"pymllm_fx \(int4\).*pymllm_fx\.save_quantized"):
        int4_llama.save_pretrained(target)
    assert not target.exists() or not any(target.iterdir())
    pymllm_fx.save_quantized(int4_llama, target, format="compressed-tensors", progress=False)
    assert (target / "model.safetensors").is_file()


def test_to_a_device_moves_codes_and_weight_views(int4_llama):
    int4_llama.to("meta")
    layer = int4_llama.model.layers[1].self_attn.q_proj
    assert layer.qweight.device.type == "meta" and layer.qweight.dtype == torch.int32
    assert layer.weight.device.type == "meta"


@pytest.mark.parametrize("cast", ["half", "to_bfloat16"])
def test_casting_changes_the_float_dtype_and_keeps_the_codes(int4_llama, cast):
    reference = copy.deepcopy(int4_llama)
    model = int4_llama.half() if cast == "half" else int4_llama.to(torch.bfloat16)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == dtype and layer.weight.dtype == dtype
    assert layer.params_dtype == dtype
    with torch.no_grad():
        out, ref = model(IDS).logits.float(), reference(IDS).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_fp8_codes_survive_a_cast():
    torch.manual_seed(0)
    model = pymllm_fx.quantize(build_model("llama"), "fp8", progress=False)
    model.to(torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.float8_e4m3fn  # stored e4m3 codes are never cast
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_scales_a_cast_would_flush_stay_in_their_dtype(int4_llama):
    """A scale below float16's range must not become zero: that layer keeps its scales in float32
    (the kernels read either) and says so; the rest of the model is cast."""
    layer = int4_llama.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        layer.scales[0, 0] = 1e-9  # below float16's smallest subnormal
    with pytest.warns(UserWarning, match=r"k_proj keeps \['scales', 'zeros'\] in torch.float32"):
        int4_llama.half()
    assert layer.scales.dtype == torch.float32 and layer.scales[0, 0].item() == pytest.approx(1e-9)
    assert layer.weight.dtype == torch.float16 and layer.params_dtype == torch.float16
    other = int4_llama.model.layers[0].self_attn.q_proj
    assert other.scales.dtype == torch.float16
    with torch.no_grad():
        assert torch.isfinite(int4_llama(IDS).logits).all()


def test_parameter_counts_and_memory_footprint_are_the_stored_tensors(int4_llama):
    torch.manual_seed(0)
    float_model = build_model("llama")
    stored = sum(p.numel() for p in int4_llama.parameters())
    assert int4_llama.num_parameters() == stored < float_model.num_parameters()
    footprint = sum(t.numel() * t.element_size() for t in list(int4_llama.parameters()) + list(int4_llama.buffers()))
    assert int4_llama.get_memory_footprint() == footprint < float_model.get_memory_footprint() / 2


def test_train_and_eval_toggles_do_not_disturb_the_layers(int4_llama):
    with torch.no_grad():
        before = int4_llama(IDS).logits
        int4_llama.train()
        int4_llama.eval()
        assert torch.equal(int4_llama(IDS).logits, before)
    assert all(not p.requires_grad for n, p in int4_llama.named_parameters() if "qweight" in n)
