"""The transform catalogue: for a tensor of B that differs from A's, which known mistake maps A onto B.

Each probe proposes one transform T (a transpose, a permutation it found, a factor it fitted...)
and T(A) is measured against B. A transform *explains* B when the residual ‖T(A) − B‖/‖B‖ is
within the rounding of the lower side (`EXPLAINED`) and at most half of ‖A − B‖/‖B‖; it is
*exact* when T(A) and B are equal value for value once rounded to the lower side's dtype. The
MXFP4 probes read the bytes instead (a constant shift of the E8M0 scales, swapped nibbles).
Probes run most specific first; of those that explain B, the smallest residual wins. Every name
here is documented with the bug that shipped it in docs/diff.md.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .deps import SCALE_BIAS, ModelSpec, is_expert_weight
from .tensors import MXFP4, Held, lower_dense_dtype, lower_form, rel_l2, values_equal, work_dtype

# lower side's form -> (largest residual a transform may leave and still explain B, why)
EXPLAINED: dict[str, tuple[float, str]] = {
    "F64": (1e-12, "float64 producers round once per operation"),
    "F32": (2.0 ** -20, "a float32 producer: a few float32 roundings per element"),
    "F16": (2.0 ** -9, "one or two fp16 roundings per element (each at most 2^-11 relative)"),
    "BF16": (2.0 ** -6, "one or two bf16 roundings per element (each at most 2^-9 relative)"),
    MXFP4: (0.35, "re-quantising to e2m1 moves an element by up to a third of its value"),
}
_NOT_ONE = 1e-6  # a fitted factor or offset closer to identity than this is no transform


@dataclasses.dataclass
class Diagnosis:
    transform: str  # a name from docs/diff.md, e.g. "transpose", "experts-permuted"
    detail: str
    exact: bool
    residual: float  # ‖T(A) − B‖ / ‖B‖ (0 for byte-level probes that matched every byte)

    def describe(self) -> str:
        how = "exact" if self.exact else f"residual {self.residual:.3g}"
        return f"{self.transform} ({how}): {self.detail}"


@dataclasses.dataclass
class Candidate:
    transform: str
    detail: str
    values: torch.Tensor | None = None  # T(A), in B's dense shape
    verified: bool = False  # a byte-level probe that matched structurally (no `values`)


@dataclasses.dataclass
class Context:
    name: str
    a: Held
    b: Held
    spec_a: ModelSpec
    spec_b: ModelSpec
    a_dense: torch.Tensor
    b_dense: torch.Tensor

    @property
    def kind(self) -> str:
        """The canonical name without its layer: `self_attn.sinks`, `model.embed_tokens.weight`."""
        return self.name.split(".", 3)[-1] if self.name.startswith("model.layers.") else self.name

    @property
    def same_shape(self) -> bool:
        return self.a_dense.shape == self.b_dense.shape


Probe = Callable[[Context], list[Candidate]]


def diagnose(name: str, a: Held, b: Held, spec_a: ModelSpec, spec_b: ModelSpec) -> Diagnosis | None:
    """The known transform that maps A's `name` onto B's, or None."""
    work = work_dtype(a.form, b.form)
    ctx = Context(name, a, b, spec_a, spec_b, a.dense(work), b.dense(work))
    bound = EXPLAINED[lower_form(a.form, b.form)][0]
    low = lower_dense_dtype(a.form, b.form)
    baseline = rel_l2(ctx.a_dense, ctx.b_dense) if ctx.same_shape else math.inf
    best: Diagnosis | None = None
    for probe in PROBES:
        for cand in probe(ctx):
            if cand.verified:
                return Diagnosis(cand.transform, cand.detail, True, 0.0)
            if cand.values is None or tuple(cand.values.shape) != tuple(ctx.b_dense.shape):
                continue
            residual = rel_l2(cand.values, ctx.b_dense)
            if residual <= bound and residual <= 0.5 * baseline:
                exact = values_equal(cand.values, ctx.b_dense, low)
                if best is None or residual < best.residual or (exact and not best.exact):
                    best = Diagnosis(cand.transform, cand.detail, exact, residual)
            del cand
        if best is not None and best.exact:
            break
    return best


# ---- probes ---------------------------------------------------------------------------------------
def _vocab(ctx: Context) -> list[Candidate]:
    """Embedding / lm_head with more or fewer rows than A: padding (zero or not) or a cut."""
    if ctx.kind not in ("model.embed_tokens.weight", "lm_head.weight") or ctx.same_shape:
        return []
    a, b = ctx.a_dense, ctx.b_dense
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        return []
    va, vb = a.shape[0], b.shape[0]
    if vb > va:
        pad = b[va:]
        nonzero = (pad != 0).any(dim=1)
        if bool(nonzero.any()):
            first = va + int(nonzero.nonzero()[0])
            out = torch.cat([a, pad])  # B's padding taken as it is: what is judged is rows < V
            return [Candidate("vocab-padding-nonzero", f"{vb - va} rows appended after A's {va}; "
                              f"{int(nonzero.sum())} of them are not zero (first: row {first})", out)]
        return [Candidate("vocab-padded", f"{vb - va} zero rows appended after A's {va} (to {vb})",
                          torch.cat([a, pad]))]
    return [Candidate("vocab-cut", f"rows {vb}..{va - 1} of A's {va} are missing in B", a[:vb])]


def _mxfp4_bytes(ctx: Context) -> list[Candidate]:
    """Scales shifted by a constant (a wrong E8M0 bias, or one exponent off the OCP rule), nibbles
    swapped: read on the bytes, where one side holds MXFP4 (the other side's OCP encoding)."""
    if not is_expert_weight(ctx.name) or not (ctx.a.mx or ctx.b.mx) or not ctx.same_shape:
        return []
    try:
        ab, a_s = ctx.a.encoded()
        bb, b_s = ctx.b.encoded()
    except ValueError:
        return []
    if ab.shape != bb.shape:
        return []
    live = (ab != 0).any(-1) | (bb != 0).any(-1)  # an all-zero block's scale is arbitrary
    shift = (b_s.int() - a_s.int())[live]
    out: list[Candidate] = []
    if shift.numel():
        ks = torch.unique(shift).tolist()
        moved = [k for k in ks if k != 0]
        if len(moved) == 1:
            k = moved[0]
            n_moved, n_live = int((shift == k).sum()), int(live.sum())
            where = "every" if n_moved == n_live else f"{n_moved} of {n_live}"
            if torch.equal(ab[live], bb[live]):
                out.append(Candidate("mxfp4-scale-bias", f"{where} E8M0 scale {abs(k)} {'below' if k < 0 else 'above'} "
                                     f"A's with identical blocks: B's scales carry bias {SCALE_BIAS + k} instead of "
                                     f"{SCALE_BIAS} (decodes to 2^{k} x A)", verified=True))
            else:
                out.append(Candidate("mxfp4-scale-exponent", f"{where} E8M0 scale {abs(k)} exponent(s) "
                                     f"{'below' if k < 0 else 'above'} A's and the e2m1 codes re-quantised to it "
                                     "(a shared exponent computed off the OCP rule)", verified=True))
    if torch.equal(a_s, b_s):
        swapped = ((ab >> 4) | (ab << 4)).to(torch.uint8)
        if torch.equal(swapped, bb):
            out.append(Candidate("nibble-order-swapped", "every byte's two e2m1 codes exchanged (element 2b read "
                                 "from the high nibble)", verified=True))
    return out


def _transpose_ops(ctx: Context) -> list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]]:
    """Orientation (last two dims) and, for gate_up, the split of gate and up along the outputs."""
    ops: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = []
    if ctx.a_dense.dim() >= 2:
        ops.append(("transpose", "the last two dimensions swapped ([in, out] vs [out, in])",
                    lambda x: x.transpose(-1, -2)))
    if ctx.kind in ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias"):
        ops += [
            ("gate-up-halves", "B holds gate and up as halves [gate | up] where A interleaves them "
             "(gate even, up odd)", lambda x: torch.cat([x[..., 0::2], x[..., 1::2]], -1)),
            ("gate-up-interleaved", "B interleaves gate and up where A holds them as halves",
             _interleave),
            ("gate-up-swapped", "gate and up exchanged (B's even columns are A's odd ones)",
             lambda x: _interleave(torch.cat([x[..., 1::2], x[..., 0::2]], -1))),
        ]
        if ctx.kind == "mlp.experts.gate_up_proj":
            ops.append(("transpose + gate-up-halves", "B is Megatron's fc1 as stored ([gate; up] rows, "
                        "[out, in]): neither transposed nor interleaved",
                        lambda x: torch.cat([x[..., 0::2], x[..., 1::2]], -1).transpose(-1, -2)))
    if is_expert_weight(ctx.name) and ctx.a_dense.shape[-2] % 2 == 0:
        ops.append(("nibble-order-swapped", "neighbouring inputs (2b, 2b+1) exchanged in every MXFP4 byte: "
                    "the two nibbles read in the wrong order", _swap_input_pairs))
    return ops


