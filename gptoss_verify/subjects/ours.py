"""Our own implementation as a subject: `reference` (plain torch blocks) and `fused` (Triton kernels).

Both expose every trace point. The fused kernels run on CUDA, or on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1`, set before triton is first imported), which misreads bf16: on
the CPU the fused subject runs in float32 and float16 only.
"""
from __future__ import annotations

import os

import torch

from .protocol import ALL_POINTS, Case, Output, SubjectUnavailable, Trace


class Ours:
    def __init__(self, backend: str = "reference"):
        if backend not in ("reference", "fused"):
            raise ValueError(f"ours: backend expected reference or fused, got {backend!r}")
        self.name = backend
        self.backend = backend
        self.precisions = ("float64", "float32", "bfloat16", "float16") if backend == "reference" else \
            ("float32", "bfloat16", "float16")
        self.points = ALL_POINTS

    def _model(self, case: Case):
        from ..backends import block_functions
        from ..model import Transformer
        if self.backend == "fused":
            self._check_fused(case)
        return Transformer.from_state_dict(case.spec, case.dense_state(), block_functions(self.backend))

    def decode(self, case: Case, prefill: int) -> torch.Tensor:
        """The protocol's optional KV-cache path: the first `prefill` tokens in one pass into the
        cache, then each later token alone against it; the logits of every position [B, S, V]."""
        model = self._model(case)
        cache, ids, parts = model.new_cache(), case.input_ids.to(case.device), []
        with torch.no_grad():
            parts.append(model(ids[:, :prefill], case.offset, cache))
            for t in range(prefill, ids.shape[1]):
                parts.append(model(ids[:, t:t + 1], case.offset + t, cache))
        return torch.cat(parts, dim=1)

    def run(self, case: Case) -> Output:
        model = self._model(case)
        trace = Trace()
        with torch.no_grad():
            logits = model(case.input_ids.to(case.device), case.offset, trace=trace)
        return Output(logits, {n: t for n, t in trace.tensors.items() if n != "logits"})

    def _check_fused(self, case: Case) -> None:
        if case.dtype_name not in self.precisions:
            raise SubjectUnavailable(f"fused: no {case.dtype_name} kernels (runs in {', '.join(self.precisions)})")
        if not case.device.startswith("cuda"):
            if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                raise SubjectUnavailable("fused: on the CPU the Triton kernels need TRITON_INTERPRET=1 "
                                         "(set before triton is imported)")
            if case.dtype == torch.bfloat16:
                raise SubjectUnavailable("fused: Triton's CPU interpreter misreads bf16; run it in float32 on "
                                         "the CPU, bf16 on a GPU")
