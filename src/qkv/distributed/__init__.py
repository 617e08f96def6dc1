"""Ring attention on torch.distributed: exact attention over a sequence sharded across processes.

Liu et al., 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context";
the zigzag layout after ring-flash-attention and Brandon et al., 2023, "Striped Attention".
Runs wherever torch.distributed runs: gloo on CPUs, NCCL on GPUs.

    import torch.distributed as dist
    import qkv.distributed as qd
    qd.init_process_group()                    # or torch.distributed.init_process_group
    rank, P = dist.get_rank(), dist.get_world_size()
    q_loc = qd.shard(q, rank, P, layout="zigzag")      # (B, H, L/P, D), likewise k, v
    out_loc = qd.ring_attention(q_loc, k_loc, v_loc, causal=True, layout="zigzag")
    out = qd.unshard(all_shards, layout="zigzag")      # (B, H, L, D), if you need it whole

`RingAttention(group, layout)` is a backend object: `qkv.attention(..., backend=ring)`, or a
layer's own backend through `MultiHeadAttention.distribute(group, layout)`; see
docs/distributed.md, and `python -m qkv.distributed.demo` under torchrun for a demo.
"""

from ._comm import DEFAULT_TIMEOUT, RingAttentionError, init_process_group
from ._layout import LAYOUTS, attended_pairs, shard, shard_positions, unshard
from .ring import RingAttention, ring_attention, ring_attention_with_lse

__all__ = [
    "ring_attention",
    "ring_attention_with_lse",
    "RingAttention",
    "RingAttentionError",
    "shard",
    "unshard",
    "shard_positions",
    "attended_pairs",
    "init_process_group",
    "LAYOUTS",
    "DEFAULT_TIMEOUT",
]
