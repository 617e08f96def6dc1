"""The ring's plumbing on torch.distributed: neighbours, point-to-point exchange, deadlines.

Every wait has a deadline, so when a peer dies or never arrives the surviving ranks raise
`RingAttentionError` naming the rank, the step and the peer, instead of hanging in a
receive forever. Works for gloo (CPU tensors) and NCCL (CUDA tensors): both honour
`Work.wait(timeout)`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Seconds any single wait of the ring may take before the rank gives up. Generous, so a
# slow neighbour computing a long block is not mistaken for a dead one; lower it in tests.
DEFAULT_TIMEOUT = 300.0


class RingAttentionError(RuntimeError):
    """A peer of the ring did not answer in time (died, never joined, or called something else)."""


def _seconds(timeout) -> float:
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")
    return float(timeout)


@dataclass(frozen=True)
class Ring:
    """This rank's place in the ring: group rank, size and the global ranks of its neighbours."""

    group: object
    rank: int
    size: int
    next_peer: int  # global rank we send to
    prev_peer: int  # global rank we receive from
    timeout: float
    backend: str

    def exchange(self, send: Sequence[Tensor], recv: Sequence[Tensor], tag: int = 0) -> list:
        """Post sends of `send` to the next rank and receives into `recv` from the previous one.

        Message i of a call carries tag `tag + i` (gloo matches on it; NCCL matches in posting
        order, which every rank keeps identical).
        """
        ops = [dist.P2POp(dist.isend, t, self.next_peer, self.group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, self.prev_peer, self.group, tag + i) for i, t in enumerate(recv)]
        try:
            return dist.batch_isend_irecv(ops)
        except Exception as e:  # a dead peer can fail the post itself (connection reset)
            raise self._error(f"posting the exchange with ranks {self.prev_peer}/{self.next_peer}", e) from e

    def wait(self, works: Optional[list], what: str) -> None:
        """Wait for posted works; raise RingAttentionError after `timeout` seconds or on failure."""
        for work in works or ():
            try:
                ok = work.wait(datetime.timedelta(seconds=self.timeout))
            except Exception as e:
                raise self._error(what, e) from e
            if ok is False:
                raise self._error(what, None)

    def _error(self, what: str, cause: Optional[BaseException]) -> RingAttentionError:
        detail = f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0][:200]})" if cause else ""
        return RingAttentionError(
            f"ring attention: rank {self.rank} of {self.size} (pid {os.getpid()}, {self.backend}) got no "
            f"answer while {what} within the timeout of {self.timeout:g} s{detail}. A peer rank has "
            f"probably died, never joined, or is not calling ring_attention with the same arguments; "
            f"check the other ranks' logs. If the peers are only slow, raise timeout=... (seconds)."
        )


def make_ring(group, timeout) -> Ring:
    """The ring over `group` (None = the default group); raises if torch.distributed is not set up."""
    if not dist.is_available():
        raise RuntimeError("ring attention needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "ring attention needs an initialised process group; call "
            "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) first, e.g. "
            "under `torchrun --nproc-per-node 4 ...`, or qkv.distributed.init_process_group(...)"
        )
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given group; call "
            f"ring_attention only on the group's ranks"
        )
    size = dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    return Ring(group, rank, size, nxt, prv, _seconds(timeout), str(dist.get_backend(group)))


def all_gather_meta(ring: Ring, meta: Sequence[float], device) -> list[list[float]]:
    """Every rank's `meta` numbers (float64 carries ints exactly), with the ring's deadline."""
    mine = torch.tensor(list(meta), dtype=torch.float64, device=device)
    outs = [torch.empty_like(mine) for _ in range(ring.size)]
    try:
        work = dist.all_gather(outs, mine, group=ring.group, async_op=True)
    except Exception as e:
        raise ring._error("checking that every rank passes matching shards", e) from e
    ring.wait([work], "checking that every rank passes matching shards (all_gather)")
    return [o.tolist() for o in outs]


def init_process_group(
    backend: Optional[str] = None, *, init_method: Optional[str] = None, world_size: int = -1,
    rank: int = -1, timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """torch.distributed.init_process_group with a deadline and a clear error if peers never join.

    backend defaults to "nccl" when CUDA is available, else "gloo". Under torchrun leave
    init_method, world_size and rank unset (the environment carries them).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    seconds = _seconds(timeout)
    try:
        dist.init_process_group(
            backend, init_method=init_method, world_size=world_size, rank=rank,
            timeout=datetime.timedelta(seconds=seconds),
        )
    except Exception as e:
        raise RingAttentionError(
            f"rank {rank} could not form the process group of {world_size} ranks at "
            f"{init_method or 'env://'} within {seconds:g} s ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:200]}). Another rank probably never started or "
            f"died before joining; check every rank's logs and that all use the same address."
        ) from e
