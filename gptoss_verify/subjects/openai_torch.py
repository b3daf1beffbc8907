"""OpenAI's reference `gpt_oss.torch` (package gpt-oss 0.0.9, `pip install --no-deps gpt-oss==0.0.9`)
as a subject, run on our OpenAI-layout output (`formats/openai.py`, MXFP4 experts as published).

Its quirks, stated as errors: bf16 is its only precision (its loader builds bf16 parameters); it is
unbatched (each sequence runs alone) and has no KV cache and no position offset (RoPE starts at 0,
so a case with an offset is refused); its RoPE uses `initial_context_length` (4096, written by our
OpenAI config). Logits only. Its loader reads MXFP4 experts, so the case's expert weights should lie
on the MXFP4 grid (MXFP4 weights), or the encoding's loss is judged too.
"""
from __future__ import annotations

import tempfile

import torch

from .protocol import LOGITS_ONLY, Case, SubjectUnavailable


class OpenAITorch:
    def __init__(self):
        try:
            from gpt_oss.torch.model import Transformer  # noqa: F401
        except ImportError as err:
            raise SubjectUnavailable(f"openai-torch needs gpt-oss (pip install --no-deps gpt-oss==0.0.9): {err}") from None
        self.name = "openai-torch"
        self.precisions = ("bfloat16",)
        self.points = LOGITS_ONLY

    def run(self, case: Case) -> torch.Tensor:
        from gpt_oss.torch.model import Transformer

        from ..formats import openai
        if case.dtype != torch.bfloat16:
            raise SubjectUnavailable(f"openai-torch: bf16 is its only precision, not {case.dtype_name}")
        if case.offset:
            raise SubjectUnavailable("openai-torch: no position offset (its RoPE starts at position 0)")
        with tempfile.TemporaryDirectory(prefix="gptoss-openai-") as tmp:
            out = f"{tmp}/ckpt"
            openai.write(iter(case.dense_state().items()), case.spec, out, mxfp4=True, dtype=torch.bfloat16)
            model = Transformer.from_checkpoint(out, device=case.device)
        with torch.no_grad():
            return torch.stack([model(row.to(case.device)) for row in case.input_ids])