def _interleave(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., :half], x[..., half:]
    return out


def _swap_input_pairs(x: torch.Tensor) -> torch.Tensor:
    """Canonical expert weights are [E, in, out]: swap inputs 2b and 2b+1."""
    e, n, out = x.shape
    return x.reshape(e, n // 2, 2, out).flip(2).reshape(e, n, out)


def _reorder(ctx: Context) -> list[Candidate]:
    return [Candidate(name, detail, op(ctx.a_dense)) for name, detail, op in _transpose_ops(ctx)]


def _some_experts(ctx: Context) -> list[Candidate]:
    """A reordering applied to some experts only (a converter looping over per-expert tensors that
    handles some differently): each reordering tried on the experts that differ, the rest kept."""
    a, b = ctx.a_dense, ctx.b_dense
    if not ctx.kind.startswith("mlp.experts.") or not ctx.same_shape or a.dim() < 2 or a.shape[0] < 2:
        return []
    differ = (a != b).reshape(a.shape[0], -1).any(dim=1)
    moved = differ.nonzero().flatten()
    if not 0 < moved.numel() < a.shape[0]:
        return []
    out = []
    for name, detail, op in _transpose_ops(ctx):
        changed = op(a[moved])
        if changed.shape != a[moved].shape:
            continue
        values = a.clone()
        values[moved] = changed
        out.append(Candidate(name, f"on {moved.numel()} of {a.shape[0]} experts ({_ranges(moved.tolist())}), the "
                             f"others unchanged: {detail}", values))
    return out


def _slices(ctx: Context) -> list[tuple[str, int, Callable[[torch.Tensor], torch.Tensor], Callable]]:
    """(transform, count, tensor -> [count, -1] slices, (tensor, perm) -> permuted tensor)."""
    kind, spec = ctx.kind, ctx.spec_a
    d = spec.head_dim
    rows = (lambda x, n: x.reshape(n, -1), lambda x, p: x[p])
    if kind.startswith("mlp.experts."):
        return [("experts-permuted", spec.num_experts, *rows)]
    if kind.startswith("mlp.router."):
        return [("router-rows-permuted", spec.num_experts, *rows)]
    heads = {"self_attn.q_proj": spec.num_heads, "self_attn.k_proj": spec.num_kv_heads,
             "self_attn.v_proj": spec.num_kv_heads}
    for proj, n in heads.items():
        if kind.startswith(proj + "."):
            return [("heads-permuted", n, lambda x, n: x.reshape(n, -1),
                     lambda x, p, n=n: x.reshape(n, -1)[p].reshape(x.shape))]
    if kind == "self_attn.o_proj.weight":
        n = spec.num_heads

        def cols(x, n):
            return x.reshape(x.shape[0], n, d).transpose(0, 1).reshape(n, -1)

        def permute(x, p):
            return x.reshape(x.shape[0], n, d)[:, p].reshape(x.shape)
        return [("heads-permuted", n, cols, permute)]
    if kind == "self_attn.sinks":
        return [("heads-permuted", spec.num_heads, *rows)]
    return []


def find_permutation(a: torch.Tensor, b: torch.Tensor) -> list[int] | None:
    """p with b[j] ≈ a[p[j]] for slices a, b [n, m], by nearest fingerprint; None unless p is a
    bijection other than the identity. Fingerprints: up to 64 spread elements and the slice's
    sum and sum of squares (a permutation moves whole slices, so those match up to rounding)."""
    n, m = a.shape
    if n < 2 or b.shape != a.shape:
        return None
    idx = torch.linspace(0, m - 1, min(m, 64)).round().long()

    def prints(x: torch.Tensor) -> torch.Tensor:
        rows = [torch.cat([x[i, idx].double(), torch.stack([x[i].double().sum(), x[i].double().square().sum().sqrt()])])
                for i in range(n)]
        return torch.stack(rows)
    pa, pb = prints(a), prints(b)
    dist = torch.cdist(pb, pa)
    p = dist.argmin(dim=1).tolist()
    if sorted(p) != list(range(n)) or p == list(range(n)):
        return None
    return p


def _permutations(ctx: Context) -> list[Candidate]:
    if not ctx.same_shape:
        return []
    out = []
    for transform, n, slicer, apply in _slices(ctx):
        if ctx.a_dense.numel() % n:
            continue
        p = find_permutation(slicer(ctx.a_dense, n), slicer(ctx.b_dense, n))
        if p is not None:
            moved = [(j, i) for j, i in enumerate(p) if i != j]
            shown = ", ".join(f"B[{j}]=A[{i}]" for j, i in moved[:8]) + (" ..." if len(moved) > 8 else "")
            out.append(Candidate(transform, f"{len(moved)} of {n} moved: {shown}", apply(ctx.a_dense, p)))
    return out


def _sign_flips(ctx: Context) -> list[Candidate]:
    """Slices along the first dimension (rows; experts; elements of a vector) that B negates."""
    if not ctx.same_shape or not ctx.a_dense.numel():
        return []
    a, b = ctx.a_dense, ctx.b_dense
    n = a.shape[0] if a.dim() else 1
    flat_a, flat_b = a.reshape(n, -1).double(), b.reshape(n, -1).double()
    norm = flat_b.norm(dim=1).clamp_min(1e-300)
    negated = ((flat_a + flat_b).norm(dim=1) < 0.01 * norm) & ((flat_a - flat_b).norm(dim=1) > 0.01 * norm)
    if not bool(negated.any()):
        return []
    sign = torch.where(negated, -1.0, 1.0).to(a.dtype)
    values = a * sign.reshape(n, *([1] * (a.dim() - 1)))
    rows = negated.nonzero().flatten().tolist()
    what = "the whole tensor" if len(rows) == n else f"{len(rows)} of {n} slices along dim 0: {_ranges(rows)}"
    return [Candidate("sign-flip", f"B = -A on {what}", values)]


def _ranges(xs: list[int]) -> str:
    parts, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts[:12]) + (" ..." if len(parts) > 12 else "")


