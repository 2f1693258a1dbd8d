"""pymllm_fx: quantize any PyTorch model in one line; fast under torch.compile.

    import pymllm_fx
    pymllm_fx.quantize(model, "int4")     # int8, int4, fp8, none; or a quantization_config dict
    pymllm_fx.explain(model)
    pymllm_fx.save_quantized(model, "out", format="awq")   # or gptq, compressed-tensors, fp8
    model = pymllm_fx.from_pretrained("out")
"""

from pymllm_fx import kernels  # noqa: F401  (registers torch.ops.pymllm_fx.*)
from pymllm_fx.api import DEFAULT_SKIP, explain_checkpoint, from_pretrained, quantize, save_quantized, skip_reason
from pymllm_fx.layers.all_reduce import use_symmetric_memory
from pymllm_fx.layers.quantize_base import LinearMethodBase, QuantizeMethodBase, UnquantizedLinearMethod
from pymllm_fx.loading import CheckpointError, iter_weights, load_weights, process_weights_after_loading
from pymllm_fx.methods.registry import method_names, resolve
from pymllm_fx.report import explain

__all__ = [
    "CheckpointError",
    "DEFAULT_SKIP",
    "LinearMethodBase",
    "QuantizeMethodBase",
    "UnquantizedLinearMethod",
    "explain",
    "explain_checkpoint",
    "from_pretrained",
    "iter_weights",
    "load_weights",
    "method_names",
    "process_weights_after_loading",
    "quantize",
    "resolve",
    "save_quantized",
    "skip_reason",
    "use_symmetric_memory",
]
