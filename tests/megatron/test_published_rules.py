"""Rebuild the HF tensors from Megatron rank files by the published rules, written out here
(docs/megatron.md, Megatron-Bridge `merge_qkv_weights`/`split_qkv_weights` and the GPT-OSS gate/up
mapping), without the converter's code: plain torch.load of each rank file."""
from __future__ import annotations

import torch

from gptoss_verify.formats.megatron import legacy as megatron
from gptoss_verify.formats.megatron.mapping import padded_vocab_size


def _load(root, t, s, p, tp, ep, pp):
    name = f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") + (f"_{p:03d}" if ep > 1 else "")
    return torch.load(root / "iter_0000000" / name / "model_optim_rng.pt", weights_only=True)["model"]


def test_rebuild_qkv_gate_up_down_from_shards(tiny_weights, tmp_path):
    spec, w = tiny_weights
    tp, ep, pp = 2, 2, 2
    root = tmp_path / "mg"
    megatron.write(w, spec, root, tp=tp, ep=ep, pp=pp, pad_vocab=True)
    nh, ng, d, h, inter, e_all = (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size,
                                  spec.intermediate_size, spec.num_experts)
    per_group = (nh // ng + 2) * d
    per_stage = spec.num_layers // pp
    for layer in range(spec.num_layers):
        s, i = divmod(layer, per_stage)
        pre = f"decoder.layers.{i}."
        # linear_qkv: TP shards concatenated along rows, then row r -> g, w = divmod(r, per_group)
        fused = torch.cat([_load(root, t, s, 0, tp, ep, pp)[pre + "self_attention.linear_qkv.weight"]
                           for t in range(tp)])
        q = torch.empty(nh * d, h, dtype=fused.dtype)
        k = torch.empty(ng * d, h, dtype=fused.dtype)
        v = torch.empty(ng * d, h, dtype=fused.dtype)
        qrows = nh // ng * d
        for r in range(fused.shape[0]):
            g, wr = divmod(r, per_group)
            if wr < qrows:
                q[g * qrows + wr] = fused[r]
            elif wr < qrows + d:
                k[g * d + wr - qrows] = fused[r]
            else:
                v[g * d + wr - qrows - d] = fused[r]
        hf = f"model.layers.{layer}.self_attn."
        assert torch.equal(q, w[hf + "q_proj.weight"])
        assert torch.equal(k, w[hf + "k_proj.weight"])
        assert torch.equal(v, w[hf + "v_proj.weight"])
        # o_proj: row-parallel, columns split over TP
        proj = torch.cat([_load(root, t, s, 0, tp, ep, pp)[pre + "self_attention.linear_proj.weight"]
                          for t in range(tp)], dim=1)
        assert torch.equal(proj, w[hf + "o_proj.weight"])
        # sinks split by head
        sinks = torch.cat([_load(root, t, s, 0, tp, ep, pp)[pre + "self_attention.core_attention.softmax_offset"]
                           for t in range(tp)])
        assert torch.equal(sinks, w[hf + "sinks"])
        # experts: EP rank p holds global experts p*E/EP + k; fc1 = [gate; up] rows, fc2 = down.T
        mlp = f"model.layers.{layer}.mlp.experts."
        for p in range(ep):
            sd = _load(root, 1, s, p, tp, ep, pp)  # any TP rank holds the whole experts (ETP = 1)
            for kk in range(e_all // ep):
                e = p * (e_all // ep) + kk
                fc1 = sd[pre + f"mlp.experts.linear_fc1.weight{kk}"]
                assert fc1.shape == (2 * inter, h)
                gate_up = torch.empty(h, 2 * inter, dtype=fc1.dtype)
                gate_up[:, 0::2] = fc1[:inter].T  # HF interleaves gate (even) and up (odd) columns
                gate_up[:, 1::2] = fc1[inter:].T
                assert torch.equal(gate_up, w[mlp + "gate_up_proj"][e])
                b1 = sd[pre + f"mlp.experts.linear_fc1.bias{kk}"]
                assert torch.equal(b1[:inter], w[mlp + "gate_up_proj_bias"][e][0::2])
                assert torch.equal(b1[inter:], w[mlp + "gate_up_proj_bias"][e][1::2])
                fc2 = sd[pre + f"mlp.experts.linear_fc2.weight{kk}"]
                assert fc2.shape == (h, inter)
                assert torch.equal(fc2.T, w[mlp + "down_proj"][e])
    # vocabulary: Megatron-LM pads 384 to ceil(384/256)*256 = 512 rows, zeros at the end
    emb = torch.cat([_load(root, t, 0, 0, tp, ep, pp)["embedding.word_embeddings.weight"] for t in range(tp)])
    assert emb.shape[0] == 512
    assert torch.equal(emb[:spec.vocab_size], w["model.embed_tokens.weight"])
    assert not emb[spec.vocab_size:].any()


def test_padded_vocab_rule():
    # Megatron-LM calculate_padded_vocab_size: ceil(V / (128 * TP)) * 128 * TP
    assert [padded_vocab_size(201088, t, True) for t in (1, 2, 4, 8)] == [201088, 201216, 201216, 201728]
    assert padded_vocab_size(201088, 8, False) == 201088
