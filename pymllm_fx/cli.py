"""``python -m pymllm_fx``: quantize a checkpoint directory, or explain what loading one would do."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _method(text: Optional[str]):
    """A registry name, or a quantization_config as inline JSON (``'{"quant_method": "int4", ...}'``)."""
    if text is None or not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except ValueError as err:
        raise SystemExit(f"--method: not a method name or a JSON quantization_config ({err})") from None


def _parser() -> argparse.ArgumentParser:
    import pymllm_fx  # noqa: F401  (importing the methods registers the checkpoint formats)
    from pymllm_fx.loading.formats import format_names

    parser = argparse.ArgumentParser(prog="python -m pymllm_fx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    quantize = commands.add_parser("quantize", help="quantize a float checkpoint directory and save it in a checkpoint format")
    quantize.add_argument("src", type=Path, help="a local checkpoint directory (config.json + *.safetensors)")
    quantize.add_argument("--method", required=True, help="int8, int4, fp8, or a quantization_config as JSON")
    quantize.add_argument("--out", required=True, type=Path, help="the directory to write")
    quantize.add_argument("--format", default="compressed-tensors", choices=format_names(),
                          help="checkpoint format to write (default: compressed-tensors, read by vLLM and transformers)")
    quantize.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                          help="module-path pattern to leave float (repeatable; default: lm_head)")
    quantize.add_argument("--device", default=None, help="where to quantize (default: cuda if available, else cpu)")
    quantize.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    quantize.add_argument("--max-shard-size", default="5GB", help="split the output into shards of at most this size")
    explain = commands.add_parser("explain", help="the layers of a checkpoint, their methods and sizes, and what stays float and why")
    explain.add_argument("dir", type=Path, help="a local checkpoint directory")
    explain.add_argument("--method", default=None, help="for a float checkpoint: the method to plan for")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import pymllm_fx
    from pymllm_fx.api import DEFAULT_SKIP, explain_checkpoint
    from pymllm_fx.loading import CheckpointError

    try:
        if args.command == "explain":
            explain_checkpoint(args.dir, method=_method(args.method))
            return 0
        start = time.perf_counter()
        model = pymllm_fx.from_pretrained(
            args.src, method=_method(args.method), device=args.device,
            dtype=DTYPES[args.dtype] if args.dtype else None, skip=tuple(args.skip) if args.skip else DEFAULT_SKIP,
        )
        pymllm_fx.save_quantized(model, args.out, format=args.format, max_shard_size=args.max_shard_size)
        pymllm_fx.explain(model)
        print(f"\nwrote {args.out} ({args.format}) in {time.perf_counter() - start:.1f}s")
        return 0
    except (CheckpointError, ValueError, TypeError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
