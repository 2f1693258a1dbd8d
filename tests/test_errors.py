"""Bad input to quantize(): each gives a clear error and leaves the model exactly as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import pymllm_fx
from pymllm_fx.methods.int4 import Int4LinearMethod

transformers = pytest.importorskip("transformers")

from hf_models import build_model  # noqa: E402


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return build_model("llama")


class Snapshot:
    """Everything quantize() could change: state_dict keys and values, tensor identity, module types."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
        self.modules = {n: (type(m), id(m)) for n, m in model.named_modules()}

    def assert_unchanged(self) -> None:
        now = self.model.state_dict(keep_vars=True)
        assert list(now) == list(self.state)
        for name, value in now.items():
            assert value.dtype == self.state[name].dtype and torch.equal(value.detach(), self.state[name]), name
            assert id(value) == self.ids[name], f"{name} was replaced"
        assert {n: (type(m), id(m)) for n, m in self.model.named_modules()} == self.modules


@pytest.fixture
def llama():
    model = tiny_llama()
    snap = Snapshot(model)
    yield model
    snap.assert_unchanged()


@pytest.fixture
def checkpoint_state():
    """The tiny Llama's own tensors, as a safetensors file would hold them."""
    return {k: v.detach().clone().contiguous() for k, v in tiny_llama().state_dict().items()}


@pytest.mark.parametrize("name", ["int3", "INT5", "gptq4", ""])
def test_unknown_method_lists_valid_names(llama, name):
    with pytest.raises(ValueError, match="awq, compressed-tensors, fp8, gptq, int4, int8, none") as err:
        pymllm_fx.quantize(llama, name, progress=False)
    assert repr(name) in str(err.value)


def test_unknown_method_in_quantization_config(llama):
    with pytest.raises(ValueError, match="awq, compressed-tensors, fp8, gptq, int4, int8, none"):
        pymllm_fx.quantize(llama, {"quant_method": "awq4"}, progress=False)


@pytest.mark.parametrize("name", ["awq", "gptq"])
def test_checkpoint_methods_need_weights(llama, name):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match=f"{name}.*weights=") as err:
        pymllm_fx.quantize(llama, name, progress=False)
    assert "checkpoint" in str(err.value)
    after = llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _quantize_from(model, state, tmp_path, method="int8"):
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return pymllm_fx.quantize(model, method, weights=path, progress=False)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_checkpoint_wrong_shape_names_tensor_and_shapes(llama, checkpoint_state, tmp_path, method):
    checkpoint_state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    with pytest.raises(ValueError) as err:
        _quantize_from(llama, checkpoint_state, tmp_path, {"quant_method": "int4", "group_size": 32}
                       if method == "int4" else method)
    message = str(err.value)
    assert isinstance(err.value, pymllm_fx.CheckpointError)
    assert "model.layers.0.mlp.up_proj.weight" in message
    assert "expected" in message and "found" in message
    assert "(128, 64)" in message and "(100, 64)" in message
    assert "unchanged" in message


def test_checkpoint_wrong_shape_of_non_linear_tensor(llama, checkpoint_state, tmp_path):
    checkpoint_state["model.norm.weight"] = torch.ones(65)
    with pytest.raises(pymllm_fx.CheckpointError, match=r"model\.norm\.weight") as err:
        _quantize_from(llama, checkpoint_state, tmp_path)
    assert "(64,)" in str(err.value) and "(65,)" in str(err.value)


@pytest.mark.parametrize("missing", ["model.layers.1.self_attn.v_proj.weight", "model.layers.0.input_layernorm.weight",
                                     "lm_head.weight"])
def test_checkpoint_missing_tensor(llama, checkpoint_state, tmp_path, missing):
    del checkpoint_state[missing]
    with pytest.raises(pymllm_fx.CheckpointError, match="no checkpoint tensor filled") as err:
        _quantize_from(llama, checkpoint_state, tmp_path)
    assert missing in str(err.value)


def test_checkpoint_unexpected_tensor(llama, checkpoint_state, tmp_path):
    checkpoint_state["model.layers.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(pymllm_fx.CheckpointError, match="no parameter takes") as err:
        _quantize_from(llama, checkpoint_state, tmp_path)
    assert "model.layers.1.extra.weight" in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 1e9])
def test_truncated_safetensors_file(llama, checkpoint_state, tmp_path, keep):
    full = tmp_path / "full.safetensors"
    save_file(checkpoint_state, str(full))
    data = full.read_bytes()
    cut = tmp_path / "cut" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(pymllm_fx.CheckpointError, match="truncated or corrupt") as err:
        pymllm_fx.quantize(llama, "int8", weights=cut, progress=False)
    assert str(cut) in str(err.value)


def test_pickle_only_directory_is_refused(llama, checkpoint_state, tmp_path):
    torch.save(checkpoint_state, tmp_path / "pytorch_model.bin")
    with pytest.raises(pymllm_fx.CheckpointError, match="pickle") as err:
        pymllm_fx.quantize(llama, "int8", weights=tmp_path, progress=False)
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)


def test_missing_weights_path(llama, tmp_path):
    with pytest.raises(pymllm_fx.CheckpointError, match="no such file"):
        pymllm_fx.quantize(llama, "int8", weights=tmp_path / "nope", progress=False)


class IntOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False)
        self.register_buffer("b", torch.arange(4))


def test_non_float_model_is_a_type_error():
    model = IntOnly()
    snap = Snapshot(model)
    with pytest.raises(TypeError, match="floating") as err:
        pymllm_fx.quantize(model, "int8", progress=False)
    assert "int32" in str(err.value)
    snap.assert_unchanged()


@pytest.mark.filterwarnings("ignore:pymllm_fx. graph capture")
@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.LayerNorm(8), nn.ReLU()),
                                  lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())])
def test_model_without_linears_is_a_value_error(make):
    torch.manual_seed(0)
    model = make()
    snap = Snapshot(model)
    with pytest.raises(ValueError, match="no linear layers"):
        pymllm_fx.quantize(model, "int8", progress=False)
    snap.assert_unchanged()


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        pymllm_fx.quantize({"weight": torch.zeros(2, 2)}, "int8", progress=False)


class OddWidth(nn.Module):
    """One layer int4 cannot pack: ``narrow`` takes 12 input features (not a multiple of 8)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.mid = nn.Linear(32, 12)
        self.narrow = nn.Linear(12, 8)

    def forward(self, x):
        return self.narrow(torch.relu(self.mid(torch.relu(self.inp(x)))))


@pytest.mark.parametrize("example", [True, False], ids=["graph", "module-walk"])
def test_method_create_weights_failure_names_layer_when_strict(example):
    torch.manual_seed(0)
    model = OddWidth()
    snap = Snapshot(model)
    x = torch.randn(2, 64)
    ref = model(x)
    kwargs = {"example_inputs": (x,)} if example else {}  # without inputs, find_linears walks the modules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as err:
            pymllm_fx.quantize(model, Int4LinearMethod(group_size=32), progress=False, strict=True, **kwargs)
        message = str(err.value)
        assert "narrow" in message and "in_features=12" in message and "multiple of 8" in message
        snap.assert_unchanged()
        assert torch.equal(model(x), ref)
        # skipping that layer makes it work
        pymllm_fx.quantize(model, Int4LinearMethod(group_size=32), progress=False, skip=["narrow"], strict=True, **kwargs)
    assert type(model.narrow) is nn.Linear and type(model.inp) is not nn.Linear


@pytest.mark.parametrize("example", [True, False], ids=["graph", "module-walk"])
def test_a_layer_the_method_cannot_take_stays_float_with_a_notice(example):
    """Not strict (the default): the odd layer stays float, the rest is quantized, a warning names
    it and explain() says why."""
    torch.manual_seed(0)
    model = OddWidth()
    x = torch.randn(2, 64)
    kwargs = {"example_inputs": (x,)} if example else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pymllm_fx.quantize(model, Int4LinearMethod(group_size=32), progress=False, **kwargs)
    notices = [str(w.message) for w in caught if "stay float" in str(w.message)]
    assert len(notices) == 1 and "narrow" in notices[0]
    assert type(model.narrow) is nn.Linear and type(model.inp) is not nn.Linear
    rows = {row.path: row for row in pymllm_fx.explain(model, file=None).rows}
    assert rows["narrow"].method == "-" and "multiple of 8" in rows["narrow"].detail
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("skip", [3, [3], [None], object()], ids=["int", "list-of-int", "list-of-None", "object"])
def test_bad_skip_type_is_a_clear_error(llama, skip):
    with pytest.raises((TypeError, ValueError)) as err:
        pymllm_fx.quantize(llama, "int8", skip=skip, progress=False)
    assert "skip" in str(err.value), f"unclear error for skip={skip!r}: {err.value!r}"


@pytest.mark.parametrize("pattern, path", [("lm_head", "lm_head"),
                                           ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj")])
def test_skip_as_bare_string_is_one_pattern_or_an_error(pattern, path):
    """skip="lm_head" must not be read as the patterns "l", "m", "_", ... (which skip nothing)."""
    model = tiny_llama()
    snap = Snapshot(model)
    try:
        pymllm_fx.quantize(model, "int8", skip=pattern, progress=False)
    except (TypeError, ValueError) as err:
        assert "skip" in str(err)
        snap.assert_unchanged()
        return
    assert type(model.get_submodule(path)) is nn.Linear, f"skip={pattern!r} was ignored: {path} got quantized"


def test_skip_everything_is_a_value_error(llama):
    with pytest.raises(ValueError, match="skip"):
        pymllm_fx.quantize(llama, "int8", skip=["*"], progress=False)


def test_skip_predicate_error_propagates(llama):
    def predicate(site):
        if site.path.endswith("down_proj"):
            raise RuntimeError("predicate broke")
        return False

    with pytest.raises(RuntimeError, match="predicate broke"):
        pymllm_fx.quantize(llama, "int8", skip=predicate, progress=False)


@pytest.mark.parametrize("config", [{"quant_method": "int4", "group_size": 48},
                                    {"quant_method": "int4", "bits": 3},
                                    {"quant_method": "int8", "group_sise": 32},
                                    {"group_size": 32}])
def test_bad_quantization_config(llama, config):
    with pytest.raises(ValueError):
        pymllm_fx.quantize(llama, config, progress=False)
