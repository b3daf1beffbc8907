"""Our GPT-OSS implementation in plain torch, written from SPEC.md. Never imports transformers."""
from .model import BACKENDS, Transformer  # noqa: F401
