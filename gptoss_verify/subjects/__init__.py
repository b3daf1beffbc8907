"""Implementations of GPT-OSS run as subjects of the harness: ours, transformers', OpenAI's,
megatron-core's, a user's (`python:MODULE:CALLABLE`) or an out-of-process engine's dump.

`protocol.py` says what a subject is; `registry.py` resolves a subject's name. Each built-in subject
lives in its own module and imports its optional package there, so importing this package needs
nothing beyond the project's own dependencies.
"""
