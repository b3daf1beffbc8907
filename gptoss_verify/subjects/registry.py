"""Subject names -> subjects. Built-in modules are imported only when their name is asked for, so a
missing optional package (transformers, gpt-oss, megatron-core) breaks only its own subjects.

    reference | fused            ours (fused: Triton kernels; TRITON_INTERPRET=1 on CPU)
    hf-eager | hf:ATTN:EXPERTS   transformers' GptOssForCausalLM, attention x experts implementation
    hf-mxfp4                     an MXFP4 HF checkpoint loaded as transformers loads it (dequantized)
    openai-torch                 OpenAI's reference gpt_oss.torch on our OpenAI-layout output
    megatron-core                megatron-core's GPTModel (module megatron_core, its `subject(**options)`)
    python:MODULE:CALLABLE       a user's object: a subject, or a callable returning one
"""
from __future__ import annotations

import importlib

from .protocol import Subject, SubjectUnavailable

BUILTIN = ("reference", "fused", "hf-eager", "hf:ATTN:EXPERTS", "hf-mxfp4", "openai-torch", "megatron-core",
           "python:MODULE:CALLABLE")


def resolve(name: str, **options) -> Subject:
    """The subject called `name`; `options` go to its constructor. Unknown names raise ValueError,
    a subject whose package is missing raises SubjectUnavailable."""
    if name in ("reference", "fused"):
        from .ours import Ours
        return Ours(name, **options)
    if name == "hf-eager" or name.startswith("hf:"):
        attn, experts = ("eager", "eager") if name == "hf-eager" else _two_parts(name, "hf:ATTN:EXPERTS")
        from .transformers_hf import HFSubject
        return HFSubject(attn, experts, **options)
    if name == "hf-mxfp4":
        from .transformers_hf import HFMXFP4Subject
        return HFMXFP4Subject(**options)
    if name == "openai-torch":
        return _module_subject("gptoss_verify.subjects.openai_torch", "OpenAITorch", name, options)
    if name == "megatron-core":
        return _module_subject("gptoss_verify.subjects.megatron_core", "subject", name, options)
    if name.startswith("python:"):
        module, attr = _two_parts(name, "python:MODULE:CALLABLE")
        return _module_subject(module, attr, name, options, user=True)
    raise ValueError(f"subject: unknown name {name!r}; expected one of {', '.join(BUILTIN)}")


def _two_parts(name: str, form: str) -> tuple[str, str]:
    parts = name.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"subject {name!r}: expected the form {form}")
    return parts[1], parts[2]


def _module_subject(module: str, attr: str, name: str, options: dict, user: bool = False) -> Subject:
    """`module.attr`: a subject as is, or a callable (class, factory) called with `options`."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if not (err.name and (module + ".").startswith(err.name + ".")):
            raise  # the module exists; something it imports does not: the user's traceback matters
        raise SubjectUnavailable(f"subject {name}: cannot import {module} ({err})") from None
    try:
        obj = getattr(mod, attr)
    except AttributeError:
        raise SubjectUnavailable(f"subject {name}: {module} has no attribute {attr!r}") from None
    if not _is_subject(obj):
        if not callable(obj):
            raise ValueError(f"subject {name}: {module}.{attr} is neither a subject nor callable")
        obj = obj(**options)
    elif options:
        raise ValueError(f"subject {name}: options {sorted(options)} given for an object that is already a subject")
    if not _is_subject(obj):
        raise ValueError(f"subject {name}: {module}.{attr} gave a {type(obj).__name__}, which lacks "
                         f"{', '.join(_missing(obj))} (the protocol: name, precisions, points, run(case))")
    return obj


def _missing(obj) -> list[str]:
    return [a for a in ("name", "precisions", "points", "run") if not hasattr(obj, a)]


def _is_subject(obj) -> bool:
    return not isinstance(obj, type) and not _missing(obj) and callable(getattr(obj, "run"))
