"""The implementations each block's laws are held against, and how to run a law over generated cases.

`reference` is always there. `fused` appears once `gptoss_verify/kernels/attention.py` (exporting
`fused_attention`) or `gptoss_verify/kernels/moe.py` (exporting `fused_moe`) exists. A kernel file
that exists but fails to import is still listed, with a function that re-raises the import error,
so that a broken kernel fails the laws loudly instead of silently dropping out of the suite.

Without a GPU the fused kernels run under the Triton interpreter (tests/conftest.py sets it): only
float32/float16 there, and slowly, so those backends get few, tiny examples (`max_examples`).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, given, settings

from gptoss_verify.backends import block_functions
from gptoss_verify.model import BlockFunctions
from gptoss_verify.model import attention as attention_ref
from gptoss_verify.model import moe as moe_ref

KERNELS = Path(__file__).resolve().parents[2] / "gptoss_verify" / "kernels"
ON_GPU = torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    device: str
    dtypes: tuple[torch.dtype, ...]  # dtypes the laws run in; the first is the most precise
    max_examples: int  # cap on examples per law (the interpreter is slow)

    @property
    def precise(self) -> torch.dtype:
        return self.dtypes[0]

    def __str__(self) -> str:
        return self.name


def _kernel(module: str, attr: str) -> Callable | None:
    """The kernel function if its file exists; a function re-raising the import error if it is broken."""
    if not (KERNELS / f"{module}.py").exists():
        return None
    try:
        return getattr(importlib.import_module(f"gptoss_verify.kernels.{module}"), attr)
    except Exception as exc:  # noqa: BLE001 - reported when a law calls it
        error = exc

        def broken(*args, **kwargs):
            raise RuntimeError(f"gptoss_verify.kernels.{module}.{attr} failed to import: {error!r}")
        return broken


def _backends(reference: Callable, module: str, attr: str) -> list[Backend]:
    found = [Backend("reference", reference, "cpu",
                     (torch.float64, torch.float32, torch.bfloat16, torch.float16), 10 ** 6)]
    fused = _kernel(module, attr)
    if fused is not None:
        if ON_GPU:
            found.append(Backend("fused", fused, "cuda", (torch.float32, torch.bfloat16, torch.float16), 25))
        else:
            found.append(Backend("fused", fused, "cpu", (torch.float32, torch.float16), 3))
    return found


def attention_backends() -> list[Backend]:
    return _backends(attention_ref.attention, "attention", "fused_attention")


def moe_backends() -> list[Backend]:
    return _backends(moe_ref.moe, "moe", "fused_moe")


def params(backends: list[Backend]) -> list:
    return [pytest.param(b, id=b.name) for b in backends]


def budget(n: int, backend: Backend | None = None) -> int:
    """Examples for a law: `n` under the ci profile, scaled up under `thorough`, capped per backend."""
    scaled = max(n, n * settings.default.max_examples // 25)
    return max(1, min(scaled, backend.max_examples if backend else scaled))


def run_law(check: Callable, impl, strategy, n: int, backend: Backend | None = None, **kwargs) -> None:
    """Run `check(impl, case, **kwargs)` on `budget(n)` cases drawn from `strategy`.

    A failure prints `Falsifying example: check_<law>(case=<Case(...)>)`: paste the case into
    `check_<law>(impl, Case(...))` for a regression test."""
    def law(case):
        assert check(impl, case, **kwargs) is not False, f"{check.__name__} does not hold for {case!r}"
    law.__name__ = law.__qualname__ = check.__name__
    chosen = settings(settings.default, max_examples=budget(n, backend))
    if backend is not None and backend.name != "reference" and not ON_GPU:
        # the interpreter is slow: report the first failing case as drawn, without shrinking it
        chosen = settings(chosen, phases=[Phase.explicit, Phase.reuse, Phase.generate])
    chosen(given(case=strategy)(law))()


def first_violation(check: Callable, impl, strategy, n: int = 50, **kwargs):
    """`(case,)` for the first generated case on which `check` fails for `impl` (a mutant), or None
    if the law held on all `n` cases (a 1-tuple, since the case itself may be None). An exception raised by the mutant counts as a violation: the property
    test would have failed on it too."""
    from hypothesis import find
    from hypothesis.errors import NoSuchExample

    def violated(case) -> bool:
        try:
            return check(impl, case, **kwargs) is False
        except Exception:  # noqa: BLE001 - an assertion or an error: the law test fails either way
            return True
    try:
        return (find(strategy, violated, settings=settings(settings.default, max_examples=n, database=None,
                                                           phases=[Phase.generate])),)
    except NoSuchExample:
        return None


def model_blocks(backend: str | BlockFunctions) -> BlockFunctions:
    """The block functions for a whole-model law: a backend's (by name), or a mutant table."""
    return block_functions(backend) if isinstance(backend, str) else backend


def model_backends() -> list[Backend]:
    """Whole-model backends: `backends.block_functions` names; `fused` once both kernels exist.
    `fn` is the backend name (`model_blocks` turns it into the model's block functions)."""
    found = [Backend("reference", "reference", "cpu", (torch.float64, torch.float32), 10 ** 6)]
    if _kernel("attention", "fused_attention") is not None and _kernel("moe", "fused_moe") is not None:
        found.append(Backend("fused", "fused", "cuda" if ON_GPU else "cpu", (torch.float32,), 25 if ON_GPU else 2))
    return found
