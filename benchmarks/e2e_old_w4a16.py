"""``benchmarks/e2e.py`` with the int4 op routed to another version of ``kernels/w4a16.py``: the
same-process "before" of an int4 kernel change, end to end. The op stays the installed one; its GPU
path (``w4a16_triton``, looked up when the op runs or is traced) is taken from the given file.

    git show REV:pymllm_fx/kernels/w4a16.py > /tmp/w4a16_old.py
    python benchmarks/e2e_old_w4a16.py /tmp/w4a16_old.py --methods bf16,int4 --parts lean --batch 4
"""

import os
import runpy
import sys

import pymllm_fx.kernels.w4a16 as current

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules

from common import load_kernel_file  # noqa: E402


def main():
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit(__doc__)
    current.w4a16_triton = load_kernel_file(sys.argv[1], "w4a16").w4a16_triton
    sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e.py")] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
