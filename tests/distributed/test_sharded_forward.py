"""The sharded forward over gloo (CPU): Megatron shards computed as Megatron shards them match the
unsharded model (float64 to 1e-12 relative, float32 by the tolerance table), and a deliberately
mislaid shard is caught at the layer and point where it first shows.

Each test is one launch of tp·ep·pp processes that runs several cases (checkpoints x dtypes) in
one process group, to keep the CI cost of starting processes low."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.config import preset
from gptoss_verify.distributed.launch import Case, Config, spawn
from gptoss_verify.formats import hf
from gptoss_verify.formats.megatron import legacy as megatron
from gptoss_verify.trace import LAYER_POINTS
from gptoss_verify.weights import random_weights

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

SEQ, BATCH = 24, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny preset (H=64 != I=96, 8 q / 2 kv heads, 8 experts top-4, window 16) with 2 layers:
    one sliding and one full layer; seq 24 > window, so the window is exercised."""
    spec = preset("tiny").with_layers(2)
    weights = random_weights(spec, seed=11, profile="typical", dtype=torch.bfloat16)
    root = tmp_path_factory.mktemp("sharded")
    hf.write(iter(weights.items()), spec, root / "hf")
    return spec, weights, root


def _megatron(model, name, **opts):
    spec, weights, root = model
    out = root / name
    if not out.exists():
        megatron.write(weights, spec, out, **opts)
    return out


def _run(cases, world):
    results = spawn(Config(cases, seq=SEQ, batch=BATCH, timeout_s=60), world=world, deadline_s=200)
    assert len(results) == len(cases)
    return results


def _assert_pass(result):
    bad = result.first_failure
    assert bad is None, f"{result.case}: first failure at {bad}"
    names = [r.name for r in result.rows]
    assert names[0] == "embed" and names[-1] == "logits" and "layers.1.resid_mlp" in names
    assert len(names) == 1 + 2 * len(LAYER_POINTS) + 2  # every layer boundary and point was compared


def _pass_cases(model, mg):
    ref = str(model[2] / "hf")
    return [Case(str(mg), ref, "float64"), Case(str(mg), ref, "float32")]


def _check_pass(results):
    for r in results:
        _assert_pass(r)
    f64 = max(r.measure for r in results[0].rows if r.kind == "relative max error")
    assert f64 <= 1e-12


# ---- mislaid shards: written here by hand, each the mistake a converter can make ------------------
def _tamper(path, fn):
    for f in sorted((path / "iter_0000000").glob("mp_rank_*/model_optim_rng.pt")):
        obj = torch.load(f, weights_only=True)
        fn(f.parent.name, obj["model"])
        torch.save(obj, f)


