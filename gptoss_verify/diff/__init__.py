"""`gptoss-verify diff`: does checkpoint B hold the same model as A, and if not, where and how.

sources (any layout -> canonical stream) -> compare (configs, tensor pairs, statuses) ->
diagnose (the transform catalogue) and consequence (both through our model, layer by layer) ->
report (markdown, JSON). The subcommand is `commands/diff.py`. Imports from the rest of the
project live in `deps` only.
"""
