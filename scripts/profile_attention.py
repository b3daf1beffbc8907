"""Where one fused-attention step spends its time: the torch profiler's table of CUDA kernels for
forward + backward at one shape (bf16, 64 q / 8 kv heads, head_dim 64).
Usage: profile_attention.py SEQ [WINDOW]"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gptoss_verify.kernels.attention import fused_attention


def main() -> None:
    seq = int(sys.argv[1])
    window = int(sys.argv[2]) if len(sys.argv) > 2 else None
    torch.manual_seed(0)
    q = torch.randn(1, seq, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, seq, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    sinks = (torch.randn(64, device="cuda") * 5).to(torch.bfloat16).requires_grad_(True)
    grad = torch.randn_like(q)

    def step():
        fused_attention(q, k, v, sinks, window=window).backward(grad)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"seq {seq}, window {window}: 5 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