def _factor(ctx: Context) -> list[Candidate]:
    """B = c·A (least squares c) and B = A + c: a scalar factor (sinks scaled), a constant offset."""
    if not ctx.same_shape or not ctx.a_dense.numel():
        return []
    ab = aa = diff = 0.0
    count = 0
    from .tensors import chunk_pairs
    for x, y in chunk_pairs(ctx.a_dense, ctx.b_dense):
        ab += float((x * y).sum())
        aa += float((x * x).sum())
        diff += float((y - x).sum())
        count += x.numel()
    out = []
    if aa and math.isfinite(ab) and abs(ab / aa - 1) > _NOT_ONE and abs(ab / aa + 1) > _NOT_ONE:
        c = ab / aa
        k = round(math.log2(abs(c))) if c else 0
        pow2 = c > 0 and abs(c - 2.0 ** k) < 1e-3 * 2.0 ** k
        note = f" = 2^{k}" if pow2 else ""
        d = ctx.spec_a.head_dim
        if ctx.kind == "self_attn.sinks":
            if abs(c - 1 / math.sqrt(d)) < 1e-3 / math.sqrt(d):
                note += f" = 1/sqrt(head_dim {d}): the sink went through the score scale"
            elif abs(c - math.sqrt(d)) < 1e-3 * math.sqrt(d):
                note += f" = sqrt(head_dim {d})"
            transform = "sinks-scaled"
        else:
            transform = "scalar-factor"
            if pow2 and is_expert_weight(ctx.name):
                note += f" (the signature of MXFP4 scales decoded with bias {SCALE_BIAS - k} instead of {SCALE_BIAS})"
        out.append(Candidate(transform, f"B = {c:.6g} x A{note}", ctx.a_dense * c))
    if count and abs(diff / count) > _NOT_ONE * max(1.0, math.sqrt(aa / count)):
        c = diff / count
        out.append(Candidate("constant-offset", f"B = A + {c:.6g}", ctx.a_dense + c))
    return out


