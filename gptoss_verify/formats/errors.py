"""The one error type of the checkpoint layouts.

A `CheckpointError` is a problem with a checkpoint or with what the user asked of it. Its message
names the file (or directory), the tensor where there is one, what was expected and what was
found, so one line on stderr is enough to act on. It is a `ValueError`, so the CLI prints it and
exits 1.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """A bad checkpoint or a conversion that cannot be done; the message says where and why."""
