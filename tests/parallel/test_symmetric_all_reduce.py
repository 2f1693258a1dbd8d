"""The symmetric-memory all-reduce (``pymllm_fx.use_symmetric_memory``): its refusals and its shape
contract on a CPU; on 2 GPUs (NCCL, skipped without them) the same logits as NCCL, one graph, and
CUDA-graph decode with the tokens of NCCL."""

from __future__ import annotations


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pymllm_fx
from pymllm_fx.evaluation import GreedyDecoder
from pymllm_fx.layers.all_reduce import AllReduce, _qualifies, use_symmetric_memory
from pymllm_fx.layers.linear import ReplicatedLinear, RowParallelLinear
from checks import rel_err, spawn_ranks, two_gpus

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=256, head_dim=16)
INT4 = {"quant_method": "int4", "group_size": 32}


def test_refused_without_tensor_parallel_layers_or_cuda():
    with pytest.raises(ValueError, match="no tensor-parallel layers"):
        use_symmetric_memory(torch.nn.Sequential(ReplicatedLinear(8, 8)))
    row = RowParallelLinear(16, 8, tp_rank=0, tp_size=2, process_group=object())  # a group it never uses
    with pytest.raises(ValueError, match="must be one of"):
        use_symmetric_memory(row, "multimem")
    with pytest.raises(ValueError, match=r"one CUDA device per rank, found \['cpu'\]"):
        use_symmetric_memory(row, "one_shot")
    assert row.all_reduce_with is None  # left as it was
    assert use_symmetric_memory(row, "nccl") is row and row.all_reduce_with is None


def test_only_small_cuda_messages_of_its_dtypes_qualify():
    with FakeTensorMode():
        x = torch.empty(1, 4096, dtype=torch.bfloat16, device="cpu")
        assert not _qualifies(x, 1 << 20)  # not on CUDA
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    if cuda is None:
        return
    assert _qualifies(torch.empty(1, 4096, dtype=torch.bfloat16, device=cuda), 1 << 20)
    assert not _qualifies(torch.empty(2048, 4096, dtype=torch.bfloat16, device=cuda), 1 << 20)  # prefill: NCCL
    assert not _qualifies(torch.empty(1, 4096, dtype=torch.float16, device=cuda), 1 << 20)  # no fp16 kernel
    assert not _qualifies(torch.empty(1, 3, dtype=torch.bfloat16, device=cuda), 1 << 20)  # not whole words
    assert not _qualifies(torch.empty(1, 4096, device=cuda, requires_grad=True), 1 << 20)  # no backward


def test_fake_op_keeps_the_shape_and_dtype():
    with FakeTensorMode():
        x = torch.empty(2, 3, 64, dtype=torch.bfloat16)
        out = torch.ops.pymllm_fx.symm_mem_all_reduce(x, "0", "one_shot")
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert AllReduce().algorithm == "nccl"


def build():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()


def greedy_tokens(model, prompt: torch.Tensor, compile: bool, tokens: int = 6) -> torch.Tensor:
    """Greedy tokens, eager or from one fullgraph step under CUDA graphs (none of them skipped)."""
    from torch._dynamo.utils import counters

    counters.clear()
    decoder = GreedyDecoder(model, max_cache_len=prompt.shape[1] + tokens, compile=compile,
                            mode="reduce-overhead" if compile else None)
    out = decoder.generate(prompt, tokens)[0].cpu()
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, "CUDA graphs were skipped"
    torch._dynamo.reset()
    return out


def _body(rank: int, world: int, device: torch.device) -> None:
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    model = pymllm_fx.quantize(build().to(device), INT4, progress=False)
    with torch.no_grad():
        nccl_logits = model(ids).logits
    nccl_tokens = greedy_tokens(model, ids[:1], compile=False)  # eager NCCL (one compile fewer)
    for algorithm in ("one_shot", "two_shot"):
        use_symmetric_memory(model, algorithm, max_bytes=64 << 10)
        torch._dynamo.reset()
        with torch.no_grad():  # eager: the op itself; a 2x7x128 float32 message is 7 KiB
            err = rel_err(model(ids).logits, nccl_logits)
        assert err <= 1e-5, f"{algorithm}: logits differ from NCCL's by {err:.2e}"
        with torch.no_grad():  # the op has no backward: with gradients wanted the layers keep NCCL
            explained = torch._dynamo.explain(model)(ids)
        assert explained.graph_break_count == 0, explained.break_reasons
        code = "\n".join(str(g.graph) for g in explained.graphs)
        assert "symm_mem_all_reduce" in code and "all_reduce" not in code.replace("symm_mem_all_reduce", ""), code
        torch._dynamo.reset()
        tokens = greedy_tokens(model, ids[:1], compile=True)
        assert torch.equal(tokens, nccl_tokens), f"{algorithm}: {tokens.tolist()} vs NCCL {nccl_tokens.tolist()}"
    use_symmetric_memory(model, "nccl")
    assert all(m.all_reduce_with is None for m in model.modules() if isinstance(m, RowParallelLinear))


@pytest.mark.skipif(not two_gpus(), reason="NCCL tests need 2 CUDA GPUs (one process per GPU)")
def test_symmetric_memory_all_reduce_matches_nccl_under_compile_and_cuda_graphs():
    spawn_ranks(_body, 2, "nccl")
