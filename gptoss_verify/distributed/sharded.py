"""One pipeline stage of GPT-OSS on one rank, computed from that rank's Megatron shard alone.

Megatron's parallel layout, and nothing converted back to the HF form first (a layout bug that
the converter makes symmetrically on write and read would otherwise pass):
- embedding: vocabulary-parallel, masked lookup of the rank's rows then an all-reduce over TP;
- fused QKV: column-parallel, the rank's whole query groups `[q of g; k_g; v_g]` split as
  megatron-core does (`view(ng_local, (q_per_kv + 2)·D)`, `mapping.ungroup_qkv`), its sinks by head;
- output projection: row-parallel, partial products all-reduced over TP, the (replicated) bias added once;
- MoE: replicated router; each EP rank takes a slice of the tokens, sends each (token, choice) to
  the EP rank holding that expert with all_to_all (counts exchanged first), which applies
  fc1 (`[gate; up]` halves), the clamped SwiGLU and fc2; results return the same way, are weighted
  at their source and all-gathered over EP. Experts are whole (expert TP = 1);
- output layer: vocabulary-parallel logits all-gathered over TP, padding columns dropped;
- PP: the residual stream goes stage to stage with send/recv.
The block math (RMSNorm, RoPE, sink attention, routing, SwiGLU) is the reference's own (`model/`);
the weights' names, and the two layout conversions applied to activations, are the Megatron
mapping table's (`formats/megatron/mapping.py`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import ModelSpec
from ..formats.megatron.files import Layout
from ..formats.megatron.mapping import interleave, name as megatron_name, ungroup_qkv
from ..model.attention import attention
from ..model.moe import route, swiglu
from ..model.norm import compute_dtype, rms_norm
from ..model.rope import apply_rope, cos_sin
from ..trace import Trace, layer_name
from .grid import Grid, Groups


class Stage:
    def __init__(self, spec: ModelSpec, layout: Layout, grid: Grid, groups: Groups, rank: int,
                 weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device):
        self.spec, self.layout, self.grid, self.groups, self.rank = spec, layout, grid, groups, rank
        self.t, self.p, self.s = grid.coords(rank)
        self.dtype, self.device = dtype, device
        self.w = {n: v.to(device=device, dtype=dtype) for n, v in weights.items()}
        self.layers = layout.stage_layers(spec, self.s)
        self.vocab = layout.vocab(spec)

    # ---- collectives ----------------------------------------------------------------------------
    def _tp_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid.tp > 1:
            dist.all_reduce(x, group=self.groups.tp)
        return x

    def _tp_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.grid.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.grid.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.groups.tp)
        return torch.cat(parts, dim=dim)

    # ---- embedding ------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w[megatron_name("embedding")]
        lo = self.t * table.shape[0]
        mine = (ids >= lo) & (ids < lo + table.shape[0])
        x = table[(ids - lo).clamp(0, table.shape[0] - 1)] * mine[..., None].to(table.dtype)
        return self._tp_sum(x)

    # ---- one layer ------------------------------------------------------------------------------
    def layer(self, local: int, x: torch.Tensor, cos, sin, trace: Trace | None) -> torch.Tensor:
        spec, w = self.spec, self.w
        glob = self.layers[local]
        mg = lambda key: megatron_name(key, local)  # noqa: E731
        name = lambda point: layer_name(glob, point)  # noqa: E731
        rec = (lambda n, v: trace.record(n, v)) if trace is not None else (lambda n, v: None)
        b, s, hdim = x.shape
        d, qpk = spec.head_dim, spec.q_per_kv
        rec(name("input"), x)
        h = rms_norm(x, w[mg("input_norm")], spec.rms_norm_eps)
        rec(name("attn_norm"), h)
        qkv = torch.nn.functional.linear(h, w[mg("qkv_weight")], w[mg("qkv_bias")])
        q, k, v = (t.view(b, s, -1, d) for t in ungroup_qkv(qkv, qpk, d, dim=-1))  # [ng_local, (q_per_kv + 2)·D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if trace is not None:
            for point, tensor in (("q", q), ("k", k), ("v", v)):
                rec(name(point), self._tp_gather(tensor, dim=2))
        sinks = w[mg("sinks")]
        core = attention(q, k, v, sinks, window=spec.window_of(glob)).reshape(b, s, -1)
        if trace is not None:
            rec(name("attn_core"), self._tp_gather(core, dim=-1))
        partial = torch.nn.functional.linear(core, w[mg("proj_weight")])
        a = self._tp_sum(partial) + w[mg("proj_bias")]
        rec(name("attn_out"), a)
        x = x + a
        rec(name("resid_attn"), x)
        h = rms_norm(x, w[mg("mlp_norm")], spec.rms_norm_eps)
        rec(name("mlp_norm"), h)
        m = self.moe(local, h.reshape(-1, hdim), trace, name, b).view(b, s, hdim)
        rec(name("mlp_out"), m)
        x = x + m
        rec(name("resid_mlp"), x)
        return x

    # ---- experts over EP ------------------------------------------------------------------------
    def moe(self, local: int, h: torch.Tensor, trace: Trace | None, name, batch: int) -> torch.Tensor:
        spec, w = self.spec, self.w
        k = spec.experts_per_token
        router = w[megatron_name("router_weight", local)], w[megatron_name("router_bias", local)]
        logits, idx, weights = route(h, *router, k)
        if trace is not None:
            for point, tensor in (("router_logits", logits), ("topk_idx", idx), ("topk_weights", weights)):
                trace.record(name(point), tensor.view(batch, h.shape[0] // batch, -1))
        P = self.grid.ep
        per = spec.num_experts // P
        # my slice of the tokens (every EP rank holds all of them; each dispatches its own share)
        bounds = [len(c) for c in torch.arange(h.shape[0]).tensor_split(P)]
        start = sum(bounds[:self.p])
        mine = slice(start, start + bounds[self.p])
        h_mine, idx_mine, w_mine = h[mine], idx[mine], weights[mine]
        token = torch.arange(h_mine.shape[0], device=h.device)[:, None].expand_as(idx_mine).reshape(-1)
        expert = idx_mine.reshape(-1)
        dest = expert // per
        order = torch.argsort(dest, stable=True)
        token, expert, dest = token[order], expert[order], dest[order]
        send_counts = torch.bincount(dest, minlength=P)
        rows_out = h_mine[token]
        experts_out = expert - dest * per  # local expert index on the receiving rank
        if P > 1:
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.groups.ep)
            sc, rc = send_counts.tolist(), recv_counts.tolist()
            rows_in = h.new_empty(sum(rc), h.shape[1])
            dist.all_to_all_single(rows_in, rows_out.contiguous(), rc, sc, group=self.groups.ep)
            experts_in = experts_out.new_empty(sum(rc))
            dist.all_to_all_single(experts_in, experts_out.contiguous(), rc, sc, group=self.groups.ep)
        else:
            rows_in, experts_in = rows_out, experts_out
        y_in = self.rank_experts(local, rows_in, experts_in)
        if P > 1:
            y_out = h.new_empty(rows_out.shape[0], h.shape[1])
            dist.all_to_all_single(y_out, y_in.contiguous(), sc, rc, group=self.groups.ep)
        else:
            y_out = y_in
        # combine at the source: Σ_k w_k · y_k, accumulated wide, in expert order as the reference does
        flat_w = w_mine.reshape(-1)[order]
        out = torch.zeros(h_mine.shape, dtype=compute_dtype(h.dtype), device=h.device)
        for e in torch.unique(expert).tolist():
            sel = expert == e
            out.index_add_(0, token[sel], (y_out[sel] * flat_w[sel, None]).to(out.dtype))
        out = out.to(h.dtype)
        if P == 1:
            return out
        parts = [h.new_empty(max(bounds), h.shape[1]) for _ in range(P)]
        padded = torch.cat([out, h.new_zeros(max(bounds) - out.shape[0], h.shape[1])])
        dist.all_gather(parts, padded, group=self.groups.ep)
        return torch.cat([part[:n] for part, n in zip(parts, bounds)])

    def rank_experts(self, layer: int, rows: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """fc1 [gate; up] -> clamped SwiGLU -> fc2 on this rank's experts (Megatron layout)."""
        spec, w = self.spec, self.w
        out = rows.new_empty(rows.shape[0], spec.hidden_size)
        for k in torch.unique(expert).tolist():
            sel = expert == k
            mg = lambda key: w[megatron_name(key, layer, k)]  # noqa: E731
            x = torch.nn.functional.linear(rows[sel], mg("fc1_weight"), mg("fc1_bias"))
            # megatron-core's glu takes the first half as the gate; our SwiGLU takes them interleaved
            act = swiglu(interleave(x, dim=-1), spec.swiglu_alpha, spec.swiglu_limit)
            out[sel] = torch.nn.functional.linear(act, mg("fc2_weight"), mg("fc2_bias"))
        return out

    # ---- head -----------------------------------------------------------------------------------
    def head(self, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        h = rms_norm(x, self.w[megatron_name("final_norm")], self.spec.rms_norm_eps)
        if trace is not None:
            trace.record("final_norm", h)
        logits = self._tp_gather(torch.nn.functional.linear(h, self.w[megatron_name("output")]), dim=-1)
        return logits  # [B, S, Vp]: padding columns kept so the caller can check they are zero

    # ---- the stage ------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, trace: Trace | None) -> torch.Tensor | None:
        """Stage 0 embeds; others receive the residual stream; the last stage returns logits."""
        b, s = ids.shape
        if self.s == 0:
            x = self.embed(ids)
            if trace is not None:
                trace.record("embed", x)
        else:
            x = torch.empty(b, s, self.spec.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self.grid.rank(self.t, self.p, self.s - 1))
        cos, sin = cos_sin(self.spec, torch.arange(s, device=self.device), self.dtype)
        for local in range(len(self.layers)):
            x = self.layer(local, x, cos, sin, trace)
        if self.s < self.grid.pp - 1:
            dist.send(x.contiguous(), dst=self.grid.rank(self.t, self.p, self.s + 1))
            return None
        return self.head(x, trace)
