"""How a sequence is laid out across the ranks of a ring, and which work each ring step does.

Two layouts (both keep every rank's shard the same length, so shards can be exchanged
without telling peers their sizes):

- "contiguous": the sequence cut into P equal pieces, rank r holding piece r (Liu et al.,
  2023, "Ring Attention with Blockwise Transformers"). Under a causal mask rank P-1 does
  about 2P-1 times the work of rank 0.
- "zigzag": the sequence cut into 2P equal chunks, rank r holding chunks r and 2P-1-r
  (zhuzilin/ring-flash-attention; the load-balancing idea of Brandon et al., 2023,
  "Striped Attention"). Every rank then does the same causal work, up to c pairs.

The schedule (`step_work`) is the single source of truth for what the forward and the
backward pass compute at each ring step, and `attended_pairs` counts it for the load
balance test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown layout {layout!r}; use layout='zigzag' (chunks r and 2P-1-r, balanced "
            f"causal work) or layout='contiguous' (piece r of P)"
        )
    return layout


def _check_split(seq_len: int, world_size: int, layout: str) -> int:
    """Length of one piece ("contiguous") or one chunk ("zigzag"); raises if it does not divide."""
    pieces = 2 * world_size if layout == "zigzag" else world_size
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    if seq_len % pieces != 0:
        lo = seq_len // pieces * pieces
        raise ValueError(
            f"a sequence of length {seq_len} cannot be cut into {pieces} equal "
            f"{'chunks (2P for zigzag)' if layout == 'zigzag' else 'pieces'} for P={world_size}; "
            f"pad or trim it to a multiple of {pieces} (e.g. {lo} or {lo + pieces})"
        )
    return seq_len // pieces


def shard_positions(seq_len: int, rank: int, world_size: int, *, layout: str = "zigzag") -> Tensor:
    """Global positions (int64, shape (seq_len / P,)) of the tokens rank `rank` holds.

    Use them for rotary or learned position embeddings of a sharded sequence.
    """
    check_layout(layout)
    n = _check_split(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n)
    first = torch.arange(rank * n, (rank + 1) * n)
    last = 2 * world_size - 1 - rank
    second = torch.arange(last * n, (last + 1) * n)
    return torch.cat([first, second])


def shard(x: Tensor, rank: int, world_size: int, *, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """The shard of a full sequence that rank `rank` holds (a copy, contiguous).

    x: (..., L, ...) with the sequence on `dim` (2 for (B, H, L, D) tensors) ->
    (..., L / P, ...). L must be a multiple of P ("contiguous") or 2P ("zigzag").
    """
    check_layout(layout)
    pos = shard_positions(x.shape[dim], rank, world_size, layout=layout).to(x.device)
    return x.index_select(dim, pos).contiguous()


def unshard(shards: Sequence[Tensor], *, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """The full sequence from every rank's shard, in rank order (the inverse of `shard`)."""
    check_layout(layout)
    P = len(shards)
    if P == 0:
        raise ValueError("unshard needs the shards of every rank; got an empty list")
    n_local = shards[0].shape[dim]
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise ValueError(
                f"every shard must have the same shape; rank 0 has {tuple(shards[0].shape)} but "
                f"rank {r} has {tuple(s.shape)}"
            )
    if layout == "contiguous":
        return torch.cat(list(shards), dim=dim)
    if n_local % 2:
        raise ValueError(f"zigzag shards hold two equal chunks; got an odd local length {n_local}")
    c = n_local // 2
    firsts = [s.narrow(dim, 0, c) for s in shards]  # chunk r of rank r
    seconds = [s.narrow(dim, c, c) for s in shards]  # chunk 2P-1-r of rank r
    return torch.cat(firsts + seconds[::-1], dim=dim)


@dataclass(frozen=True)
class StepWork:
    """What a rank computes against the key/value shard of rank `src`.

    Query rows [q0, q1) of the local shard against key rows [k0, k1) of the source shard,
    with `causal` meaning the diagonal block (equal lengths, local causal alignment is
    the global one). Zigzag needs no other case: its chunks are equal and aligned.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    def pairs(self) -> int:
        lq, lk = self.q1 - self.q0, self.k1 - self.k0
        if self.causal:  # bottom-right aligned: row i sees i + 1 + (lk - lq) keys
            return sum(max(0, min(lk, i + 1 + lk - lq)) for i in range(lq))
        return lq * lk


def step_work(layout: str, causal: bool, rank: int, src: int, world_size: int, n_local: int) -> Optional[StepWork]:
    """The block rank `rank` computes against rank `src`'s key/value shard, or None to skip."""
    if not causal:
        return StepWork(0, n_local, 0, n_local, False)
    if src == rank:
        # Contiguous: the diagonal piece. Zigzag: [chunk r, chunk 2P-1-r] against itself is
        # also exactly a causal block: chunk 2P-1-r sees all of chunk r, chunk r sees none
        # of chunk 2P-1-r, and each chunk sees itself causally.
        return StepWork(0, n_local, 0, n_local, True)
    if layout == "contiguous":
        return StepWork(0, n_local, 0, n_local, False) if src < rank else None
    c = n_local // 2
    if src < rank:
        # Source chunk src lies before both local chunks; chunk 2P-1-src after both.
        return StepWork(0, n_local, 0, c, False)
    # src > rank: both source chunks lie after chunk r and before chunk 2P-1-r.
    return StepWork(c, n_local, 0, n_local, False)


def attended_pairs(layout: str, causal: bool, world_size: int, n_local: int) -> list[int]:
    """(query, key) pairs each rank computes over a whole ring pass, from the schedule."""
    check_layout(layout)
    totals = []
    for rank in range(world_size):
        total = 0
        for src in range(world_size):
            w = step_work(layout, causal, rank, src, world_size, n_local)
            total += 0 if w is None else w.pairs()
        totals.append(total)
    return totals
