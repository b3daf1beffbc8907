"""Test packages (a package, so that tests/megatron does not shadow the real `megatron` on sys.path)."""
