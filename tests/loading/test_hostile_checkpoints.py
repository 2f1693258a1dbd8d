"""Checkpoints made by a stranger or broken in transit (issue 19): every class below, over every entry
point (``from_pretrained``, ``quantize(weights=)``, ``iter_weights``, the CLI's ``explain`` and
``quantize``), ends in a clear ``CheckpointError``/``ValueError`` that names the file or key, or in a
correct load. Never a read outside the checkpoint's directory, a silent wrong load, a hang, or an
allocation beyond what the checkpoint holds.

How it is checked:
- every case runs under a per-case time limit (SIGALRM) and address-space limit (RLIMIT_AS: the
  process's size now plus 3 GiB), so a regression fails the test instead of hanging or killing CI;
- a canary file outside the checkpoint is the target of every traversal; an audit hook records
  every file the process opens, and no case may open the canary, nor echo its bytes in an error;
- header rules are also fuzzed (hypothesis, fixed seed): random edits of a valid header either
  read back consistently or raise ``CheckpointError``, nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import pymllm_fx
from pymllm_fx.cli import main as cli_main
from pymllm_fx.loading import CheckpointError, iter_weights
from pymllm_fx.loading.safetensors_io import read_header
from hf_models import build_model

transformers = pytest.importorskip("transformers")

# --- the guards -----------------------------------------------------------------------------------

_OPENED: list = []
_WATCHING = [False]


def _audit(event, args):
    if event == "open" and _WATCHING[0] and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # cannot be removed; it records only while a case runs


def _vm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def limited(seconds: int = 60, extra_bytes: int = 3 << 30):
    """The case's time and memory budget; the file opens it makes are recorded."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)

    def on_alarm(*_):
        raise CaseTimeout(f"the case ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.alarm(seconds)
    _OPENED.clear()
    _WATCHING[0] = True
    try:
        yield
    finally:
        _WATCHING[0] = False
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --- the checkpoints ------------------------------------------------------------------------------

CANARY_TEXT = b"CANARY-7f3a9c secret outside the checkpoint, never to be read"


@pytest.fixture
def canary(tmp_path):
    """A file outside the checkpoint directory that no case may open."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.safetensors"
    path.write_bytes(CANARY_TEXT)
    return path


def float_dir(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    build_model("llama", **overrides).save_pretrained(path)
    return path


def quantized_dir(path: Path, fmt: str) -> Path:
    torch.manual_seed(0)
    model = build_model("llama")
    method = {"awq": {"quant_method": "int4", "group_size": 32}, "gptq": {"quant_method": "int4", "group_size": 32},
              "compressed-tensors": {"quant_method": "int4", "group_size": 32},
              "fp8": {"quant_method": "fp8", "weight_strategy": "tensor"}}[fmt]
    pymllm_fx.quantize(model, method, progress=False)
    pymllm_fx.save_quantized(model, path, format=fmt, progress=False)
    return path


def raw_safetensors(header: dict, data: bytes, pad: bool = True) -> bytes:
    """A safetensors file from a header dict (or raw JSON bytes) and its data, written by hand."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def split_file(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


_DELETE = object()


# --- running an entry point -----------------------------------------------------------------------


def run_entry(entry: str, path: Path, method="int8"):
    """One entry point on ``path``: the loaded result, or the exception it raised."""
    if entry == "from_pretrained":
        return pymllm_fx.from_pretrained(path, method=method if _is_float(path) else None, device="cpu", progress=False)
    if entry == "quantize":
        torch.manual_seed(0)
        model = build_model("llama")
        return pymllm_fx.quantize(model, method, weights=path, progress=False)
    if entry == "iter_weights":
        return dict(iter_weights(path))
    if entry in ("cli_explain", "cli_quantize"):
        err = io.StringIO()
        argv = ["explain", str(path)] if entry == "cli_explain" else \
            ["quantize", str(path), "--method", method, "--out", str(path.parent / "cli_out"), "--device", "cpu"]
        if entry == "cli_explain" and _is_float(path):
            argv += ["--method", method]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_main(argv)
        if code != 0:
            raise CheckpointError(err.getvalue())
        return code
    raise ValueError(entry)


def _is_float(path: Path) -> bool:
    """Whether to pass method= (read here only from a plain file: the harness opens nothing a case
    planted)."""
    config = path / "config.json"
    if config.is_symlink() or not config.is_file():
        return True
    try:
        return "quantization_config" not in json.loads(config.read_text())
    except (ValueError, RecursionError, TypeError):
        return True


def expect_refusal(entry: str, path: Path, pattern: str, canary: Path = None, seconds: int = 60, **kw) -> str:
    """The entry point refuses ``path`` with a clear error matching ``pattern``, within the limits, without
    opening the canary or echoing its bytes; returns the message."""
    with limited(seconds):
        with pytest.raises((CheckpointError, ValueError)) as info:
            run_entry(entry, path, **kw)
    message = str(info.value)
    assert not isinstance(info.value, CaseTimeout), message
    import re

    assert re.search(pattern, message, re.S), f"{entry}: {message!r} does not match {pattern!r}"
    if canary is not None:
        assert str(canary) not in _OPENED, f"{entry} opened the canary {canary}"
        assert CANARY_TEXT[:8].decode() not in message
        assert str(int.from_bytes(CANARY_TEXT[:8], "little")) not in message
    return message


FILE_ENTRIES = ["from_pretrained", "quantize", "iter_weights", "cli_explain"]
CONFIG_ENTRIES = ["from_pretrained", "cli_explain", "cli_quantize"]


# --- 1. nothing read outside the directory --------------------------------------------------------


def _index(path: Path, weight_map: dict) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("entry", FILE_ENTRIES)
@pytest.mark.parametrize("how", ["dotdot", "nested_dotdot", "absolute", "symlink_in_index"])
def test_index_cannot_name_a_file_outside(tmp_path, canary, entry, how):
    ckpt = float_dir(tmp_path / "ckpt")
    real = ckpt / "model.safetensors"
    header, _ = split_file(real)
    names = [n for n in header if n != "__metadata__"]
    # a valid shard outside: if it were read, its tensors would end up in the model
    os.replace(real, canary.parent / "model-00001-of-00001.safetensors")
    target = {"dotdot": "../outside/model-00001-of-00001.safetensors",
              "nested_dotdot": "sub/../../outside/model-00001-of-00001.safetensors",
              "absolute": str(canary.parent / "model-00001-of-00001.safetensors"),
              "symlink_in_index": "model-00001-of-00001.safetensors"}[how]
    if how == "symlink_in_index":
        (ckpt / target).symlink_to(canary.parent / "model-00001-of-00001.safetensors")
    (ckpt / "sub").mkdir()
    _index(ckpt, {n: target for n in names})
    pattern = "outside the checkpoint directory" if how == "symlink_in_index" else "not a plain relative path"
    expect_refusal(entry, ckpt, pattern, canary)
    assert str(canary.parent / "model-00001-of-00001.safetensors") not in _OPENED


@pytest.mark.parametrize("entry", FILE_ENTRIES)
def test_symlinked_file_pointing_outside_is_refused_unread(tmp_path, canary, entry):
    ckpt = float_dir(tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(canary)  # not a safetensors file: its first 8 bytes must not leak
    expect_refusal(entry, ckpt, "outside the checkpoint directory", canary)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_symlinked_config_pointing_outside_is_refused(tmp_path, canary, name):
    ckpt = float_dir(tmp_path / "ckpt")
    canary.write_text(json.dumps({"model_type": "llama", "secret": CANARY_TEXT.decode()}))
    (ckpt / name).unlink(missing_ok=True)
    (ckpt / name).symlink_to(canary)
    expect_refusal("from_pretrained", ckpt, "outside the checkpoint directory", canary)


def test_hugging_face_hub_snapshot_layout_loads(tmp_path):
    """snapshots/<rev>/<file> -> ../../blobs/<hash>: symlinks into the repo's blobs are allowed."""
    source = float_dir(tmp_path / "source")
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        os.replace(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    with limited():
        model = pymllm_fx.from_pretrained(snapshot, method="int8", device="cpu", progress=False)
    torch.manual_seed(0)
    expected = pymllm_fx.quantize(build_model("llama"), "int8", progress=False)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_hub_snapshot_symlink_outside_the_repo_is_refused(tmp_path, canary):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = float_dir(repo / "snapshots" / "abc123")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(canary)
    expect_refusal("from_pretrained", snapshot, "outside the checkpoint directory", canary)


# --- 2. safetensors' header rules -----------------------------------------------------------------


def _two_tensor_file(path: Path, mutate) -> None:
    a, b = torch.arange(8, dtype=torch.float32), torch.arange(8, 16, dtype=torch.float32)
    header = {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
              "b": {"dtype": "F32", "shape": [8], "data_offsets": [32, 64]}}
    data = a.numpy().tobytes() + b.numpy().tobytes()
    header, data = mutate(header, data)
    path.write_bytes(raw_safetensors(header, data))


HEADER_CASES = {
    "overlap": (lambda h, d: ({**h, "b": {**h["b"], "data_offsets": [0, 32]}}, d[:32]), "overlaps"),
    "gap": (lambda h, d: ({**h, "b": {**h["b"], "data_offsets": [40, 72]}}, d + bytes(8)), "gap"),
    "trailing_bytes": (lambda h, d: (h, d + bytes(16)), "bytes follow the last tensor"),
    "size_mismatch": (lambda h, d: ({**h, "b": {**h["b"], "shape": [7]}}, d), "need 28"),
    "negative_dim": (lambda h, d: ({**h, "b": {**h["b"], "shape": [-8]}}, d), "non-negative integers"),
    "float_dim": (lambda h, d: ({**h, "b": {**h["b"], "shape": [8.0]}}, d), "non-negative integers"),
    "string_dim": (lambda h, d: ({**h, "b": {**h["b"], "shape": ["8"]}}, d), "non-negative integers"),
    "bool_offset": (lambda h, d: ({**h, "a": {**h["a"], "data_offsets": [False, 32]}}, d), "data_offsets"),
    "reversed_offsets": (lambda h, d: ({**h, "b": {**h["b"], "data_offsets": [64, 32]}}, d), "begin <= end"),
    "unknown_dtype": (lambda h, d: ({**h, "b": {**h["b"], "dtype": "Q4"}}, d), "dtype 'Q4'"),
    "bad_metadata": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d), "__metadata__"),
    "not_object": (lambda h, d: ([1, 2], d), "start with '{'"),
    "nan_literal": (lambda h, d: (json.dumps(h).replace("[0, 32]", "[0, NaN]").encode(), d), "NaN is not a JSON number"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_rules(tmp_path, case):
    mutate, pattern = HEADER_CASES[case]
    path = tmp_path / "model.safetensors"
    _two_tensor_file(path, mutate)
    with limited(20):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file.*" + pattern):
            list(iter_weights(path))


def test_duplicate_names_in_one_header_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    text = (b'{"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, '
            b'"a": {"dtype": "F32", "shape": [8], "data_offsets": [32, 64]}}')
    path.write_bytes(raw_safetensors(text, bytes(64)))
    with pytest.raises(CheckpointError, match="'a' appears more than once"):
        list(iter_weights(path))


def test_a_name_in_two_shards_is_refused(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, str(tmp_path / "one.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    _index(tmp_path, {"a": "one.safetensors", "b": "one.safetensors"})  # two.safetensors is not listed for a...
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "two.safetensors",
                                                                                       "b": "one.safetensors"}}))
    with pytest.raises(CheckpointError, match="does not list for it"):  # ...so one.safetensors' 'a' is refused
        list(iter_weights(tmp_path))


def test_overlapping_tensors_in_a_real_model_never_load(tmp_path):
    """The worst case of class 2: a header whose q_proj points at k_proj's bytes (same shape) would load
    silently different weights; it is refused."""
    ckpt = float_dir(tmp_path / "ckpt")
    header, data = split_file(ckpt / "model.safetensors")
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    header[q]["data_offsets"] = list(header[k]["data_offsets"])
    (ckpt / "model.safetensors").write_bytes(raw_safetensors(header, data))
    for entry in FILE_ENTRIES:
        expect_refusal(entry, ckpt, "overlaps|gap")


def test_huge_header_length_does_not_allocate(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with limited(10, extra_bytes=1 << 30):
        with pytest.raises(CheckpointError, match="header length field exceeds"):
            list(iter_weights(path))


HEADER_TEXT = json.dumps({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                          "b": {"dtype": "I8", "shape": [4], "data_offsets": [24, 28]},
                          "__metadata__": {"format": "pt"}}).encode()


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, len(HEADER_TEXT) - 1), st.binary(min_size=0, max_size=3),
                                st.integers(0, 3)), min_size=1, max_size=4))
