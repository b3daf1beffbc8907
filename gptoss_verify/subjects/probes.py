"""Feature probes that need only logits: crafted cases on which one GPT-OSS feature decides the
logits and the others cannot (docs/subjects.md, "The probes").

Each probe builds a tiny model whose weights are zero except what its feature needs: attention
that is not probed has o_proj = 0, a MoE that is not probed has down = 0, norm weights are 1
(so the cast order cannot matter) and residuals are large (so eps cannot), sequences not probing
the window are shorter than it, queries and keys not probing RoPE are zero or live on the one
frequency both pairings share, and the YaRN probes alone use YaRN's numbers (the others use
rope_factor 1). The readout is the identity: logits[v] = final_norm(x)[v] for v < hidden.

A probe runs the subject on its case and judges its logits against our float64 truth with the one
judge (kind `probe`: 2 × our plain reference's error in the same dtype + the floor; the cast-order
probe uses kind `rounding`). The decode probe compares the subject's KV-cache decode with its own
prefill (kind `probe`, our reference's decode/prefill gap as the reference); it needs the optional
`decode(case, prefill)` method of the protocol and is "not applicable" without it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from ..config import ModelSpec
from ..judge import Verdict, check, measure, verdict
from ..schema import canonical_shapes
from .protocol import Case, SubjectError, SubjectUnavailable, validate_output

KIND, ROUNDING = "probe", "rounding"

# Every probe's shapes: GQA 2:1, head_dim 16, 4 heads × 16 = hidden (so o_proj can be the
# identity), widths multiples of 32 (MXFP4), a window of 8, a sliding layer 0 and a full layer 1.
BASE = ModelSpec(vocab_size=128, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, num_experts=4, experts_per_token=2, sliding_window=8,
                 rope_factor=1.0, name="probe")
YARN = BASE.replace(rope_factor=32.0, name="probe-yarn")  # the published YaRN numbers (context 4096)
W = BASE.sliding_window
H = BASE.hidden_size
D = BASE.head_dim


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str
    feature: str        # what a failure names
    isolates: str       # one line: what the case makes decisive
    build: Callable[[torch.dtype], "ProbeCase"]
    decode: bool = False


@dataclasses.dataclass(frozen=True)
class ProbeCase:
    case: Case | None
    kind: str = KIND
    not_applicable: str = ""   # why this probe says nothing in this dtype
    prefill: int = 0           # decode probes: tokens prefilled before one-by-one decoding


@dataclasses.dataclass
class ProbeResult:
    name: str
    feature: str
    passed: bool               # not applicable counts as passed (nothing failed)
    error: float
    bound: float
    applicable: bool = True
    note: str = ""             # why not applicable, or what the subject raised
    verdict: Verdict | None = None

    def __str__(self) -> str:
        if not self.applicable:
            return f"n/a probe {self.name} ({self.feature}): {self.note}"
        word = "PASS" if self.passed else "FAIL"
        return f"{word} probe {self.name} (feature: {self.feature}): " + (str(self.verdict) if self.verdict else self.note)


# ---- building blocks -------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blank(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Every tensor zero (float64), norm weights 1, the identity readout."""
    state = {n: torch.zeros(s, dtype=torch.float64) for n, s in canonical_shapes(spec).items()}
    for n in state:
        if n.endswith("layernorm.weight") or n == "model.norm.weight":
            state[n].fill_(1.0)
    state["lm_head.weight"][:spec.hidden_size] = torch.eye(spec.hidden_size, dtype=torch.float64)
    return state


