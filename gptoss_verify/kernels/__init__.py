"""Fused Triton kernels behind plain functions with the reference blocks' signatures
(`backends.py` puts them in the model's place of attention and the MoE).

Importable without a GPU; without one they run only under the Triton interpreter
(`TRITON_INTERPRET=1`, float32/float16 inputs).
"""
