"""Regenerate golden/ from the transformers oracle (same as `gptoss-verify golden regenerate`).

Run it when a deliberate change to the cases is made, or when adopting a new transformers release
after its drift report (`gptoss-verify golden check --against oracle --report drift.md`) was read
and the moves were understood. Running it twice gives byte-identical files.
"""
from __future__ import annotations

import argparse

from gptoss_verify import golden

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(golden.DEFAULT_DIR))
    golden.regenerate(parser.parse_args().out)
