"""Compile the int4 tensor-core kernel for Hopper (sm_90) without a GPU and count what the compiled
code does per K step: tensor-core instructions, shared-memory traffic, layout conversions, barriers,
and whether Triton software-pipelined the loop (cp.async). Triton's wheel ships ptxas, so this runs
on the CPU machine; it reads the code, it times nothing.

    python benchmarks/compiled_w4a16.py BLOCK_M=8,BLOCK_N=32,BLOCK_K=256,SPLIT=4
    python benchmarks/compiled_w4a16.py BLOCK_M=8,BLOCK_N=32,BLOCK_K=256,PREFETCH=True --dump /tmp/k

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

POINTERS = ("x_ptr", "s_ptr", "z_ptr", "bias_ptr")
INTS = ("M", "N", "K", "stride_xm", "stride_qn", "stride_sn", "stride_om", "k_slice", "k_slice_q")
PTX_OPS = ("mma.sync", "wgmma.mma_async", "ldmatrix", "st.shared", "ld.shared", "lop3", "cvt", "ld.global",
           "cp.async", "shfl", "bar.sync")


def compile_kernel(config: dict, capability: int = 90):
    kernel = w4a16._w4a16_kernel
    config = dict(config)
    options = dict(num_warps=config.pop("num_warps", 4), num_stages=config.pop("num_stages", 3))
    constexprs = dict(GROUP=128, HAS_ZEROS=True, HAS_BIAS=False, SCALE_IN=False, ASM=True, DOT_F32=False, SPLIT=1,
                      SPLIT_K=1, PREFETCH=False)
    constexprs.update(config)
    if constexprs["GROUP"] >= 64:  # as the launcher fits it: one step lies in one group
        constexprs["BLOCK_K"] = min(constexprs.get("BLOCK_K", 128), constexprs["GROUP"])
    if constexprs["SPLIT"] > 1:
        options["num_warps"] = constexprs["SPLIT"]  # as the launcher does
    signature = {}
    for name in kernel.arg_names:
        if name in POINTERS:
            signature[name] = "*bf16"
        elif name == "out_ptr":
            signature[name] = "*bf16" if constexprs["SPLIT_K"] == 1 else "*fp32"
        elif name == "q_ptr":
            signature[name] = "*i32"
        elif name in INTS:
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", help="NAME=VALUE,...: the kernel's constexprs, num_warps, num_stages")
    ap.add_argument("--dump", default=None, help="write PREFIX.ttgir and PREFIX.ptx")
    args = ap.parse_args()
    config = {}
    for item in args.config.split(","):
        name, _, value = item.partition("=")
        config[name.strip()] = ast.literal_eval(value.strip())
    compiled = compile_kernel(config)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    if args.dump:
        with open(args.dump + ".ttgir", "w") as f:
            f.write(ttgir)
        with open(args.dump + ".ptx", "w") as f:
            f.write(ptx)
    loop = ttgir[ttgir.find("scf.for"):ttgir.find("scf.yield")]
    print(f"shared memory {compiled.metadata.shared} B; in the K loop: {loop.count('ttg.local_alloc')} tensors "
          f"through shared memory, {loop.count('tt.load')} global loads, {loop.count('tt.dot')} dots")
    print("PTX (whole kernel): " + ", ".join(f"{op} {ptx.count(op)}" for op in PTX_OPS))


if __name__ == "__main__":
    main()
