"""`gptoss-verify diff`: does checkpoint B hold the same model as A, and if not, where and how.

sources (any layout -> canonical stream) -> compare (configs, tensor pairs, statuses) ->
diagnose (the transform catalogue) and consequence (both through our model, layer by layer) ->
report (markdown, JSON). `command` is the CLI wiring. Imports from the rest of the project live
in `deps` only.
"""
from .command import run  # noqa: F401
