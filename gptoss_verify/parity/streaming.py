"""Weights of one decoder layer at a time (`gptoss-verify parity --stream-layers`).

The dense bf16 weights of gpt-oss-120b (about 229 GB, 6.4 GB a layer) do not fit on one 141 GB
GPU. Streamed, ours, the oracle and the float64 truth are built with every layer tensor on the
`meta` device; a forward pre-hook on each decoder layer draws (or loads) that layer's tensors
on entry and a forward hook returns them to `meta` on exit, so each model runs its own forward
code, unchanged, with one layer resident. The tensors of the last layer drawn are kept until
another layer is asked for, so ours and the truth, run back to back on one layer in the
teacher-forced pass, share one draw. Random weights are seeded per tensor (`weights.py`), so a
layer drawn alone has exactly the values it has in the whole model: streamed results equal whole
ones bit for bit (tests/foundation/test_streaming.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelSpec
from ..schema import FIRST_TENSORS, LAST_TENSORS, LAYER_TENSORS, canonical_shapes, layer_name
from ..weights import iter_random_weights

Loader = Callable[[list[str]], dict[str, torch.Tensor]]


class LayerWeights:
    """The canonical tensors of one decoder layer at a time, from `load(names)`."""

    def __init__(self, spec: ModelSpec, load: Loader, device: str | torch.device = "cpu"):
        self.spec, self._load, self.device = spec, load, torch.device(device)
        self._layer: int | None = None
        self._state: dict[str, torch.Tensor] = {}
        self.draws = 0          # layers drawn so far (a layer re-asked for right away is not redrawn)
        self.seconds = 0.0      # time spent drawing them

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors under their full canonical names."""
        if self._layer != i:
            self._state, self._layer = {}, None  # free the previous layer before drawing the next
            start = time.perf_counter()
            self._state = self._load([layer_name(i, n) for n in LAYER_TENSORS])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self._layer, self.draws = i, self.draws + 1
        return self._state

    def params(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors named as inside the layer module (`self_attn.q_proj.weight`, ...)."""
        prefix = layer_name(i, "")
        return {n[len(prefix):]: t for n, t in self.layer(i).items()}

    def release(self) -> None:
        self._state, self._layer = {}, None

    def attach(self, layers: nn.ModuleList) -> list:
        """Hooks on each decoder-layer module: its parameters drawn on entry, back on `meta` on exit.
        Returns the hook handles."""
        handles = []
        for i, module in enumerate(layers):
            def enter(mod, args, i=i):
                mod.load_state_dict(self.params(i), strict=True, assign=True)

            def leave(mod, args, output):
                mod.to_empty(device="meta")

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        return handles


def meta_layers(spec: ModelSpec, resident: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A canonical state dict, in checkpoint order, with the resident tensors (embedding, final norm,
    head) as given and every layer tensor an empty `meta` tensor of its shape."""
    return {n: resident[n] if n in resident else torch.empty(shape, dtype=dtype, device="meta")
            for n, shape in canonical_shapes(spec).items()}


def random_source(spec: ModelSpec, seed: int, profile: str, dtype: torch.dtype, device) -> Loader:
    """Draw the named tensors of the seeded random model (the values `random_weights` gives them)."""
    return lambda names: dict(iter_random_weights(spec, seed, profile, dtype, device, names=names))


def state_source(state: dict[str, torch.Tensor], dtype: torch.dtype, device) -> Loader:
    """Take the named tensors from a state dict in memory, moved and cast as the case needs."""
    return lambda names: {n: state[n].to(device=device, dtype=dtype) if state[n].is_floating_point() else
                          state[n].to(device) for n in names}


RESIDENT = FIRST_TENSORS + LAST_TENSORS  # the tensors outside the layers: kept on the device throughout
