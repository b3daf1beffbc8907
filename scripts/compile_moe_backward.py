"""Compile the fused MoE backward's kernels for sm_90 without a GPU and print what decides their speed
before any timing: registers, spill stack, shared memory, and about how many programs fit on one SM.
At the shapes of the prefill (bf16, 128-row blocks, `BackwardConfig()`), so a change that makes a
kernel spill or drop to one program per SM shows here, on any machine with the triton wheel.

    python scripts/compile_moe_backward.py   # the backward's kernels at BackwardConfig()
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gptoss_verify.kernels import _moe_backward as B  # noqa: E402
from gptoss_verify.kernels.moe import BackwardConfig  # noqa: E402

SM_REGS, SM_SMEM = 65536, 227 * 1024  # Hopper, per SM
BF, F32, I32 = "*bf16", "*fp32", "*i32"


def compile_sm90(jit, pointers, consts, num_warps, num_stages):
    """(registers, spill stack bytes, shared bytes) of `jit` compiled for sm_90; ints not named are i32
    divisible by 16 (as strides and H, I are at the published shapes)."""
    names = jit.arg_names
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n.startswith("stride") or n in ("N", "K", "M")}
    src = ASTSource(fn=jit, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(x.split(":") for x in usage.split() if x.count(":") == 1 and x.split(":")[1].isdigit())
    return int(fields.get("REG", 0)), int(fields.get("STACK", 0)), int(kernel.metadata.shared)


def kernels(cfg: BackwardConfig):
    """(label, kernel, pointer types, constexprs, warps, stages) at the prefill's bf16 shapes."""
    bm = 128
    gemm = dict(BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, IEEE=False, stride_wk=1)
    rows = dict(sorted_slot_ptr=I32, block_rows_ptr=I32)
    launch = (cfg.num_warps, cfg.num_stages)
    return [
        ("dact_kernel", B.dact_kernel, dict(dout_ptr=BF, w_ptr=BF, s_ptr=BF, da_ptr=F32, block_expert_ptr=I32, **rows),
         dict(TOPK=4, MXFP4=False, EVEN_K=True, **gemm), *launch),
        ("swiglu_bwd_kernel", B.swiglu_bwd_kernel,
         dict(da_ptr=F32, act_ptr=BF, pre_ptr=BF, weights32_ptr=F32, dpre_ptr=BF, dw_ptr=F32, alpha="fp32",
              limit="fp32", **rows), dict(ROW_BLOCK=bm, BLOCK_R=cfg.swiglu_rows, BLOCK_N=cfg.swiglu_n), 4, 3),
        ("gather_rows_kernel (w·dO)", B.gather_rows_kernel, dict(y_ptr=BF, weights32_ptr=F32, out_ptr=BF, **rows),
         dict(SCALED=True, TOPK=4, ROW_BLOCK=bm, BLOCK_R=32, BLOCK_N=cfg.bias_n), 4, 3),
        ("expert_grad_kernel", B.expert_grad_kernel, dict(x_ptr=BF, y_ptr=BF, out_ptr=BF, counts_ptr=I32),
         dict(ROW_BLOCK=bm, BLOCK_E=32, BLOCK_M=cfg.grad_m, BLOCK_N=cfg.grad_n, BLOCK_K=cfg.grad_k, IEEE=False),
         cfg.grad_warps, cfg.grad_stages),
        ("block_sums_kernel", B.block_sums_kernel, dict(y_ptr=BF, part_ptr=F32, block_rows_ptr=I32),
         dict(ROW_BLOCK=bm, BLOCK_R=32, BLOCK_N=cfg.bias_n), 4, 3),
        ("expert_sums_kernel", B.expert_sums_kernel, dict(part_ptr=F32, out_ptr=BF, counts_ptr=I32),
         dict(ROW_BLOCK=bm, BLOCK_E=32, BLOCK_N=cfg.bias_n), 4, 3),
        ("dx_slot_kernel", B.dx_slot_kernel, dict(dpre_ptr=BF, w_ptr=BF, s_ptr=BF, dxs_ptr=F32, block_expert_ptr=I32,
                                                  **rows), dict(MXFP4=False, **gemm), *launch),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    print(f"triton {triton.__version__}, sm_90, bf16, 128-row blocks, {BackwardConfig()}")
    for label, jit, pointers, consts, warps, stages in kernels(BackwardConfig()):
        regs, stack, smem = compile_sm90(jit, pointers, consts, warps, stages)
        per_sm = min(SM_REGS // max(1, regs * 32 * warps), SM_SMEM // max(1, smem + 1024))
        print(f"{label:28s} warps {warps} stages {stages}: {regs:3d} registers, {stack:4d} B spill stack, "
              f"{smem // 1024:3d} KiB shared, ≈ {per_sm} programs per SM", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
