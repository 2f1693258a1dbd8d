"""Quantization methods, one per file.

Importing the package registers the checkpoint formats their files write (each writer sits beside
the reader of its format), in the order ``save_quantized`` lists them.
"""

from pymllm_fx.loading.formats import register_format
from pymllm_fx.methods.awq import AWQLinearMethod
from pymllm_fx.methods.compressed_tensors import CompressedTensorsLinearMethod
from pymllm_fx.methods.fp8_checkpoint import Fp8CheckpointLinearMethod
from pymllm_fx.methods.gptq import GPTQLinearMethod

register_format("awq", AWQLinearMethod)
register_format("gptq", GPTQLinearMethod)
register_format("compressed-tensors", CompressedTensorsLinearMethod)
register_format("fp8", Fp8CheckpointLinearMethod)
