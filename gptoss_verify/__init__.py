"""gptoss-verify: an independent GPT-OSS implementation, a parity referee against transformers,
property tests of the parts implementations get wrong, and checkpoint conversion."""

__version__ = "0.1.0"
