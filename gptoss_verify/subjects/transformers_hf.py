"""transformers' GptOssForCausalLM as subjects: attention implementation × experts implementation,
built on the case's weights by our oracle (`oracles/hf.py`), and an MXFP4 checkpoint loaded as
transformers loads it (dequantized on load).

Quirks stated as errors, not hidden: transformers refuses flex_attention with sinks on the CPU (GPU
only); flash-attention variants need their package; grouped_mm rejects float64. Only eager
attention exposes q, k, v and attn_core (the oracle records them inside transformers' eager
attention); every other point comes from module hooks.
"""
from __future__ import annotations

import tempfile

import torch

from .protocol import ALL_POINTS, Case, Output, SubjectUnavailable, Trace

ATTENTION = ("eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# (GPT-OSS declares _supports_sdpa = False, so sdpa is not among them)
# transformers 5.24's `ALL_EXPERTS_FUNCTIONS` (integrations/moe.py) plus its default, eager;
# deepgemm and sonicmoe are CUDA kernels fetched from the Hub by the `kernels` package
EXPERTS = ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")
_HUB_KERNELS = ("deepgemm", "sonicmoe")
_INSIDE_ATTENTION = ("q", "k", "v", "attn_core")


def _oracle():
    try:
        from ..oracles import hf
    except ImportError as err:
        raise SubjectUnavailable(f"transformers subjects need transformers ({err})") from None
    return hf


def experts_implementations() -> tuple[str, ...]:
    """The experts implementations the installed transformers offers for GPT-OSS."""
    try:
        from transformers.integrations import moe
        known = tuple(getattr(moe, "ALL_EXPERTS_FUNCTIONS", {}).keys())
    except ImportError:
        known = ()
    return ("eager",) + tuple(e for e in known if e != "eager")


class HFSubject:
    def __init__(self, attention: str = "eager", experts: str = "eager"):
        if attention not in ATTENTION:
            raise ValueError(f"hf: attention implementation expected one of {ATTENTION}, got {attention!r}")
        if experts not in EXPERTS:
            raise ValueError(f"hf: experts implementation expected one of {EXPERTS}, got {experts!r}")
        self.attention, self.experts = attention, experts
        self.name = "hf-eager" if (attention, experts) == ("eager", "eager") else f"hf:{attention}:{experts}"
        self.precisions = ("float32", "bfloat16", "float16") if experts != "eager" else \
            ("float64", "float32", "bfloat16", "float16")
        self.points = ALL_POINTS if attention == "eager" else tuple(p for p in ALL_POINTS if p not in _INSIDE_ATTENTION)

    def _check(self, case: Case) -> None:
        if case.dtype_name not in self.precisions:
            raise SubjectUnavailable(f"{self.name}: transformers' {self.experts} experts reject {case.dtype_name}")
        if self.experts not in experts_implementations():
            raise SubjectUnavailable(f"{self.name}: the installed transformers has no {self.experts} experts "
                                     f"(it has {', '.join(experts_implementations())})")
        if self.experts in _HUB_KERNELS:
            import importlib.util
            if not case.device.startswith("cuda") or importlib.util.find_spec("kernels") is None:
                raise SubjectUnavailable(f"{self.name}: transformers' {self.experts} experts need CUDA and the "
                                         f"`kernels` package (kernels fetched from the Hub)")
        if self.attention == "flex_attention" and not case.device.startswith("cuda"):
            raise SubjectUnavailable(f"{self.name}: transformers refuses flex_attention with sinks on the CPU (GPU only)")
        if self.attention.startswith("flash_attention"):
            import importlib.util
            pkg = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}[self.attention]
            if importlib.util.find_spec(pkg) is None:
                raise SubjectUnavailable(f"{self.name}: needs the {pkg} package, which is not installed")

    def build(self, case: Case, state: dict[str, torch.Tensor]):
        hf = _oracle()
        oracle = hf.HFOracle(case.spec, state, experts_implementation=self.experts)
        if self.attention != "eager":
            oracle.model.set_attn_implementation(self.attention)
        return oracle

    def run(self, case: Case) -> Output:
        self._check(case)
        oracle = self.build(case, case.dense_state())
        trace = Trace()
        with torch.no_grad():
            logits = oracle(case.input_ids.to(case.device), case.offset, trace)
        return Output(logits, {n: t for n, t in trace.tensors.items() if n != "logits"})


class HFMXFP4Subject(HFSubject):
    """The case's weights written as an MXFP4 HF checkpoint, loaded by `from_pretrained` with
    transformers' own dequantization (`Mxfp4Config(dequantize=True)`), eager paths. The case's
    expert weights must lie on the MXFP4 grid (MXFP4 weights, or dense ones decoded from MXFP4)
    for the truth to be the same model; otherwise the encoding's loss is judged too."""

    def __init__(self):
        super().__init__("eager", "eager")
        self.name = "hf-mxfp4"
        self.precisions = ("float32", "bfloat16")

    def build(self, case: Case, state: dict[str, torch.Tensor]):
        hf = _oracle()
        from transformers import GptOssForCausalLM, Mxfp4Config

        from ..formats import layout
        with tempfile.TemporaryDirectory(prefix="gptoss-hf-mxfp4-") as tmp:
            out = f"{tmp}/ckpt"
            layout.module("hf").write(iter(state.items()), case.spec, out, mxfp4=True, dtype=case.dtype)
            model = GptOssForCausalLM.from_pretrained(out, dtype=case.dtype,
                                                      quantization_config=Mxfp4Config(dequantize=True))
        oracle = hf.HFOracle(case.spec, dict(model.state_dict()))
        return oracle