PROBES: tuple[Probe, ...] = (_vocab, _mxfp4_bytes, _reorder, _permutations, _some_experts, _sign_flips, _factor)


# ---- across the q, k, v projections of one layer ----------------------------------------------------
def grouped_order(spec: ModelSpec) -> list[int]:
    """Megatron's fused QKV row blocks (one head each), per KV group [q heads of g; k_g; v_g], as
    indices into the flat order [q heads; k heads; v heads]."""
    nq, nkv, qpk = spec.num_heads, spec.num_kv_heads, spec.q_per_kv
    order = []
    for g in range(nkv):
        order += list(range(g * qpk, (g + 1) * qpk)) + [nq + g, nq + nkv + g]
    return order


def diagnose_qkv(layer: int, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], spec: ModelSpec
                 ) -> Diagnosis | None:
    """Head blocks moved between q, k and v of one layer (`a`, `b`: projection -> dense tensor, for
    one kind, weight or bias): B's fused rows are A's in Megatron's grouped order read as flat
    (or the reverse), or some other permutation of heads across the three."""
    d = spec.head_dim
    fa = torch.cat([a[p] for p in ("q_proj", "k_proj", "v_proj")]).float()
    fb = torch.cat([b[p] for p in ("q_proj", "k_proj", "v_proj")]).float()
    n = fa.shape[0] // d
    if fa.shape != fb.shape or fa.shape[0] % d:
        return None
    p = find_permutation(fa.reshape(n, -1), fb.reshape(n, -1))
    if p is None:
        return None
    residual = rel_l2(fa.reshape(n, -1)[p], fb.reshape(n, -1))
    if residual > EXPLAINED["BF16"][0]:
        return None
    exact = residual == 0.0
    order = grouped_order(spec)
    inverse = [order.index(j) for j in range(n)]
    if p == order:
        return Diagnosis("qkv-not-grouped-by-kv-head", "B's q, k, v rows are A's in Megatron's per-KV-group order "
                         "[q heads of g; k_g; v_g] split as if flat [Q; K; V]", exact, residual)
    if p == inverse:
        return Diagnosis("qkv-not-grouped-by-kv-head", "B's q, k, v are A's flat [Q; K; V] rows split as if "
                         "grouped per KV head [q heads of g; k_g; v_g]", exact, residual)
    moved = [(j, i) for j, i in enumerate(p) if i != j]

    def label(i: int) -> str:
        nq, nkv = spec.num_heads, spec.num_kv_heads
        return f"q{i}" if i < nq else (f"k{i - nq}" if i < nq + nkv else f"v{i - nq - nkv}")
    shown = ", ".join(f"{label(j)}<-{label(i)}" for j, i in moved[:8]) + (" ..." if len(moved) > 8 else "")
    return Diagnosis("heads-permuted", f"head blocks moved across q/k/v: {shown}", exact, residual)
