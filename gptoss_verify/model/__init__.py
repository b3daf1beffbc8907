"""Our GPT-OSS implementation in plain torch. Never imports transformers, the kernels or parity."""
from .model import REFERENCE, BlockFunctions, Transformer  # noqa: F401
