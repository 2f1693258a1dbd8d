"""quantize()'s orchestration: work order and memory, beyond what the method tests cover."""

import torch

import pymllm_fx
from pymllm_fx.methods.int8 import Int8LinearMethod

from hf_models import build_model


class _CountingInt8(Int8LinearMethod):
    """int8 that records how many real (non-meta) float weights are alive at once."""

    def __init__(self):
        super().__init__()
        self.alive = self.peak = self.dry_runs = 0

    def create_weights(self, layer, *args, **kwargs):
        super().create_weights(layer, *args, **kwargs)
        if layer.weight.device.type == "meta":
            self.dry_runs += 1
        else:
            self.alive += 1
            self.peak = max(self.peak, self.alive)

    def process_weights_after_loading(self, layer):
        super().process_weights_after_loading(layer)
        self.alive -= 1


def test_own_weights_are_calibrated_one_layer_at_a_time():
    torch.manual_seed(0)
    method = _CountingInt8()
    pymllm_fx.quantize(build_model("llama"), method, progress=False)
    assert method.dry_runs == 14  # 7 linears x 2 layers, checked on meta before any real work
    assert method.peak == 1
    assert method.alive == 0
