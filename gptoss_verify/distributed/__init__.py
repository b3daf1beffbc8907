"""Our model run sharded exactly as Megatron shards it, over torch.distributed (gloo or NCCL).

Each rank reads only its own Megatron file (`formats.megatron.legacy.load_rank`) and computes with the
reference block math of `model/`; the result is compared, point by point, with the unsharded
model. `grid` maps ranks to (tp, ep, pp) coordinates, `sharded` is the forward, `launch` starts
the processes (spawn or torchrun), `check` compares and reports.
"""
