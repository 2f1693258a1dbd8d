"""Compile the int4 tensor-core kernel for Hopper (sm_90) without a GPU and count what the compiled
code does per K step: tensor-core instructions, shared-memory traffic, layout conversions, barriers,
and whether Triton software-pipelined the loop (cp.async). Triton's wheel ships ptxas, so this runs
on the CPU machine; it reads the code, it times nothing.

    python benchmarks/compiled_w4a16.py BLOCK_M=8,BLOCK_N=32,BLOCK_K=256,SPLIT=4
    python benchmarks/compiled_w4a16.py BLOCK_M=32,BLOCK_N=128,SPLIT_K=1,num_warps=8 --dump /tmp/k

``--dump PREFIX`` writes PREFIX.ttgir and PREFIX.ptx. Constexprs not given take the op's defaults
(group 128 with zero points, bf16 activations, no bias, one K slice per program); BLOCK_K is cut to
the group size, as the launcher does.
"""

import argparse
import ast

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pymllm_fx.kernels import w4a16

PTX_OPS = ("mma.sync", "wgmma.mma_async", "ldmatrix", "st.shared", "ld.shared", "lop3", "cvt", "ld.global",
           "cp.async", "shfl", "bar.sync")


def _compile(kernel, constexprs: dict, options: dict, pointers: dict, capability: int):
    """``kernel`` for sm_``capability``: arguments named in ``constexprs`` are constants, ``*_ptr``
    arguments pointers (bf16 unless ``pointers`` says otherwise), the rest int32. Alignment as the JIT
    infers it at the Llama shapes: every pointer 16-byte aligned, every int but M (the activation
    rows) a multiple of 16; without it every load compiles to 2-byte scalar loads."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*bf16")
        else:
            signature[name] = "i32"
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, kind in signature.items() if kind != "constexpr" and name != "M"}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def compile_gemv(config: dict, capability: int = 90):
    """The decode GEMV (``_w4a16_gemv_kernel``), and the weights a thread takes a step."""
    config = dict(config)
    options = dict(num_warps=config.pop("num_warps", 4), num_stages=config.pop("num_stages", 3))
    constexprs = dict(GROUP=128, HAS_ZEROS=True, HAS_BIAS=False, ASM=True, PREFETCH=True, BLOCK_N=16, TILES=16)
    constexprs.update(config)
    compiled = _compile(w4a16._w4a16_gemv_kernel, constexprs, options, {"q_ptr": "*i32"}, capability)
    weights = constexprs["BLOCK_N"] * constexprs["TILES"] * 64 / (32 * options["num_warps"])
    return compiled, weights


def compile_kernel(config: dict, capability: int = 90):
    """The tensor-core kernel (``_w4a16_kernel``), its config fitted as the launcher fits it."""
    config = dict(config)
    options = dict(num_warps=config.pop("num_warps", 4), num_stages=config.pop("num_stages", 3))
    constexprs = dict(GROUP=128, HAS_ZEROS=True, HAS_BIAS=False, SCALE_IN=False, ASM=True, DOT_F32=False, SPLIT=1,
                      SPLIT_K=1, BLOCK_M=8, BLOCK_N=64, BLOCK_K=128)
    constexprs.update(config)
    if constexprs["GROUP"] >= 64:  # one step lies in one group
        constexprs["BLOCK_K"] = min(constexprs["BLOCK_K"], constexprs["GROUP"])
    if constexprs["SPLIT"] > 1:
        options["num_warps"] = constexprs["SPLIT"]
    pointers = {"q_ptr": "*i32", "out_ptr": "*bf16" if constexprs["SPLIT_K"] == 1 else "*fp32"}
    return _compile(w4a16._w4a16_kernel, constexprs, options, pointers, capability)


def _run_tool(tool: str, args: list, cubin: bytes) -> str:
    """The stdout of one of the CUDA tools Triton's wheel ships (nvdisasm, cuobjdump) on ``cubin``."""
    import os
    import subprocess
    import tempfile

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([path, *args, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> str:
    return _run_tool("nvdisasm", ["-c", "-hex"], cubin)


def resource_usage(cubin: bytes) -> str:
    """Registers a thread and stack bytes (spills), from cuobjdump."""
    import re

    text = _run_tool("cuobjdump", ["--dump-resource-usage"], cubin)
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return f"{regs.group(1) if regs else '?'} registers a thread, stack {stack.group(1) if stack else '?'} B"


def innermost_loop(sass: str) -> list:
    """The instructions (opcodes with operands) of the longest backward-branch loop in the SASS."""
    import re

    lines = []
    labels = {}
    for raw in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", raw)
        if label:
            labels[label.group(1)] = len(lines)
            continue
        inst = re.match(r"\s*/\*[0-9a-f]+\*/\s*(.*?);", raw)
        if inst:
            lines.append(re.sub(r"^@!?U?P\w+\s+", "", inst.group(1).strip()))
    best = []
    for end, text in enumerate(lines):
        target = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", text)
        if target and target.group(1) in labels and labels[target.group(1)] <= end:
            body = lines[labels[target.group(1)]:end + 1]
            best = body if len(body) > len(best) else best
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", help="NAME=VALUE,...: the kernel's constexprs, num_warps, num_stages")
    ap.add_argument("--dump", default=None, help="write PREFIX.ttgir, PREFIX.ptx and PREFIX.sass")
    ap.add_argument("--gemv", action="store_true", help="the decode GEMV instead (BLOCK_N, TILES, PREFETCH, ...)")
    args = ap.parse_args()
    config = {}
    for item in args.config.split(","):
        name, _, value = item.partition("=")
        config[name.strip()] = ast.literal_eval(value.strip())
    if args.gemv:
        compiled, weights = compile_gemv(config)
    else:
        compiled = compile_kernel(config)
        c = dict(config)
        split = c.get("SPLIT", 1)
        weights = c.get("BLOCK_N", 64) * min(c.get("BLOCK_K", 128), 128) * split / (
            32 * (split if split > 1 else c.get("num_warps", 4)))
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    sass = disassemble(compiled.asm["cubin"])
    if args.dump:
        for ext, text in (("ttgir", ttgir), ("ptx", ptx), ("sass", sass)):
            with open(f"{args.dump}.{ext}", "w") as f:
                f.write(text)
    loop = ttgir[ttgir.find("scf.for"):ttgir.find("scf.yield")]
    print(f"{resource_usage(compiled.asm['cubin'])}; shared memory {compiled.metadata.shared} B; in the K loop: {loop.count('ttg.local_alloc')} tensors "
          f"through shared memory, {loop.count('tt.load')} global loads, {loop.count('tt.dot')} dots")
    print("PTX (whole kernel): " + ", ".join(f"{op} {ptx.count(op)}" for op in PTX_OPS))
    body = innermost_loop(sass)
    kinds = {}
    for line in body:
        op = line.split()[0].split(".")[0]
        kinds[op] = kinds.get(op, 0) + 1
    top = ", ".join(f"{op} {n}" for op, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:12])
    print(f"SASS, the longest loop: {len(body)} instructions a step, {weights:.0f} weights a thread a step "
          f"({len(body) / weights:.2f} instructions a weight): {top}")


if __name__ == "__main__":
    main()