def L(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def _case(spec, state, ids, dtype, offset=0, mxfp4: bool = True) -> Case:
    """Expert weights put on the MXFP4 grid (so subjects that write and load MXFP4 run the same
    model) but handed over dense: only the mxfp4 probe's case holds blocks and scales, so a
    subject's own MXFP4 decoder is judged there alone."""
    from ..formats import canonical
    if mxfp4:
        state = dict(canonical.to_dense(canonical.to_mxfp4(
            (n, t.float() if n.endswith(("gate_up_proj", "down_proj")) else t) for n, t in state.items()),
            torch.float32))
    return Case(spec, ids, offset, dtype, state)


def _ids(batch: int, seq: int, spec: ModelSpec = BASE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (batch, seq), generator=_gen(seed))


def _attention_scaffold(spec: ModelSpec, layers=(0, 1), seed: int = 0) -> dict[str, torch.Tensor]:
    """Large random embeddings (rms 32: eps is invisible), v a random function of the token,
    o_proj the identity on the given layers (their attention reaches the residual), sinks −80
    (negligible), q = k = 0 (uniform scores), the MoE zero."""
    s = blank(spec)
    g = _gen(seed)
    s["model.embed_tokens.weight"] = torch.randn(spec.vocab_size, H, generator=g, dtype=torch.float64) * 32
    for i in range(spec.num_layers):
        s[L(i, "self_attn.sinks")].fill_(-80.0)
        if i in layers:
            nkv = spec.num_kv_heads * D
            s[L(i, "self_attn.v_proj.weight")] = torch.randn(nkv, H, generator=g, dtype=torch.float64) * 32 / 8
            s[L(i, "self_attn.o_proj.weight")] = torch.eye(H, dtype=torch.float64)
    return s


def _qk_bias(s, spec, layer, energy: dict[int, float]) -> None:
    """q = k = a constant per head with q_d² = energy[d] (scores then depend only on distance)."""
    for name, heads in (("q_proj", spec.num_heads), ("k_proj", spec.num_kv_heads)):
        b = s[L(layer, f"self_attn.{name}.bias")].view(heads, D)
        for d, e in energy.items():
            b[:, d] = math.sqrt(e)


# ---- attention probes ------------------------------------------------------------------------
def sinks_small(dtype):
    s = _attention_scaffold(BASE)
    s[L(0, "self_attn.sinks")] = torch.tensor([-1.5, 0.5, 1.5, 3.0], dtype=torch.float64)
    s[L(1, "self_attn.sinks")] = torch.tensor([2.5, -0.5, 1.0, 0.0], dtype=torch.float64)
    return ProbeCase(_case(BASE, s, _ids(2, W - 1), dtype))


def sinks_large(dtype):
    """Scores ≈ 97 on every key (q·k on the slowest frequency, the one both pairings share) and
    sinks of 93..100: the sink takes most of the mass, and exp() overflows without the row max."""
    s = _attention_scaffold(BASE)
    for i in (0, 1):
        _qk_bias(s, BASE, i, {D - 1: 97.0 * math.sqrt(D)})
        s[L(i, "self_attn.sinks")] = torch.tensor([100.0, 98.0, 96.0, 93.0], dtype=torch.float64) - i
    return ProbeCase(_case(BASE, s, _ids(2, W - 1), dtype))


def window(seq: int, seed: int):
    def build(dtype):
        return ProbeCase(_case(BASE, _attention_scaffold(BASE), _ids(2, seq, seed=seed), dtype))
    return build


def rope_pairing(dtype):
    """q = k on dims 0 and 1: pairs (d, d + D/2) rotate them at two frequencies, pairs (2d, 2d+1)
    at one."""
    s = _attention_scaffold(BASE, layers=(0,))
    _qk_bias(s, BASE, 0, {0: 8.0, 1: 8.0})
    return ProbeCase(_case(BASE, s, _ids(2, W - 1), dtype))


# q_d² on dims whose frequency weights agree under both pairings (e_i + e_{i+8} = e_2i + e_2i+1):
# frequencies 3 (inside the YaRN correction range), 5, 6 and 7; none of the fast ones, whose
# float32 angles at large positions differ between correct implementations.
YARN_ENERGY = {6: 1.0, 7: 1.0, 14: 1.0, 11: 2.0, 13: 2.0}


def yarn(offset: int):
    def build(dtype):
        s = _attention_scaffold(YARN, layers=(1,))
        _qk_bias(s, YARN, 1, {d: 4.0 * e for d, e in YARN_ENERGY.items()})
        s[L(1, "self_attn.v_proj.weight")] *= 8  # an average over 96 keys: larger values reach the logits
        return ProbeCase(_case(YARN, s, _ids(1, 96, YARN, seed=3), dtype, offset=offset))
    return build


# ---- MoE probes ------------------------------------------------------------------------------
def _moe_scaffold(spec: ModelSpec, angles: torch.Tensor, seed: int = 0):
    """Attention zero; token t's embedding 256·(cos θ_t, sin θ_t, 1, 0, …), so the MoE input is
    h_t = 8/√2·(cos θ_t, sin θ_t, 1, 0, …); every expert identical unless a probe says otherwise;
    router bias 30 on experts 0 and 1 (both chosen, weights ½ each, whatever the order rule)."""
    s = blank(spec)
    emb = s["model.embed_tokens.weight"]
    n = len(angles)
    emb[:n, 0], emb[:n, 1], emb[:n, 2] = angles.cos() * 256, angles.sin() * 256, 256.0
    s[L(0, "mlp.router.bias")][:2] = 30.0
    ids = torch.arange(n)[None, :]
    return s, ids


def _experts(s, gate_up_col: torch.Tensor, down_scale: float, seed: int = 1, gate_up_bias: float = 0.0,
             down_bias: float = 0.0, e=None, layer=0):
    """Expert weights: every gate_up column the same vector (so gate and up see the same
    pre-activation and no pairing can change it), a random down projection."""
    spec_e = s[L(layer, "mlp.experts.gate_up_proj")].shape[0]
    which = range(spec_e) if e is None else [e]
    g = _gen(seed)
    down = torch.randn(s[L(layer, "mlp.experts.down_proj")].shape[1:], generator=g, dtype=torch.float64)
    for x in which:
        s[L(layer, "mlp.experts.gate_up_proj")][x] = gate_up_col[:, None]
        s[L(layer, "mlp.experts.gate_up_proj_bias")][x] = gate_up_bias
        s[L(layer, "mlp.experts.down_proj")][x] = down * down_scale
        s[L(layer, "mlp.experts.down_proj_bias")][x] = down_bias


H_SCALE = 8 / math.sqrt(2)  # |h| components of the MoE scaffold


def _preact_col(p_scale: float) -> torch.Tensor:
    """gate_up column reading h_0 (= H_SCALE·cos θ): pre-activation p = p_scale·cos θ."""
    col = torch.zeros(H, dtype=torch.float64)
    col[0] = p_scale / H_SCALE
    return col


def clamp(pre: list[float], down_scale: float):
    """Gate and up pre-activations equal to p (from the weights, bias 0: the clamp/bias order
    cannot matter) at the values given; `pre` of magnitude 20 at most."""
    def build(dtype):
        angles = torch.tensor([math.acos(p / 20.0) for p in pre], dtype=torch.float64)
        s, ids = _moe_scaffold(BASE, angles)
        # fp16 holds at most 65504: a smaller readout gain there
        _experts(s, _preact_col(20.0), min(down_scale, 4e3) if dtype == torch.float16 else down_scale)
        return ProbeCase(_case(BASE, s, ids, dtype))
    return build


def clamp_bias_order(dtype):
    """x·W = ±10 with a bias of ∓5: clamp(x·W + b) is inactive, clamp(x·W) + b is not."""
    pre = [10.0, 9.0, 8.0, -10.0, -9.0, -8.0]
    angles = torch.tensor([math.acos(p / 20.0) for p in pre], dtype=torch.float64)
    s, ids = _moe_scaffold(BASE, angles)
    for x in range(BASE.num_experts):
        _experts(s, _preact_col(20.0), 2.0, e=x)
    bias = s[L(0, "mlp.experts.gate_up_proj_bias")]
    # tokens 0-2 positive: bias −5; tokens 3-5 negative: a second expert pair with bias +5
    bias[:2] = -5.0
    bias[2:] = 5.0
    router = s[L(0, "mlp.router.weight")]
    router[:2, 0], router[2:, 0] = 40.0 / H_SCALE, -40.0 / H_SCALE  # sign of cos θ picks the pair
    s[L(0, "mlp.router.bias")].zero_()
    return ProbeCase(_case(BASE, s, ids, dtype))


def interleave(dtype):
    """Even gate_up columns (gate) read h_0, odd ones (up) read h_1: different pre-activations,
    all inside the clamp."""
    angles = torch.linspace(0.3, 5.9, 12, dtype=torch.float64)
    s, ids = _moe_scaffold(BASE, angles)
    gu = s[L(0, "mlp.experts.gate_up_proj")]
    g = _gen(5)
    down = torch.randn(BASE.intermediate_size, H, generator=g, dtype=torch.float64)
    for x in range(BASE.num_experts):
        gu[x, 0, 0::2] = 5.0 / H_SCALE
        gu[x, 1, 1::2] = -4.0 / H_SCALE
        s[L(0, "mlp.experts.down_proj")][x] = down * 8
    return ProbeCase(_case(BASE, s, ids, dtype))


def expert_biases(dtype):
    """gate_up and down biases non-zero, two experts chosen with weight ½ each, clamp inactive."""
    angles = torch.linspace(0.3, 5.9, 12, dtype=torch.float64)
    s, ids = _moe_scaffold(BASE, angles)
    g = _gen(6)
    _experts(s, _preact_col(3.0), 4.0, gate_up_bias=1.5, down_bias=0.0)
    db = torch.randn(H, generator=g, dtype=torch.float64) * 64
    s[L(0, "mlp.experts.down_proj_bias")][:] = db
    return ProbeCase(_case(BASE, s, ids, dtype))


ROUTER = BASE.replace(num_experts=8, name="probe-router")


def router_order(dtype):
    """Eight experts with their own down projections, router logits 2·cos(θ_t − φ_e) (no bias):
    the top-2 weights differ between a softmax over the two and one over all eight."""
    angles = torch.tensor([0.2 + 0.53 * t for t in range(12)], dtype=torch.float64)
    s, ids = _moe_scaffold(ROUTER, angles)
    s[L(0, "mlp.router.bias")].zero_()
    g = _gen(7)
    phi = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    r = s[L(0, "mlp.router.weight")]
    r[:, 0], r[:, 1] = 2 * phi.cos() / H_SCALE, 2 * phi.sin() / H_SCALE
    for x in range(8):
        s[L(0, "mlp.experts.gate_up_proj")][x, 2, :] = 2.5 / H_SCALE  # p = 2.5 for every token
        s[L(0, "mlp.experts.down_proj")][x] = torch.randn(BASE.intermediate_size, H, generator=g,
                                                         dtype=torch.float64) * 8
    return ProbeCase(_case(ROUTER, s, ids, dtype))


def router_bias(dtype):
    """Without the bias experts 0/1 (by the weights) would win; with it, 2/3 (bias 20 and 19.5)."""
    angles = torch.linspace(-0.6, 0.6, 12, dtype=torch.float64)
    s, ids = _moe_scaffold(ROUTER, angles)
    s[L(0, "mlp.router.bias")].zero_()
    s[L(0, "mlp.router.bias")][2:4] = torch.tensor([20.0, 19.5], dtype=torch.float64)
    r = s[L(0, "mlp.router.weight")]
    r[0, 0], r[1, 0] = 3.0 / H_SCALE, 2.5 / H_SCALE
    r[2, 1], r[3, 1] = 1.0 / H_SCALE, -1.0 / H_SCALE
    g = _gen(8)
    for x in range(8):
        s[L(0, "mlp.experts.gate_up_proj")][x, 2, :] = 2.5 / H_SCALE
        s[L(0, "mlp.experts.down_proj")][x] = torch.randn(BASE.intermediate_size, H, generator=g,
                                                         dtype=torch.float64) * 8
    return ProbeCase(_case(ROUTER, s, ids, dtype))


# ---- RMSNorm probes --------------------------------------------------------------------------
def norm_eps(dtype):
    """Everything zero but the embedding, of mean square 1e-5: the final norm's eps decides."""
    s = blank(BASE)
    s["model.embed_tokens.weight"] = torch.randn(BASE.vocab_size, H, generator=_gen(9), dtype=torch.float64) * 3.2e-3
    return ProbeCase(_case(BASE, s, _ids(2, 8), dtype))


MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def norm_cast_order(dtype):
    """Normalised values n = 1 + δ just below the dtype's tie above 1, times a weight of 3: rounding
    w·n once gives 3 + 2 ulps, rounding n first gives 3 (not correctly rounded). Judged by the
    rounding kind: only in a dtype narrower than the norm's float32."""
    if dtype not in MANTISSA:
        return ProbeCase(None, ROUNDING, f"the cast order has no effect in {str(dtype).removeprefix('torch.')} "
                                         f"(the norm computes in it)")
    m = MANTISSA[dtype]
    s = blank(BASE)
    n_a = 16  # dims holding 1.0 (weight 3); the rest hold y (weight 1) and set the rms
    spacing = 2.0 ** -(m + 1)  # below 1
    rows = []
    for target in (0.8, 0.85, 0.9):
        want = 1.0 / (1.0 + target * 2.0 ** -(m + 1))  # the rms that puts n_a at 1 + target·2^-(m+1)
        y2 = (H * (want ** 2 - BASE.rms_norm_eps) - n_a) / (H - n_a)
        best = None
        for k in range(-40, 41):  # y on the dtype's grid near √y2, z adjusts the mean square finely
            y = round(math.sqrt(y2) / spacing) * spacing + k * spacing
            rest = H * (want ** 2 - BASE.rms_norm_eps) - n_a - (H - n_a - 1) * y * y
            if rest <= 0:
                continue
            z = float(torch.tensor(math.sqrt(rest), dtype=torch.float64).to(dtype).double())
            ms = (n_a + (H - n_a - 1) * y * y + z * z) / H + BASE.rms_norm_eps
            delta = (1.0 / math.sqrt(ms) - 1.0) / 2.0 ** -(m + 1)
            if best is None or abs(delta - target) < abs(best[0] - target):
                best = (delta, y, z)
        _, y, z = best
        rows.append([1.0] * n_a + [y] * (H - n_a - 1) + [z])
    s["model.embed_tokens.weight"][:3] = torch.tensor(rows, dtype=torch.float64)
    s["model.norm.weight"][:n_a] = 3.0
    return ProbeCase(_case(BASE, s, torch.tensor([[0, 1, 2, 0]]), dtype), ROUNDING)


# ---- MXFP4 -----------------------------------------------------------------------------------
def mxfp4_exponents(dtype: torch.dtype) -> list[int]:
    """Scale exponents whose decoded values the dtype holds and a SwiGLU activation (≤ 42) can
    bring to the logits: 2^-8 .. 2^127 (fp16: 2^-8 .. 2^13)."""
    top = 13 if dtype == torch.float16 else 127
    return list(range(-8, top + 1))


def mxfp4(dtype):
    """One expert per scale exponent s: its down blocks all at scale 2^s with random e2m1 codes
    (all 16, ±0 and ±6 among them; magnitudes capped where 6·2^s would overflow), its activation
    ≈ 2^-s (gate = up = a bias), so every scale lands in the logits at the same size. Token t's
    embedding is a ±1 pattern the router matches to expert t alone (margin ≥ 30 logits). The
    case holds the expert weights as MXFP4 blocks and scales: only a subject that decodes MXFP4
    itself (an MXFP4 checkpoint, the state's blocks) is tested by it."""
    from ..formats.mxfp4 import FP4_VALUES
    exps = mxfp4_exponents(dtype)
    e = len(exps)
    spec = BASE.replace(num_experts=e, vocab_size=max(128, e), name="probe-mxfp4")
    s = blank(spec)
    g = _gen(11)
    signs = torch.randint(0, 2, (e, H), generator=g).double() * 2 - 1
    s["model.embed_tokens.weight"][:e] = signs * 4   # h = the ±1 pattern itself
    s[L(0, "mlp.router.weight")] = signs.clone()
    inter = spec.intermediate_size
    codes = torch.randint(0, 16, (e, H, inter), generator=g)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    for x, sx in enumerate(exps):
        if sx >= 126:  # 6·2^126 overflows float32: magnitudes up to 3 (2^126) or 1.5 (2^127)
            cap = 6 if sx == 126 else 4   # magnitude codes 0..cap-1
            c = codes[x]
            codes[x] = (c & 8) | ((c & 7) % cap)
    vals = lut[codes]                                  # [E, H(out), I(in)]
    col_sum = vals.abs().sum(-1).mean(-1)              # typical |column sum| scale per expert
    for x, sx in enumerate(exps):
        # the activation that brings the expert's output to about 16, within what SwiGLU and the
        # dtype's normal range allow; the token's embedding is scaled to the output it gets
        act = min(max(16.0 / (2.0 ** sx * float(col_sum[x])), 2.0 ** -110), 40.0)
        s["model.embed_tokens.weight"][x] *= act * 2.0 ** sx * float(col_sum[x]) / 16.0
        # act ≈ v·σ(αv)·(v + 1) for gate = up = v: solve by bisection
        lo, hi = 0.0, 6.0
        f = lambda v: v / (1 + math.exp(-BASE.swiglu_alpha * v)) * (v + 1)  # noqa: E731
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < act else (lo, mid)
        s[L(0, "mlp.experts.gate_up_proj_bias")][x] = hi
    state = dict(s)
    del state[L(0, "mlp.experts.down_proj")], state[L(0, "mlp.experts.gate_up_proj")]
    del state[L(1, "mlp.experts.down_proj")], state[L(1, "mlp.experts.gate_up_proj")]
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)   # low nibble first
    state[L(0, "mlp.experts.down_proj_blocks")] = packed.reshape(e, H, inter // 32, 16)
    state[L(0, "mlp.experts.down_proj_scales")] = torch.tensor(exps, dtype=torch.int64)[:, None, None] \
        .expand(e, H, inter // 32).add(127).to(torch.uint8).contiguous()
    for i in (0, 1):  # zero blocks (scale 127) for the weights that are not probed
        state[L(i, "mlp.experts.gate_up_proj_blocks")] = torch.zeros(e, 2 * inter, H // 32, 16, dtype=torch.uint8)
        state[L(i, "mlp.experts.gate_up_proj_scales")] = torch.full((e, 2 * inter, H // 32), 127, dtype=torch.uint8)
    state[L(1, "mlp.experts.down_proj_blocks")] = torch.zeros(e, H, inter // 32, 16, dtype=torch.uint8)
    state[L(1, "mlp.experts.down_proj_scales")] = torch.full((e, H, inter // 32), 127, dtype=torch.uint8)
    ids = torch.arange(e).reshape(1, e)
    return ProbeCase(Case(spec, ids, 0, dtype, state))


# ---- KV cache --------------------------------------------------------------------------------
def decode(dtype):
    """The window probe's weights, 2W + 2 tokens: W + 2 prefilled (longer than the window), the
    rest decoded one by one against a cache that must hold the last W − 1 keys of the sliding
    layer and every key of the full one."""
    return ProbeCase(_case(BASE, _attention_scaffold(BASE), _ids(2, 2 * W + 2, seed=2), dtype), prefill=W + 2)


SINKS, WINDOW, YARN_F, ROPE = "attention sinks", "sliding window", "YaRN", "RoPE pairing (d, d + D/2)"
CLAMP, ORDER = "SwiGLU clamp (gate above only, up both sides)", "clamp after the gate_up bias"

PROBES: dict[str, Probe] = {p.name: p for p in [
    Probe("sinks-small", SINKS, "q = k = 0 (uniform scores), per-head sinks −1.5..3, 7 tokens (< W)", sinks_small),
    Probe("sinks-large", SINKS, "scores ≈ 97, per-head sinks 93..100: the sink dominates; exp overflows without the max",
          sinks_large),
    Probe("window-short", WINDOW, "q = k = 0, 6 tokens (< W): every key is seen", window(W - 2, 1)),
    Probe("window-edge", WINDOW, "q = k = 0, W tokens: the last query must see the key at distance W − 1",
          window(W, 2)),
    Probe("window-long", WINDOW, "q = k = 0, 3W tokens: distance W unseen on layer 0, seen on full layer 1",
          window(3 * W, 3)),
    Probe("rope-pairing", ROPE, "q = k on dims 0, 1: the two pairings rotate them differently", rope_pairing),
    Probe("yarn-range", YARN_F, "YaRN numbers, q·k on frequencies 3 (the correction ramp), 5, 6, 7, "
          "full layer, 96 tokens", yarn(0)),
    Probe("yarn-long", YARN_F, "yarn-range at positions 4900..4995 (past the original 4096)", yarn(4900)),
    Probe("clamp-inactive", CLAMP, "gate = up pre-activations in (−7, 7): no clamp", clamp([-6.5, -3, 0.5, 3, 6.5], 2.0)),
    Probe("clamp-upper", CLAMP, "gate = up = 8..20: both clamped at 7", clamp([8, 10, 14, 20], 2.0)),
    Probe("clamp-lower", CLAMP, "gate = up = −8..−20: up clamped at −7, gate not", clamp([-8, -10, -14, -20], 2e5)),
    Probe("clamp-bias-order", ORDER, "x·W = ±10 with bias ∓5: inactive only if the clamp follows the bias",
          clamp_bias_order),
    Probe("swiglu-interleave", "SwiGLU gate/up interleave (even gate, odd up)",
          "even and odd gate_up columns read different inputs", interleave),
    Probe("router-order", "router: top-k, then softmax over the k", "8 experts, unbiased logits 2·cos(θ − φ_e)",
          router_order),
    Probe("router-bias", "router bias", "the bias (20, 19.5) moves the choice from experts 0, 1 to 2, 3", router_bias),
    Probe("expert-biases", "expert biases (gate_up, down inside the weighted sum)",
          "identical experts, weights ½ and ½, gate_up bias 1.5, down bias random", expert_biases),
    Probe("norm-eps", "RMSNorm eps", "all zero but an embedding of mean square 1e-5", norm_eps),
    Probe("norm-cast-order", "RMSNorm cast order (weight times normalised in float32, one rounding)",
          "normalised values just below the tie above 1, weight 3 (bf16/fp16 only)", norm_cast_order),
    Probe("mxfp4", "MXFP4 decoding", "one expert per scale exponent 2^-8..2^127, random codes (±0, ±6)", mxfp4),
    Probe("decode", "KV-cache decode", "window-long's weights, W + 2 prefilled, W more decoded one by one past the window",
          decode, decode=True),
]}


# ---- running ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def probe_case(name: str, dtype: torch.dtype) -> ProbeCase:
    return PROBES[name].build(dtype)


@functools.lru_cache(maxsize=256)
def _baseline(name: str, dtype: torch.dtype):
    """Our float64 truth and plain reference (None in float64) on the probe's case; for the decode
    probe, our reference's decode and prefill in the dtype."""
    from .judging import truth_and_reference
    from .ours import Ours
    pc = probe_case(name, dtype)
    if PROBES[name].decode:
        ours = Ours("reference")
        rounded = dataclasses.replace(pc.case, state=pc.case.dense_state(), checkpoint=None)
        return ours.decode(rounded, pc.prefill).cpu(), ours.run(rounded).logits.cpu()
    truth, ref = truth_and_reference(pc.case)
    return truth.logits, None if ref is None else ref.logits


def _not_applicable(p: Probe, why: str) -> ProbeResult:
    return ProbeResult(p.name, p.feature, True, math.nan, math.nan, applicable=False, note=why)


def _failed(p: Probe, dtype, why: str) -> ProbeResult:
    return ProbeResult(p.name, p.feature, False, math.inf, math.nan, note=why)


def run_probe(subject, name: str, dtype: torch.dtype) -> ProbeResult:
    p = PROBES[name]
    dname = str(dtype).removeprefix("torch.")
    if dname not in subject.precisions:
        return _not_applicable(p, f"{subject.name} runs in {', '.join(subject.precisions)} only")
    pc = probe_case(name, dtype)
    if pc.case is None:
        return _not_applicable(p, pc.not_applicable)
    if p.decode and not callable(getattr(subject, "decode", None)):
        return _not_applicable(p, f"{subject.name} has no decode(case, prefill) (no KV cache exposed)")
    try:
        got = validate_output(subject.run(pc.case), pc.case, where=f"subject {subject.name}").logits.cpu()
        if p.decode:
            dec = validate_output(subject.decode(pc.case, pc.prefill), pc.case,
                                  where=f"subject {subject.name} decode").logits.cpu()
    except SubjectUnavailable as err:
        return _not_applicable(p, str(err))
    except SubjectError as err:  # NaN, infinity, wrong shapes: the feature failed outright
        return _failed(p, dtype, str(err))
    base = _baseline(name, dtype)
    if p.decode:  # decode equals prefill: the subject's gap, against our reference's gap
        ours_dec, ours_pre = base
        v = verdict(KIND, dtype, measure(KIND, dtype, dec, got), measure(KIND, dtype, ours_dec, ours_pre))
    elif pc.kind == ROUNDING:
        v = check(ROUNDING, dtype, got, base[0])
    else:
        truth, ref = base
        v = check(KIND, dtype, got, truth, truth if ref is None else ref)
    return ProbeResult(p.name, p.feature, v.passed, v.error, v.bound, verdict=v)


def run_probes(subject, dtype: torch.dtype, names=None) -> list[ProbeResult]:
    """Every probe (or those named) on `subject` in `dtype`."""
    return [run_probe(subject, n, dtype) for n in (names or PROBES)]


def failing_features(results: list[ProbeResult]) -> set[str]:
    return {r.feature for r in results if not r.passed}
