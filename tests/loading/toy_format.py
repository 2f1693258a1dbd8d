"""A toy checkpoint format, defined and registered in this one file: the proof that a format is
added without touching ``pymllm_fx/loading``.

"toy" stores each int8 layer dequantized (``weight`` float32, ``weight_scale`` kept beside it) and
says so in its ``quantization_config``; it holds nothing else.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from pymllm_fx.loading.formats import Site, refuse, register_format


class ToyWriter:
    """Writes int8 per-channel layers as their float weights."""

    @staticmethod
    def checkpoint_config(sites: List[Site], floats: List[str]) -> dict:
        for site in sites:
            if site.q.kind != "int8":
                raise refuse(site, "toy", "the toy format holds int8 per-channel layers only", "quantize with 'int8'")
        return {"quant_method": "toy", "layers": sorted(site.name for site in sites), "ignore": list(floats)}

    @staticmethod
    def checkpoint_tensors(site: Site, config: dict) -> Dict[str, torch.Tensor]:
        q = site.q
        return {"weight": q.weight.float() * q.scales.float().reshape(-1, 1), "weight_scale": q.scales.float()}


register_format("toy", ToyWriter)