def _qkv_concatenated(model, good):
    """linear_qkv as [Q; K; V] of the whole layer, split by rows over TP (instead of per group)."""
    spec, w, root = model
    out = root / "bad-qkv"
    if out.exists():
        return out
    megatron.write(w, spec, out, tp=2)

    def fn(rank_dir, sd):
        t = int(rank_dir.split("_")[2])
        for i in range(spec.num_layers):
            for kind in ("weight", "bias"):
                full = torch.cat([w[f"model.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
                n = full.shape[0] // 2
                sd[f"decoder.layers.{i}.self_attention.linear_qkv.{kind}"] = full[t * n:(t + 1) * n].clone()
    _tamper(out, fn)
    return out


def _gate_up_swapped(model):
    spec, w, root = model
    out = root / "bad-gate-up"
    if out.exists():
        return out
    megatron.write(w, spec, out, tp=2)
    inter = spec.intermediate_size

    def fn(rank_dir, sd):
        for name in [n for n in sd if ".linear_fc1." in n]:
            sd[name] = torch.cat([sd[name][inter:], sd[name][:inter]])  # [up; gate]
    _tamper(out, fn)
    return out


def _padding_per_shard(model):
    """Vocabulary padding kept inside each TP shard (each shard padded at its own end) instead of
    appended after the real vocabulary: the real rows of shard 1 start early."""
    spec, w, root = model
    out = root / "bad-padding"
    if out.exists():
        return out
    megatron.write(w, spec, out, tp=2, pad_vocab=True)
    v = spec.vocab_size

    def fn(rank_dir, sd):
        t = int(rank_dir.split("_")[2])
        for mg, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                            ("output_layer.weight", "lm_head.weight")):
            if mg in sd:
                rows = sd[mg].shape[0]
                real = w[hf_name][t * v // 2:(t + 1) * v // 2]
                sd[mg] = torch.cat([real, torch.zeros(rows - real.shape[0], real.shape[1], dtype=real.dtype)])
    _tamper(out, fn)
    return out


def _experts_misplaced(model):
    """Expert blocks of EP ranks 0 and 1 exchanged: each rank holds the other's experts."""
    spec, w, root = model
    out = root / "bad-experts"
    if out.exists():
        return out
    megatron.write(w, spec, out, ep=2)
    files = {f.parent.name: f for f in (out / "iter_0000000").glob("mp_rank_*/model_optim_rng.pt")}
    a, b = (torch.load(files[n], weights_only=True) for n in ("mp_rank_00_000", "mp_rank_00_001"))
    for name in [n for n in a["model"] if ".mlp.experts." in n]:
        a["model"][name], b["model"][name] = b["model"][name], a["model"][name]
    torch.save(a, files["mp_rank_00_000"])
    torch.save(b, files["mp_rank_00_001"])
    return out


# ---- tests: one launch per world size (starting processes is most of the cost on 2 cores) --------
def test_world_of_2_tp2_ep2_pp2_and_mislaid_shards(model):
    """tp2, ep2 and pp2 (float64 and float32) and the four mislaid shards, in one 2-rank group."""
    ref = str(model[2] / "hf")
    tp2 = _megatron(model, "tp2", tp=2, pad_vocab=True)
    ep2 = _megatron(model, "ep2", ep=2)
    pp2 = _megatron(model, "pp2", pp=2)
    faults = {"qkv-concatenated": (_qkv_concatenated(model, tp2), "layers.0.q"),
              "gate-up-swapped": (_gate_up_swapped(model), "layers.0.mlp_out"),
              "padding-per-shard": (_padding_per_shard(model), "embed"),
              "experts-misplaced": (_experts_misplaced(model), "layers.0.mlp_out")}
    good = _pass_cases(model, tp2) + _pass_cases(model, ep2) + _pass_cases(model, pp2)
    results = _run(good + [Case(str(path), ref, "float64") for path, _ in faults.values()], world=2)
    _check_pass(results[0:2])
    _check_pass(results[2:4])
    _check_pass(results[4:6])
    for (fault, (_, where)), result in zip(faults.items(), results[6:]):
        bad = result.first_failure
        assert bad is not None and bad.name == where, f"{fault}: expected to be caught at {where}, got {bad}"
        assert bad.measure > 1e-3, f"{fault}: {bad}"
    # gate/up swapped: everything up to the routing still agrees, so the report points at the experts
    gate_up = results[7]
    before = [r for r in gate_up.rows if r.name.startswith("layers.0.")][:-2]
    assert all(r.ok for r in before), [r for r in before if not r.ok]


def test_world_of_4_tp2xep2_and_ep4(model):
    tp2ep2 = _megatron(model, "tp2ep2", tp=2, ep=2, pad_vocab=True)
    ep4 = _megatron(model, "ep4", ep=4)
    results = _run(_pass_cases(model, tp2ep2) + _pass_cases(model, ep4), world=4)
    _check_pass(results[:2])
    _check_pass(results[2:])


def test_cli_report_and_exit_status(model, tmp_path):
    """The command end to end: spawns its ranks, writes the report, exit 0; and a bad input is one
    line and exit 1 before any process starts."""
    from gptoss_verify.cli import main
    tp2 = _megatron(model, "tp2", tp=2, pad_vocab=True)
    report = tmp_path / "report.md"
    rc = main(["sharded-forward", str(tp2), "--reference", str(model[2] / "hf"), "--seq", "20",
               "--timeout", "60", "--report", str(report)])
    assert rc == 0
    text = report.read_text()
    assert "**Verdict: PASS**" in text and "`layers.1.resid_mlp`" in text and "tp=2 ep=1 pp=1" in text
    assert main(["sharded-forward", str(tmp_path / "missing"), "--reference", str(model[2] / "hf")]) == 1
