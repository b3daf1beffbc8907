"""Our trace points recorded by hooks on megatron-core's modules (paths in `mapping.MODULES`),
under our names and in our [batch, seq, ...] layout (Megatron's activations are [seq, batch, ...]).

Hooks only copy what a module hands on; the one exception is the router's gating function,
wrapped by an instance attribute that records the logits and returns them unchanged. Under tensor
parallelism each rank records its share of q, k, v and attn_core (heads split, `TP_SPLIT`); the
rank gathers them (`gather_tp`); every other point is whole on every rank.
"""
from __future__ import annotations

import torch

from ...formats.megatron.mapping import MODULES
from ..protocol import layer_name

#: points split over tensor-parallel ranks -> the split dimension in our [b, s, ...] layout
TP_SPLIT = {"q": 2, "k": 2, "v": 2, "attn_core": -1}


def _sub(module, path: str):
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _bs(x: torch.Tensor) -> torch.Tensor:
    """Megatron's [s, b, ...] -> our [b, s, ...], a copy."""
    return x.detach().transpose(0, 1).contiguous().clone()


def _plus_bias(out) -> torch.Tensor:
    """An (output, bias) pair as Megatron returns it where the bias is added later: output + bias."""
    if isinstance(out, tuple):
        y, b = out[0], out[1]
        return y if b is None else y + b
    return out


def attach(model, k: int) -> tuple[dict[str, torch.Tensor], list]:
    """Hooks that record our trace points; returns (record, undo list of callables)."""
    rec: dict[str, torch.Tensor] = {}
    undo = []

    def on(module, hook, pre=False):
        h = (module.register_forward_pre_hook(hook, with_kwargs=True) if pre else module.register_forward_hook(hook))
        undo.append(h.remove)

    def out_hook(name, fn=_bs):
        return lambda _m, _a, out: rec.__setitem__(name, fn(out))

    def in_hook(name):
        def hook(_m, args, kwargs):
            rec[name] = _bs(args[0] if args else kwargs["hidden_states"])
        return hook

    on(_sub(model, MODULES["embed"]), out_hook("embed"))
    for i, layer in enumerate(_sub(model, MODULES["layers"])):
        def name(point, i=i):
            return layer_name(i, point)
        on(layer, in_hook(name("input")), pre=True)
        on(_sub(layer, MODULES["attn_norm"]), out_hook(name("attn_norm")))
        core = _sub(layer, MODULES["attention_core"])

        def qkv_hook(_m, args, kwargs, name=name):
            for j, (point, kw) in enumerate((("q", "query"), ("k", "key"), ("v", "value"))):
                rec[name(point)] = _bs(args[j] if len(args) > j else kwargs[kw])
        on(core, qkv_hook, pre=True)
        on(core, out_hook(name("attn_core")))
        on(_sub(layer, MODULES["attention"]), out_hook(name("attn_out"), lambda o: _bs(_plus_bias(o))))
        norm = _sub(layer, MODULES["mlp_norm"])
        on(norm, in_hook(name("resid_attn")), pre=True)
        on(norm, out_hook(name("mlp_norm")))
        router = _sub(layer, MODULES["router"])
        gating = router.gating

        def logged_gating(x, gating=gating, name=name):
            logits = gating(x)
            rec[name("router_logits")] = _bs(logits)
            return logits
        router.gating = logged_gating  # an instance attribute: records, computes nothing
        undo.append(lambda router=router: delattr(router, "gating"))

        def route_hook(_m, _a, out, name=name):
            probs, chosen = out  # [s·b, E] each: the chosen experts' weights (zeros elsewhere), which ones
            logits = rec[name("router_logits")]  # [b, s, E]
            b, s = logits.shape[0], logits.shape[1]
            by_token = logits.transpose(0, 1).reshape(-1, logits.shape[-1])
            idx = by_token.masked_fill(~chosen, float("-inf")).topk(k, dim=-1).indices  # ours: by logit, descending
            rec[name("topk_idx")] = _bs(idx.view(s, b, k))
            rec[name("topk_weights")] = _bs(probs.gather(-1, idx).view(s, b, k))
        on(router, route_hook)
        on(_sub(layer, MODULES["mlp"]), out_hook(name("mlp_out"), lambda o: _bs(_plus_bias(o))))
        on(layer, out_hook(name("resid_mlp"), lambda o: _bs(o[0] if isinstance(o, tuple) else o)))
    on(_sub(model, MODULES["final_norm"]), out_hook("final_norm"))
    return rec, undo


def gather_tp(rec: dict[str, torch.Tensor], group, tp: int) -> None:
    """Each rank's share of the head-split points -> the whole point on every rank (in place)."""
    import torch.distributed as dist
    for name in list(rec):
        dim = TP_SPLIT.get(name.rsplit(".", 1)[-1])
        if dim is not None:
            parts = [torch.empty_like(rec[name]) for _ in range(tp)]
            dist.all_gather(parts, rec[name].contiguous(), group=group)
            rec[name] = torch.cat(parts, dim=dim)
