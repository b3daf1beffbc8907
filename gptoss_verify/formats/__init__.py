"""On-disk checkpoint layouts, each mapped to and from the canonical (HF-named) state dict as a stream."""
