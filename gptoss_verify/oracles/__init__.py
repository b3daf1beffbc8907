"""Reference implementations we check against (transformers). Nothing in model/ imports this."""
