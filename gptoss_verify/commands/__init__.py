"""Checkpoint subcommands of `gptoss-verify` (one module each): make-checkpoint, inspect, convert, roundtrip."""
