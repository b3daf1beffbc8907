"""Laws of the router (docs/numerics.md §1, docs/numerics.md §5): logits = h·Wᵀ + b; the k largest are chosen; their
weights are the softmax over those k alone (= softmax over all, top-k, renormalised); relabelling
the experts relabels the answer; ties at the top-k boundary are reported, not failed on.

Routing is read through the whole `moe` signature (its logits, indices and weights), so the same
laws hold the fused MoE to account.
"""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.model.moe import count_router_ties

from .backends import moe_backends, params, run_law
from .numerics import assert_close, law_tolerance
from .strategies import RouteCase, route_cases

BACKENDS = moe_backends()
ALPHA, LIMIT = 1.702, 7.0


def route_through(moe_fn, case: RouteCase, dtype, device, perm: torch.Tensor | None = None):
    """(out, logits, idx, weights) of the MoE on the case's router and small experts; with `perm`,
    every expert tensor is relabelled: new expert e is old expert perm[e]."""
    h, w, b = case.tensors(dtype, device)
    gu, gub, dn, dnb = case.experts_tensors(dtype, device)
    if perm is not None:
        p = perm.to(device)
        w, b, gu, gub, dn, dnb = (t[p] for t in (w, b, gu, gub, dn, dnb))
    return moe_fn(h, w, b, gu, gub, dn, dnb, k=case.k, alpha=ALPHA, limit=LIMIT)


def truth_logits(case: RouteCase, dtype) -> torch.Tensor:
    """h·Wᵀ + b in float64 on the dtype-rounded inputs."""
    h, w, b = (t.to(dtype).double() for t in case.tensors())
    return h @ w.T + b


