"""megatron-core's forward split over ranks (its parallel_state over gloo, one spawned process per
rank) on both layouts we write: legacy per-rank files written for each grid (tp2 with a padded
vocabulary, ep2, tp2 × ep2), and one torch_dist directory, written once, that
`dist_checkpointing.load` (default strictness) reshards to each of the three grids (its tensors are
global). Each in float64 and float32 against our truth. One start of four processes runs every
grid of both layouts (starting processes that import megatron-core is the cost: a second start
would double the test's time); the smaller grids run with data-parallel replicas."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from gptoss_verify.formats.megatron import dist  # noqa: E402
from gptoss_verify.subjects.megatron_core import MegatronCore, ranks, write_files  # noqa: E402
from gptoss_verify.subjects.protocol import Output  # noqa: E402

from .conftest import SPEC, case  # noqa: E402
from .test_subject import assert_parity  # noqa: E402

pytestmark = pytest.mark.distributed
GRIDS = [(2, 1, True), (1, 2, False), (2, 2, False)]  # tp, ep, padded vocabulary (legacy files)


def test_legacy_and_torch_dist_at_tp2_ep2_and_tp2_x_ep2(tmp_path):
    cases = [case(torch.float64, seed=7), case(torch.float32, seed=7)]
    # torch_dist: one directory for every grid, its vocabulary padded for tp 2 (512 rows for 384),
    # so the padding rows are resharded (and cut from the logits) at tp 1 too
    torch_dist = tmp_path / "torch_dist"
    dist.write(cases[0].dense_state(), SPEC, torch_dist, tp=2, pad_vocab=True)
    plan, judged = [], []
    for tp, ep, pad in GRIDS:
        legacy = write_files(cases[0].dense_state(), SPEC, tmp_path / f"tp{tp}ep{ep}", tp=tp, ep=ep, pad_vocab=pad)
        jobs = []
        for layout, files, padded in (("megatron", legacy, pad), ("megatron-dist", torch_dist, True)):
            for c in cases:
                jobs.append(ranks.Job(str(files), c.dtype_name))
                judged.append((MegatronCore(tp=tp, ep=ep, layout=layout, pad_vocab=padded), layout, c))
        plan.append((tp, ep, jobs))
    traces, redirects, _ = ranks.run_grids(plan, cases[0].input_ids)
    assert len(traces) == len(judged) == len(GRIDS) * 2 * len(cases)
    failures = []
    for (subject, layout, c), trace in zip(judged, traces):
        trace = dict(trace)
        try:
            assert_parity(subject, c, Output(trace.pop("logits"), trace))
        except AssertionError as err:  # every grid and layout judged, each failure named
            failures.append(f"{layout} tp{subject.tp} ep{subject.ep} {c.dtype_name}: {str(err).splitlines()[0]}")
    assert not failures, failures
    assert redirects and all(n > 0 for n in redirects.values())  # placement only, counted
