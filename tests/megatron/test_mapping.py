"""The Megatron mapping table is the one home of Megatron's tensor names and of the transforms."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from gptoss_verify import schema
from gptoss_verify.formats.megatron import mapping

PACKAGE = Path(__file__).resolve().parents[2] / "gptoss_verify"
MAPPING = PACKAGE / "formats" / "megatron" / "mapping.py"


def _megatron_tokens() -> set[str]:
    """Name components that only Megatron uses: taken from the table's names, minus the canonical
    names' components and two plain words (`decoder`, `embedding`, caught in context instead)."""
    tokens = {t for row in mapping.ROWS for names in row.names.values() for name in names
              for t in re.split(r"[.{}]", name) if t and t not in ("i", "k")}
    canonical = {t for row in mapping.ROWS for name in row.canonical for t in name.split(".")} | {"model", "layers"}
    return (tokens - canonical - {"decoder", "embedding"}) | {"decoder.layers", "embedding.word_embeddings",
                                                              "decoder.final_layernorm"}


def test_megatron_names_occur_only_in_the_mapping_table():
    tokens = _megatron_tokens()
    assert {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "softmax_offset", "word_embeddings",
            "output_layer", "pre_mlp_layernorm", "final_layernorm", "layer_norm_weight", "local_experts"} <= tokens
    # whole tokens only: HF config fields such as `num_local_experts` are not Megatron names
    pattern = re.compile(r"(?<![\w])(" + "|".join(sorted(map(re.escape, tokens), key=len, reverse=True)) + r")(?![\w])")
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == MAPPING:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(PACKAGE.parent)}:{n}: {m.group(1)}" for m in pattern.finditer(line)]
    assert not found, "Megatron tensor names outside formats/megatron/mapping.py:\n" + "\n".join(found)


def test_every_canonical_tensor_has_exactly_one_row():
    layer = [n for row in mapping.ROWS if row.scope in (mapping.LAYER, mapping.EXPERT) for n in row.canonical]
    outside = [n for row in mapping.ROWS if row.scope in (mapping.FIRST, mapping.LAST) for n in row.canonical]
    assert sorted(layer) == sorted(schema.LAYER_TENSORS)
    assert sorted(outside) == sorted(schema.FIRST_TENSORS + schema.LAST_TENSORS)
    for row in mapping.ROWS:
        assert set(row.names) == set(mapping.NAME_SETS), row.key


def test_transform_pairs_invert_each_other():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * 4, 3, generator=g) for n in (6, 2, 2))  # 2 KV groups of 3 query heads, D = 4
    fused = mapping.group_qkv(q, k, v, head_dim=4)
    assert torch.equal(fused[:12], q[:12]) and torch.equal(fused[12:16], k[:4])  # [q of g0; k_g0; v_g0; ...]
    assert all(torch.equal(a, b) for a, b in zip(mapping.ungroup_qkv(fused, q_per_kv=3, head_dim=4), (q, k, v)))
    x = torch.arange(12.0)
    halves = mapping.to_halves(x)
    assert halves.tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]  # gate (even), then up (odd)
    assert torch.equal(mapping.interleave(halves), x)
    assert torch.equal(halves, x[mapping.halves_order(12)])
    real, bad = mapping.unpad_vocab(mapping.pad_vocab(torch.ones(5, 2), 8), 0, 5)
    assert bad is None and torch.equal(real, torch.ones(5, 2))
    padded = mapping.pad_vocab(torch.ones(5, 2), 8)
    padded[6, 1] = 1.0
    assert mapping.unpad_vocab(padded, 10, 15)[1] == 16


def test_docs_show_the_table():
    docs = (PACKAGE.parent / "docs" / "megatron.md").read_text()
    assert mapping.markdown_table() in docs, "docs/megatron.md: regenerate the Megatron mapping table " \
                                             "(python -c 'from gptoss_verify.formats.megatron import mapping; " \
                                             "print(mapping.markdown_table())')"
