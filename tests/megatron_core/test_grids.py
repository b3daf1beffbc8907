"""megatron-core's forward split over ranks (its parallel_state over gloo, one spawned process per
rank): tp2 with a padded vocabulary, ep2 and tp2 × ep2, each in float64 and float32 against our
truth. One start of four processes runs the three grids (starting processes that import
megatron-core is the cost); the smaller grids run with data-parallel replicas."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from gptoss_verify.subjects.megatron_core import MegatronCore, ranks, write_files  # noqa: E402
from gptoss_verify.subjects.protocol import Output  # noqa: E402

from .conftest import SPEC, case  # noqa: E402
from .test_subject import assert_parity  # noqa: E402

pytestmark = pytest.mark.distributed
GRIDS = [(2, 1, True), (1, 2, False), (2, 2, False)]  # tp, ep, padded vocabulary


def test_tp2_padded_ep2_and_tp2_x_ep2(tmp_path):
    cases = [case(torch.float64, seed=7), case(torch.float32, seed=7)]
    plan = []
    for tp, ep, pad in GRIDS:
        out = write_files(cases[0].dense_state(), SPEC, tmp_path / f"tp{tp}ep{ep}", tp=tp, ep=ep, pad_vocab=pad)
        plan.append((tp, ep, [ranks.Job(str(out), c.dtype_name) for c in cases]))
    traces, redirects, _ = ranks.run_grids(plan, cases[0].input_ids)
    assert len(traces) == len(GRIDS) * len(cases)
    for g, (tp, ep, pad) in enumerate(GRIDS):
        subject = MegatronCore(tp=tp, ep=ep, pad_vocab=pad)
        for j, c in enumerate(cases):
            trace = dict(traces[g * len(cases) + j])
            assert_parity(subject, c, Output(trace.pop("logits"), trace))
    assert redirects and all(n > 0 for n in redirects.values())  # placement only, counted
