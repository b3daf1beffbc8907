"""Laws of RMSNorm (docs/numerics.md §1, docs/numerics.md §7): x / sqrt(mean(x²) + eps) · w with eps 1e-5, normalised and
multiplied by the weight in float32 for low-precision inputs, cast once at the end."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import PRESETS
from gptoss_verify.metrics import ulp
from gptoss_verify.model import Transformer
from gptoss_verify.model.norm import rms_norm

from .backends import run_law
from .strategies import NormCase, norm_cases, tiny_weights, TINY

EPS = 1e-5


def truth(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x, w = x.double(), w.double()
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def check_scale_law(norm, case: NormCase):
    """Scaling the input by c > 0 is the same as dividing eps by c² (float64):
    norm(c·x, eps) = norm(x, eps/c²); so with eps = 0 it is exactly scale invariant."""
    x, w = case.tensors(torch.float64)
    c = case.scale
    for eps in (EPS, 0.0):
        a, b = norm(c * x, w, eps), norm(x, w, eps / c ** 2)
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-13, f"norm({c}·x, eps={eps}) vs norm(x, eps/c²): relative error {err:.2e}"
    return True


def check_float32_inside(norm, case: NormCase, dtype=torch.bfloat16):
    """A bf16/fp16 input is normalised in float32 and rounded once: every output is within one ulp
    of the float64 result correctly rounded to `dtype`, and (double rounding through float32 aside,
    ~2⁻¹⁶ of elements) equal to it."""
    x, w = case.tensors(dtype)
    out = norm(x, w, EPS)
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    want = truth(x, w, EPS)
    rounded = want.to(dtype).double()
    diff = (out.double() - rounded).abs()
    far = diff > ulp(rounded, dtype) * 1.0001
    assert not far.any(), f"{int(far.sum())} elements more than one ulp from the float64 result"
    off = int((diff > 0).sum())
    assert off <= 1 + out.numel() // 256, f"{off} of {out.numel()} elements differ from the once-rounded float64 result"
    return True


def check_eps_configured(model_cls):
    """eps is 1e-5 in every preset and in every norm of the model."""
    for spec in PRESETS.values():
        assert spec.rms_norm_eps == EPS, f"{spec.name}: rms_norm_eps {spec.rms_norm_eps}"
    model = model_cls.from_state_dict(TINY.replace(num_layers=2), tiny_weights(2, 0))
    eps_used = {m.eps for m in model.modules() if hasattr(m, "eps")}
    assert eps_used == {EPS}, f"model norms use eps {eps_used}"
    return True


def check_eps(norm, case: NormCase):
    """eps is what the function adds: on inputs with mean(x²) = eps the output is
    w·x/sqrt(mean(x²) + 1e-5) (float64)."""
    x, w = case.tensors(torch.float64)
    x = x * (EPS ** 0.5 / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-300))
    got = norm(x, w, EPS)
    err = ((got - truth(x, w, EPS)).abs().max() / truth(x, w, EPS).abs().max()).item()
    assert err <= 1e-13, f"with mean(x²) = eps the output is off by {err:.2e}: eps is not {EPS}"
    return True


def test_scale_law():
    run_law(check_scale_law, rms_norm, norm_cases(), 50)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_float32_inside(dtype):
    run_law(check_float32_inside, rms_norm, norm_cases(), 50, dtype=dtype)


def test_eps():
    assert check_eps_configured(Transformer)
    run_law(check_eps, rms_norm, norm_cases(), 25)
