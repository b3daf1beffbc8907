"""Megatron-Core on the CPU: its requests for CUDA that only choose where a tensor lives, redirected
to the CPU and counted. No arithmetic is replaced.

megatron-core 0.19.2 asks for `torch.cuda.current_device()` when it places the softmax offset
(`transformer/dot_product_attention.py`), YaRN's inverse frequencies
(`models/common/embeddings/yarn_rotary_pos_embedding.py`), the router's weight and bias
(`transformer/moe/router.py`), its global memory buffer (`utils.py`) and tensor-parallel gather
buffers (`tensor_parallel/mappings.py`); it makes the causal and window masks with
`device="cuda"` (`transformer/utils.py`); the dist-checkpointing saver synchronizes CUDA
(`dist_checkpointing/strategies/filesystem_async.py`, `state_dict_saver.py`); and the RNG tracker's
`fork()` (`tensor_parallel/random.py`) saves and restores CUDA RNG state around dropout, which is 0
here. The alltoall dispatcher needs a CUDA stream: the subject uses the allgather dispatcher.
"""
from __future__ import annotations

import collections
import contextlib
import importlib

import torch

#: module -> what it asks of CUDA (only placement)
PLACEMENT = {
    "megatron.core.transformer.dot_product_attention": "torch.cuda.current_device() (softmax offset)",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "torch.cuda.current_device() (inv_freq)",
    "megatron.core.transformer.moe.router": "torch.cuda.current_device() (router weight and bias)",
    "megatron.core.transformer.utils": 'torch.ones(..., device="cuda") (causal and window masks)',
    "megatron.core.utils": "torch.cuda.current_device() (GlobalMemoryBuffer)",
    "megatron.core.tensor_parallel.mappings": "torch.cuda.current_device() (gather and scatter buffers)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize() (before a save)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "torch.cuda.current_device() (failure flag)",
}
RNG_FORK = "tensor_parallel/random.py: CudaRNGStatesTracker.fork()"


def _where(module: str) -> str:
    return module.removeprefix("megatron.core.").replace(".", "/") + ".py"


class _CudaOnCpu:
    """`torch.cuda` as one Megatron module sees it: `current_device()` names the CPU."""

    def __init__(self, where: str, counts: collections.Counter):
        self._where, self._counts = where, counts

    def current_device(self):
        self._counts[f"{self._where}: torch.cuda.current_device()"] += 1
        return torch.device("cpu")

    def synchronize(self, *_args):
        """Nothing runs asynchronously on the CPU."""
        self._counts[f"{self._where}: torch.cuda.synchronize()"] += 1

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """`torch` as one Megatron module sees it: tensors asked for on "cuda" are made on the CPU."""

    def __init__(self, where: str, counts: collections.Counter):
        self._where, self._counts = where, counts
        self.cuda = _CudaOnCpu(where, counts)

    def ones(self, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            self._counts[f'{self._where}: torch.ones(device="cuda")'] += 1
            device = "cpu"
        return torch.ones(*args, device=device, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def cpu_placement(counts: collections.Counter):
    """Within the block, megatron-core's CUDA placement requests (`PLACEMENT`, the RNG tracker's
    `fork()`) go to the CPU, each counted in `counts` ("file: request" -> times)."""
    from megatron.core.tensor_parallel import random as mrandom
    saved = {}
    for name in PLACEMENT:
        mod = importlib.import_module(name)
        saved[name] = mod.torch
        mod.torch = _TorchOnCpu(_where(name), counts)
    tracker = mrandom.get_cuda_rng_tracker()

    def fork(*_args, **_kwargs):
        counts[RNG_FORK] += 1
        return contextlib.nullcontext()
    tracker.fork = fork
    try:
        yield counts
    finally:
        del tracker.fork
        for name, real in saved.items():
            importlib.import_module(name).torch = real
