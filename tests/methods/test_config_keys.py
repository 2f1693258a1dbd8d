"""quantization_config keys as each tool's current version writes them: accepted without a word;
keys that change the math refused unless harmless; keys no list knows warned about, not refused."""

from __future__ import annotations

import warnings

import pytest

from pymllm_fx.methods.registry import resolve, resolve_checkpoint

# Each config as the named tool writes it (see pymllm_fx/methods/config_keys.py for the sources).
WRITTEN = {
    "gptqmodel-7.7-gptq": {
        "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "lm_head": False, "quant_method": "gptq",
        "method": "gptq", "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
        "meta": {"quantizer": ["gptqmodel:7.7.0"], "damp_percent": 0.05, "mse": 0.0, "act_group_aware": True,
                 "fallback": {"strategy": "rtn", "threshold": "0.5%"}, "moe": {"routing": {}}},
    },
    "gptqmodel-7.7-awq": {
        "bits": 4, "group_size": 128, "desc_act": False, "lm_head": False, "quant_method": "awq", "method": "awq",
        "checkpoint_format": "gemm", "format": "gemm", "pack_dtype": "int32", "zero_point": True,
        "meta": {"quantizer": ["gptqmodel:7.7.0"]},
    },
    "transformers-5.24-gptq": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "format": "gptq",
        "checkpoint_format": "gptq", "modules_in_block_to_quantize": None, "damp_percent": 0.1,
        "act_group_aware": True, "true_sequential": True, "meta": None, "backend": "auto", "tokenizer": None,
        "dataset": None, "model_seqlen": None, "block_name_to_quantize": None,
        "module_name_preceding_first_block": None, "batch_size": 1, "pad_token_id": None,
        "max_input_length": None, "cache_block_outputs": True,
    },
    "transformers-4.57-gptq": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.1,
        "true_sequential": True, "use_cuda_fp16": False, "use_exllama": True, "exllama_config": {"version": 1},
        "model_seqlen": None, "checkpoint_format": "gptq", "meta": None, "backend": None,
    },
    "autogptq-0.7": {
        "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False,
        "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
        "is_marlin_format": False, "quant_method": "gptq", "checkpoint_format": "gptq",
    },
    "autoawq-0.2.9": {
        "quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm",
        "modules_to_not_convert": None,
    },
    "transformers-5.24-awq": {
        "quant_method": "awq", "zero_point": True, "modules_to_not_convert": None, "version": "gemm",
        "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "format": "gemm", "damp_percent": 0.1,
        "act_group_aware": True, "true_sequential": True, "meta": None, "backend": "auto", "tokenizer": None,
        "dataset": None, "batch_size": 1, "cache_block_outputs": True,
    },
    "transformers-4.57-awq": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "exllama",
        "backend": "autoawq", "fuse_max_seq_len": None, "modules_to_not_convert": None,
        "exllama_config": {"version": 2, "max_input_len": 2048, "max_batch_size": 8}, "modules_to_fuse": None,
        "do_fuse": False,
    },
    "deepseek-v3.1-fp8": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "transformers-5.24-fp8": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": None, "dequantize": False, "scale_fmt": "float", "modules_to_convert": None,
        "expert_dtype": "fp8",
    },
    "compressed-tensors-0.20.1": {
        "version": "0.20.1", "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group",
                        "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "actorder": None},
        }},
        "kv_cache_scheme": None, "format": "pack-quantized", "quantization_status": "compressed",
        "global_compression_ratio": None, "ignore": ["lm_head"], "moe_sparsity_config": None,
    },
}


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_current_writers_configs_load_without_a_word(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = resolve_checkpoint(dict(WRITTEN[name]))
    assert method.name.startswith(WRITTEN[name]["quant_method"])


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_a_key_no_list_knows_warns_and_is_ignored(name):
    with pytest.warns(UserWarning, match=r"quantization_config has keys \['shiny_new_knob'\].*ignored"):
        resolve_checkpoint(WRITTEN[name] | {"shiny_new_knob": 3})


@pytest.mark.parametrize(
    "name, extra, pattern",
    [
        ("gptqmodel-7.7-gptq", {"rotation": "hadamard"}, r"rotation.*Hadamard"),
        ("gptqmodel-7.7-gptq", {"activation": {"mode": "w4afp8"}}, r"activation.*quantizes activations"),
        ("gptqmodel-7.7-gptq", {"adapter": {"name": "lora", "rank": 128}}, r"adapter.*low-rank"),
        ("gptqmodel-7.7-awq", {"pack_dtype": "int16"}, r"pack_dtype.*another word size"),
        ("gptqmodel-7.7-awq", {"dynamic": {"+:.*down": {"bits": 8}}}, r"dynamic.*per-module"),
        ("transformers-5.24-awq", {"backend": "llm-awq"}, r"llm-awq"),
        ("transformers-5.24-fp8", {"expert_dtype": "fp4"}, r"expert_dtype.*MoE experts"),
        ("transformers-5.24-fp8", {"modules_to_convert": ["embed_tokens"]}, r"modules_to_convert"),
    ],
)
def test_keys_that_change_the_math_are_refused_unless_harmless(name, extra, pattern):
    with pytest.raises(NotImplementedError, match=pattern):
        resolve_checkpoint(WRITTEN[name] | extra)
    harmless = {key: None for key in extra}  # null: the writer's way of saying "not used"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if name.endswith("awq") and "backend" in extra:
            harmless = {"backend": "auto"}
        resolve_checkpoint(WRITTEN[name] | harmless)


def test_our_own_formats_still_refuse_unknown_keys():
    """A typo in a pymllm_fx method config is ours to catch: it is refused, not warned about."""
    with pytest.raises(ValueError, match=r"unknown keys \['group_sz'\]"):
        resolve({"quant_method": "int4", "group_sz": 64})
