"""GPU timing shared by the benchmarks: CUDA-graph replay over enough weight copies to defeat L2,
and the measured copy bandwidth that turns bytes into a floor."""

import math
import statistics

import torch

L2_DEFEAT_BYTES = 256 << 20  # several times the H100's 50 MB L2


def copies_for(bytes_per_copy: int, at_least: int = 2, at_most: int = 64) -> int:
    """How many weight copies to cycle through so that one pass over them overflows L2."""
    return max(at_least, min(at_most, math.ceil(L2_DEFEAT_BYTES / max(bytes_per_copy, 1))))


def graph_time_us(calls: list, replays: int = 15) -> float:
    """Median microseconds per call of ``calls`` (one per weight copy), captured in one CUDA graph.

    The graph removes launch gaps; cycling the copies makes every call read its weights from HBM.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compilation, autotuning, cuBLAS handles
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9