def test_fuzzed_headers_read_consistently_or_raise_checkpoint_error(tmp_path, edits):
    text = bytearray(HEADER_TEXT)
    for at, new, drop in edits:
        at = min(at, len(text))
        text[at:at + drop] = new
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw_safetensors(bytes(text), bytes(range(28)), pad=False))
    try:
        with limited(10, extra_bytes=1 << 30):
            header = read_header(path)
    except CheckpointError:
        return
    spans = sorted((info.start, info.end) for info in header.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end == start  # contiguous, no overlap
    for info in header.values():
        assert info.nbytes == torch.Size(info.shape).numel() * info.dtype.itemsize


# --- 3. sizes checked before any allocation -------------------------------------------------------


@pytest.mark.parametrize("entry", CONFIG_ENTRIES)
@pytest.mark.parametrize("key, value, pattern", [
    ("hidden_size", 2**17, "expected shape .*131072.* found"),
    ("intermediate_size", 10**12, "expected shape .*1000000000000.* found"),
    ("vocab_size", 2**28, "expected shape .*268435456.* found"),
    ("num_hidden_layers", 5000, "num_hidden_layers is 5000 but the checkpoint's tensors hold at most 2 layers"),
])
def test_config_sizes_are_held_against_the_checkpoint_before_allocating(tmp_path, entry, key, value, pattern):
    ckpt = float_dir(tmp_path / "ckpt")
    edit_config(ckpt, **{key: value})
    expect_refusal(entry, ckpt, pattern, seconds=60)


def test_quantized_checkpoint_sizes_are_held_against_the_checkpoint(tmp_path):
    ckpt = quantized_dir(tmp_path / "ckpt", "awq")
    edit_config(ckpt, intermediate_size=2**30)
    expect_refusal("from_pretrained", ckpt, "expected shape .* found", seconds=60)


# --- 4. only regular files ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", FILE_ENTRIES)
def test_named_pipe_as_the_checkpoint_file_is_refused_not_waited_on(tmp_path, entry):
    ckpt = float_dir(tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    expect_refusal(entry, ckpt, "not a regular file \\(a named pipe\\)", seconds=20)


def test_named_pipe_beside_the_model_is_ignored(tmp_path):
    ckpt = float_dir(tmp_path / "ckpt")
    os.mkfifo(ckpt / "other.safetensors")
    os.mkfifo(ckpt / "notes.txt")
    with limited(60):
        model = pymllm_fx.from_pretrained(ckpt, method="int8", device="cpu", progress=False)
    assert isinstance(model, torch.nn.Module)


def test_named_pipe_as_config_is_refused(tmp_path):
    ckpt = float_dir(tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    expect_refusal("from_pretrained", ckpt, "config.json: not a regular file", seconds=20)


# --- 5. nonsense numbers --------------------------------------------------------------------------


def test_nan_epsilon_in_config_is_refused(tmp_path):
    ckpt = float_dir(tmp_path / "ckpt")
    text = (ckpt / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')
    assert "NaN" in text
    (ckpt / "config.json").write_text(text)
    for entry in CONFIG_ENTRIES:
        expect_refusal(entry, ckpt, "config.json: NaN is not a JSON number")


@pytest.mark.parametrize("value", [-1e-6, 0, 1e999])
def test_epsilon_must_be_a_positive_finite_number(tmp_path, value):
    ckpt = float_dir(tmp_path / "ckpt")
    edit_config(ckpt, rms_norm_eps=value if value != 1e999 else 0)
    if value == 1e999:
        text = (ckpt / "config.json").read_text().replace('"rms_norm_eps": 0', '"rms_norm_eps": 1e999')
        (ckpt / "config.json").write_text(text)
        expect_refusal("from_pretrained", ckpt, "out of range for a float")
    else:
        expect_refusal("from_pretrained", ckpt, "'rms_norm_eps' is .*positive number")


def test_fp8_weight_holding_the_nan_code_is_refused(tmp_path):
    ckpt = quantized_dir(tmp_path / "ckpt", "fp8")
    header, data = split_file(ckpt / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    assert header[name]["dtype"] == "F8_E4M3"
    start = header[name]["data_offsets"][0]
    data = data[:start + 5] + b"\x7f" + data[start + 6:]
    (ckpt / "model.safetensors").write_bytes(raw_safetensors(header, data))
    expect_refusal("from_pretrained", ckpt, r"model\.layers\.1\.mlp\.up_proj.*e4m3 NaN code")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_float_weight_quantized_on_load_is_refused(tmp_path, bad):
    ckpt = float_dir(tmp_path / "ckpt")
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight"][3, 5] = bad
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    for entry in ("from_pretrained", "quantize"):
        expect_refusal(entry, ckpt, r"model\.layers\.0\.mlp\.down_proj.*'weight' holds NaN or Inf", method="int4")


def test_non_finite_norm_weight_is_refused(tmp_path):
    ckpt = float_dir(tmp_path / "ckpt")
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    expect_refusal("from_pretrained", ckpt, r"model\.norm.*'weight' holds NaN or Inf")


def test_awq_scales_that_overflow_the_dtype_are_refused(tmp_path):
    ckpt = quantized_dir(tmp_path / "ckpt", "awq")
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.scales"
    state[name] = state[name].float()
    state[name][0, 0] = 3e38
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    expect_refusal("from_pretrained", ckpt, r"q_proj.*scales up to 3e\+38 .* exceed the largest")


def test_modules_to_not_convert_as_a_string_is_one_name(tmp_path):
    ckpt = quantized_dir(tmp_path / "ckpt", "awq")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = "lm_head"
    (ckpt / "config.json").write_text(json.dumps(config))
    with limited():
        model = pymllm_fx.from_pretrained(ckpt, device="cpu", progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert hasattr(layer, "qweight"), "a string matched every layer as characters"


# --- 6. every error names the file, the key and the form ------------------------------------------


def _quant_config(ckpt: Path, **changes):
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"].update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fmt, change, pattern", [
    ("awq", {"group_size": "Infinity"}, "Infinity is not a JSON number"),
    ("awq", {"bits": [4]}, r"quantization_config\['bits'\] must be an integer, found list \[4\]"),
    ("gptq", {"sym": "yes"}, r"quantization_config\['sym'\] must be true or false"),
    ("gptq", {"dynamic": {"-:model.layers.(": {}}}, r"not a valid regular expression"),
    ("compressed-tensors", {"ignore": ["re:lm_head(("]}, r"not a valid regular expression"),
    ("awq", {"modules_to_not_convert": {"a": 1}}, "must be a list of module names"),
])
def test_bad_quantization_config_values_get_a_clear_error(tmp_path, fmt, change, pattern):
    ckpt = quantized_dir(tmp_path / "ckpt", fmt)
    if change.get("group_size") == "Infinity":
        text = (ckpt / "config.json").read_text()
        (ckpt / "config.json").write_text(text.replace('"group_size": 32', '"group_size": Infinity'))
    else:
        _quant_config(ckpt, **change)
    for entry in CONFIG_ENTRIES[:2]:
        message = expect_refusal(entry, ckpt, pattern)
        assert "config.json" in message


def test_weight_map_of_the_wrong_form(tmp_path):
    ckpt = float_dir(tmp_path / "ckpt")
    _index(ckpt, {})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [["a", "model.safetensors"]]}))
    for entry in FILE_ENTRIES:
        expect_refusal(entry, ckpt, r"index\.json: weight_map: expected an object of tensor name -> shard file, found list")


def test_deeply_nested_json_is_refused_clearly(tmp_path):
    ckpt = float_dir(tmp_path / "ckpt")
    (ckpt / "config.json").write_text("[" * 100000 + "]" * 100000)
    expect_refusal("from_pretrained", ckpt, "config.json: JSON nested too deeply")


def test_architecture_that_is_not_a_model_class(tmp_path):
    ckpt = float_dir(tmp_path / "ckpt")
    edit_config(ckpt, architectures=["AutoTokenizer"])
    for entry in CONFIG_ENTRIES[:2]:
        expect_refusal(entry, ckpt, "'AutoTokenizer', which is not a transformers model class")


@pytest.mark.parametrize("change, pattern", [
    ({"hidden_size": "64"}, "'hidden_size' must be a positive integer, found '64'"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer"),
    ({"model_type": "no-such-model"}, "model_type 'no-such-model' is not an architecture"),
    ({"architectures": "LlamaForCausalLM"}, "'architectures' must be a list of class names"),
    ({"hidden_size": 66}, "transformers cannot build a llama config from it .*not a multiple"),
    ({"hidden_act": "nope"}, "transformers cannot build LlamaForCausalLM from its config.json"),
    ({"quantization_config": [1]}, "quantization_config must be an object with a string 'quant_method'"),
    ({"torch_dtype": "int8", "dtype": "int8"}, "is not a float dtype"),
])
def test_config_values_of_the_wrong_form(tmp_path, change, pattern):
    ckpt = float_dir(tmp_path / "ckpt")
    edit_config(ckpt, **change)
    expect_refusal("from_pretrained", ckpt, pattern)


def test_a_valid_checkpoint_still_loads_under_the_guards(tmp_path):
    """The guards' own control: the unmodified checkpoints load through every entry point."""
    ckpt = float_dir(tmp_path / "ckpt")
    for entry in FILE_ENTRIES + ["cli_quantize"]:
        with limited(120):
            run_entry(entry, ckpt)
    for fmt in ("awq", "gptq", "compressed-tensors", "fp8"):
        with limited(120):
            run_entry("from_pretrained", quantized_dir(tmp_path / fmt, fmt))


@pytest.mark.parametrize("fmt", ["awq", "gptq", "compressed-tensors", "fp8"])
def test_each_checkpoint_format_is_held_to_the_same_rules(tmp_path, canary, fmt):
    """The file-level classes do not depend on the format; checked once per format anyway."""
    ckpt = quantized_dir(tmp_path / "ckpt", fmt)
    header, data = split_file(ckpt / "model.safetensors")
    names = sorted(n for n in header if n != "__metadata__")
    # overlapping spans: the second tensor (by offset) pointed at the first one's bytes
    first, second = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    bad = json.loads(json.dumps(header))
    bad[second]["data_offsets"] = [0, bad[second]["data_offsets"][1] - bad[second]["data_offsets"][0]]
    (ckpt / "model.safetensors").write_bytes(raw_safetensors(bad, data))
    expect_refusal("from_pretrained", ckpt, "overlaps|gap|need")
    # a symlink out of the directory
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(canary)
    expect_refusal("from_pretrained", ckpt, "outside the checkpoint directory", canary)
    # a named pipe
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    expect_refusal("from_pretrained", ckpt, "named pipe", seconds=20)
    # a config far larger than the tensors
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").write_bytes(raw_safetensors(header, data))
    edit_config(ckpt, hidden_size=2**16)
    expect_refusal("from_pretrained", ckpt, "expected shape .* found|cannot build")
