"""Megatron-Core's two checkpoint layouts, both derived from one mapping table.

- `mapping.py`: the table (names per name set, transform pair, shard rule per canonical tensor
  family) and the transforms themselves; the only place that names a Megatron tensor;
- `files.py`: where a checkpoint's files are (tracker, iteration directory, our sidecar, the
  spec) and `Layout` (tp/ep/pp, ranks, stages, experts);
- `source.py`: random access to the canonical tensors a writer cuts pieces from;
- `legacy.py`: the per-rank `torch` format (`--to megatron`);
- `dist.py`: the `torch_dist` format (`--to megatron-dist`).
"""
