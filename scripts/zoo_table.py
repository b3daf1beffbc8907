"""Print the bug-zoo table for the README: each fault, where it is caught, and the size of the miss.

Runs the default parity cases (tiny; float64 and bfloat16; typical and stress weights) with each
fault switched on and reports, per fault, the first divergence of each case that saw it.
"""
from __future__ import annotations

import torch

from gptoss_verify.config import preset
from gptoss_verify.dtypes import dtype_name
from gptoss_verify.model.faults import FAULTS
from gptoss_verify.parity.run import ParityCase, run_case
from gptoss_verify.report import table

CASES = [(torch.float64, "typical"), (torch.bfloat16, "typical"), (torch.float64, "stress"), (torch.bfloat16, "stress")]


def main() -> None:
    rows = []
    for fault, entry in FAULTS.items():
        seen = []
        for dtype, profile in CASES:
            fd = run_case(ParityCase(preset("tiny"), dtype, profile, faults=(fault,))).first_divergence
            if fd is not None:
                seen.append(f"{dtype_name(dtype)}/{profile}: `{fd.name}` {fd.kind} "
                            f"{fd.measure:.2g} (bound {fd.bound:.2g})")
        rows.append((f"`{fault}`", entry.history, f"`{entry.point}`", "<br>".join(seen) or "**unseen**"))
    print(table(rows, ["fault", "what it is / where it shipped", "expected point", "caught (case: point, rule, miss)"]))


if __name__ == "__main__":
    main()
