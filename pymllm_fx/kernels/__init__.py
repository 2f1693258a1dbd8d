"""Kernels behind ``torch.ops.pymllm_fx.*``: one file per family, each with its torch reference."""

from pymllm_fx.kernels import fp8_block, fp8_w8a8, moe, w4a16, w8a8, w8a16  # noqa: F401  (registers the ops)