def _untied_rows(logits: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """Rows whose top-k boundary is clear of ties at the dtype's resolution (ties are reported elsewhere)."""
    rel = 8 * law_tolerance(dtype)
    return torch.tensor([count_router_ties(row[None], k, rel_gap=rel) == 0 for row in logits], dtype=torch.bool)


def check_weights_positive_sum_to_one(moe_fn, case: RouteCase, dtype=torch.float64, device="cpu"):
    """Every routing weight is > 0 and each token's k weights sum to 1."""
    _, _, idx, weights = route_through(moe_fn, case, dtype, device)
    weights = weights.double().cpu()
    assert weights.shape == (case.tokens, case.k) and idx.shape == (case.tokens, case.k)
    assert (weights > 0).all(), f"non-positive routing weight {weights.min().item()}"
    assert_close(weights.sum(-1), torch.ones(case.tokens, dtype=torch.float64), dtype, "Σ routing weights")
    return True


def check_indices_are_top_k(moe_fn, case: RouteCase, dtype=torch.float64, device="cpu"):
    """The k indices are distinct and are the k largest logits of h·Wᵀ + b (on rows without a tie
    at the boundary); the returned logits are h·Wᵀ + b."""
    _, logits, idx, _ = route_through(moe_fn, case, dtype, device)
    truth = truth_logits(case, dtype)
    assert_close(logits, truth, dtype, "router logits vs h·Wᵀ + b")
    idx = idx.cpu()
    assert (idx.sort(-1).values.diff(dim=-1) != 0).all(), "repeated expert in a token's top-k"
    clear = _untied_rows(truth, case.k, dtype)
    want = truth.topk(case.k, dim=-1).indices.sort(-1).values
    bad = (clear & (idx.sort(-1).values != want).any(-1)).nonzero().flatten().tolist()
    assert not bad, f"token {bad[0]}: chose {idx[bad[0]].tolist()}, the k largest logits are {want[bad[0]].tolist()}"
    return True


def check_softmax_topk_renormalise(moe_fn, case: RouteCase, dtype=torch.float64, device="cpu"):
    """Weights = softmax over all experts, gathered at the chosen k, renormalised to sum 1."""
    _, logits, idx, weights = route_through(moe_fn, case, dtype, device)
    p = truth_logits(case, dtype).softmax(-1).gather(-1, idx.cpu())
    assert_close(weights, p / p.sum(-1, keepdim=True), dtype, "weights vs renormalised softmax-all")
    return True


def check_permutation_equivariant(moe_fn, case: RouteCase, dtype=torch.float64, device="cpu"):
    """Relabelling the experts (router rows, biases, expert weights alike) permutes the logits and
    the indices the same way, and leaves the weights per expert and the output unchanged."""
    perm = torch.randperm(case.experts, generator=torch.Generator().manual_seed(case.seed))
    out, logits, idx, weights = route_through(moe_fn, case, dtype, device)
    out2, logits2, idx2, weights2 = route_through(moe_fn, case, dtype, device, perm)
    assert_close(logits2, logits.double().cpu()[:, perm], dtype, "permuted logits")
    clear = _untied_rows(truth_logits(case, dtype), case.k, dtype)
    old_of_new = perm[idx2.cpu()]  # the original label of each expert chosen after relabelling

    def by_expert(i, wts):
        dense = torch.zeros(case.tokens, case.experts, dtype=torch.float64)
        return dense.scatter_(1, i, wts.double().cpu())
    same = by_expert(idx.cpu(), weights) - by_expert(old_of_new, weights2)
    assert (same[clear].abs() <= 2 * law_tolerance(dtype)).all(), "weights per expert change under relabelling"
    assert_close(out2[clear.to(out2.device)], out.double()[clear.to(out.device)], dtype, "output under relabelling",
                 scale=out.abs().max().item())
    return True


def check_ties_reported(count_fn, case: RouteCase, logits_fn=None, dtype=torch.float64):
    """`count_router_ties` counts exactly the rows whose k-th and (k+1)-th largest logits are equal
    (rel_gap 0) or within rel_gap of each other, and no others; the router still returns k
    distinct experts whose logits are ≥ every other logit on a tied row."""
    h, w, b = case.tensors()
    logits = h @ w.T + b
    top = logits.sort(-1, descending=True).values
    for rel_gap in (0.0, 2.0 ** -8, 0.5):
        if case.k == case.experts:
            want = 0
        else:
            inside, outside = top[:, case.k - 1], top[:, case.k]
            want = int(sum(bool(a - o <= rel_gap * max(abs(a), abs(o))) for a, o in zip(inside, outside)))
        got = count_fn(logits, case.k, rel_gap=rel_gap)
        assert got == want, f"count_router_ties(rel_gap={rel_gap}) = {got}, {want} rows are tied at the boundary"
    if logits_fn is not None:  # the router on tied rows: a valid top-k, not an error
        _, lg, idx, weights = logits_fn(case)
        lg, idx = lg.double().cpu(), idx.cpu()
        chosen_min = lg.gather(-1, idx).min(-1).values
        others = lg.scatter(-1, idx, float("-inf")).max(-1).values
        assert (chosen_min >= others).all(), "a tied row's top-k leaves out a larger logit"
        assert_close(weights.sum(-1), torch.ones(case.tokens, dtype=torch.float64), dtype, "Σ weights")
    return True


LAWS = [check_weights_positive_sum_to_one, check_indices_are_top_k, check_softmax_topk_renormalise,
        check_permutation_equivariant]


@pytest.mark.parametrize("law", LAWS, ids=lambda f: f.__name__[6:])
@pytest.mark.parametrize("backend", params(BACKENDS))
def test_routing_law(backend, law):
    run_law(law, backend.fn, route_cases(tiny=backend.name != "reference"), 25, backend,
            dtype=backend.precise, device=backend.device)


@pytest.mark.parametrize("backend,dtype", [pytest.param(b, d, id=f"{b.name}-{str(d)[6:]}")
                                           for b in BACKENDS for d in b.dtypes[1:]])
def test_routing_low_precision(backend, dtype):
    for law in (check_weights_positive_sum_to_one, check_indices_are_top_k):
        run_law(law, backend.fn, route_cases(tiny=backend.name != "reference"), 10, backend,
                dtype=dtype, device=backend.device)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "generic"])
@pytest.mark.parametrize("backend", params(BACKENDS))
def test_ties_reported(backend, tie):
    def through_moe(case):
        return route_through(backend.fn, case, backend.precise, backend.device)
    run_law(check_ties_reported, count_router_ties, route_cases(tie=tie, tiny=backend.name != "reference"), 25,
            backend, logits_fn=through_moe, dtype=backend.precise)


def test_ties_reported_on_a_known_row():
    """Hand-made rows: an exact tie at the k boundary, one inside the top-k, and a clear gap."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0],    # k=2: 2nd and 3rd tied -> reported
                           [3.0, 3.0, 1.0, 0.0],    # k=2: tie inside the top-2 -> not a boundary tie
                           [3.0, 2.0, 1.0, 0.0]])   # clear
    assert count_router_ties(logits, 2, rel_gap=0.0) == 1
    assert count_router_ties(logits, 1, rel_gap=0.0) == 1
    assert count_router_ties(logits, 4, rel_gap=0.0) == 0
