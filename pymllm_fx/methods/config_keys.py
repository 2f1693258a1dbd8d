"""The ``quantization_config`` keys other tools write, with the version each list was read from.

Formats grow keys faster than loaders. A checkpoint's config is checked against these lists:

- keys the method reads are honoured;
- known keys that do not change what the stored tensors mean (calibration settings, kernel and
  fusing choices, tool versions) are accepted without a word;
- known keys that change the math are accepted only with the values that leave it unchanged
  (``rotation: null``); any other value is the clear error of a feature we cannot honour;
- keys no list knows get one warning naming them, and are ignored: a new key that does change
  the stored layout shows up as a tensor-shape error at load, not as silently wrong output.

Update a list when a tool's new version writes a new key, and say where it was read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Tuple

Harmless = Callable[[Any], bool]


def _absent(value: Any) -> bool:
    return value is None or value == {} or value == [] or value is False


@dataclass(frozen=True)
class KnownKeys:
    """What one producer family writes: ``metadata`` keys are accepted as they are; ``math`` keys
    map to a test of the values that leave the stored weights' meaning unchanged, and the reason
    any other value cannot be honoured."""

    source: str
    metadata: Tuple[str, ...] = ()
    math: Dict[str, Tuple[Harmless, str]] = field(default_factory=dict)


# GPTQ: GPTQModel 7.7.0 (PyPI sdist, gptqmodel/quantization/config.py: to_dict and from_quant_config,
# models/writer.py), transformers 5.24 GPTQConfig.to_dict, transformers 4.57 GPTQConfig (exllama
# settings), AutoGPTQ 0.7 (auto_gptq/quantization/config.py), GPTQModel 4.x/5.x meta keys.
GPTQ_KEYS = KnownKeys(
    source="GPTQModel 7.7.0, transformers 5.24 / 4.57 GPTQConfig, AutoGPTQ 0.7",
    metadata=(
        # calibration settings: they shaped the stored values, not their meaning
        "damp_percent", "damp_auto_increment", "true_sequential", "mse", "act_group_aware", "static_groups",
        "tokenizer", "dataset", "model_seqlen", "batch_size", "pad_token_id", "max_input_length",
        "cache_block_outputs", "block_name_to_quantize", "module_name_preceding_first_block",
        "v2", "v2_alpha", "v2_memory_device", "gptaq", "gptaq_alpha", "gptaq_memory_device", "foem",
        "fallback", "hessian", "pack_impl", "mock_quantization",
        # kernel choices of the loading tool
        "backend", "use_exllama", "disable_exllama", "exllama_config", "use_cuda_fp16",
        # provenance
        "meta", "model_name_or_path", "model_file_base_name",
        # which modules were quantized: read from the tensors themselves (a float weight stays float)
        "modules_in_block_to_quantize", "modules_to_not_convert",
    ),
    math={
        "activation": (_absent, "quantizes activations at run time (GPTQModel W4A-FP8 / NVFP4 streams)"),
        "rotation": (_absent, "needs an online Hadamard transform before every down_proj (GPTQModel rotation)"),
        "adapter": (_absent, "adds a low-rank (EoRA) correction to the quantized weights"),
    },
)

# AWQ: AutoAWQ 0.2.9 (awq/models/_config.py to_transformers_dict), transformers 5.24 AwqConfig (a
# GPTQConfig subclass: it also writes GPTQ's calibration defaults, and ``sym: true`` regardless of
# zero_point), transformers 4.57 AwqConfig (fusing and exllama settings), GPTQModel 7.7 AWQ writer.
AWQ_KEYS = KnownKeys(
    source="AutoAWQ 0.2.9, transformers 5.24 / 4.57 AwqConfig, GPTQModel 7.7.0",
    metadata=(
        "sym",  # transformers' inherited GPTQ default, not AWQ's: zero_point says it
        "do_fuse", "fuse_max_seq_len", "modules_to_fuse", "exllama_config", "use_exllama",
        "tokenizer", "dataset", "damp_percent", "damp_auto_increment", "act_group_aware", "true_sequential",
        "model_seqlen", "block_name_to_quantize", "module_name_preceding_first_block", "batch_size",
        "pad_token_id", "max_input_length", "cache_block_outputs", "modules_in_block_to_quantize",
        "static_groups", "mse", "meta",
    ),
    math={
        "activation": (_absent, "quantizes activations at run time (GPTQModel W4A-FP8 / NVFP4 streams)"),
        "rotation": (_absent, "needs an online Hadamard transform before every down_proj (GPTQModel rotation)"),
        "lm_head": (_absent, "stores lm_head quantized, which AWQ checkpoints here do not load"),
        "pack_dtype": (lambda v: v in (None, "int32", "torch.int32"), "packs codes in another word size"),
        "dynamic": (_absent, "sets per-module bit widths and group sizes"),
    },
)

# FP8: transformers 5.24 FineGrainedFP8Config, vLLM 0.33 Fp8Config.from_config, DeepSeek-V3.1's
# config_v3.1.json (fmt, scale_fmt).
FP8_KEYS = KnownKeys(
    source="transformers 5.24 FineGrainedFP8Config, vLLM 0.33 Fp8Config, DeepSeek-V3.1 config",
    metadata=("dequantize",),  # a load-time choice of transformers
    math={
        "modules_to_convert": (_absent, "quantizes modules other than linears (embeddings)"),
        "expert_dtype": (lambda v: v in (None, "fp8"), "stores MoE experts in another format"),
        "store_dtype": (_absent, "stores routed experts as MXFP4"),
    },
)

# compressed-tensors 0.20.1: QuantizationConfig ignores extra top-level keys itself (pydantic
# extra="ignore"); its schemes and arguments forbid them, so those stay errors in compressed_tensors.py.
COMPRESSED_TENSORS_KEYS = KnownKeys(
    source="compressed-tensors 0.20.1",
    metadata=("global_compression_ratio", "version", "run_compressed", "quantization_status"),
    math={
        "moe_sparsity_config": (_absent, "prunes MoE experts per layer"),
    },
)


def check_producer_keys(method: str, config: dict, read: Iterable[str], known: KnownKeys) -> None:
    """Refuse known keys whose values change the math; warn once about keys no list knows."""
    read = set(read) | {"quant_method"}
    for key, (harmless, meaning) in known.math.items():
        if key in config and key not in read and not harmless(config[key]):
            value = repr(config[key])
            raise NotImplementedError(
                f"{method}: quantization_config[{key!r}] = {value if len(value) <= 80 else value[:80] + '...'} "
                f"{meaning}, which this loader cannot honour (the weights would load but compute something "
                f"else); use a checkpoint exported without it"
            )
    unknown = sorted(set(config) - read - set(known.metadata) - set(known.math))
    if unknown:
        warnings.warn(
            f"{method}: quantization_config has keys {unknown} that this version does not know (its lists "
            f"follow {known.source}); they are ignored. If one changes what the stored weights mean, the "
            f"output will be wrong: check what wrote the checkpoint",
            stacklevel=3,
        )
