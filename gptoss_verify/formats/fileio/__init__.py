"""Model-agnostic byte I/O: the torch.save zip container, written and indexed tensor by tensor,
many files written at once, and page-cache read-ahead. Nothing here knows GPT-OSS or Megatron
names; the layouts above (`formats/megatron/`) decide what goes in which file."""
