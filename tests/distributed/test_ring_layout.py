"""Layouts, the work schedule's load balance, and the errors raised before any communication."""

from __future__ import annotations

import pytest
import torch

import qkv.distributed as qd


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_shard_unshard_roundtrip(layout, P):
    N = 2 * P * 5
    x = torch.randn(2, 3, N, 4)
    shards = [qd.shard(x, r, P, layout=layout) for r in range(P)]
    assert all(s.shape == (2, 3, N // P, 4) for s in shards)
    assert torch.equal(qd.unshard(shards, layout=layout), x)
    pos = torch.cat([qd.shard_positions(N, r, P, layout=layout) for r in range(P)])
    assert sorted(pos.tolist()) == list(range(N))


def test_zigzag_positions():
    assert qd.shard_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert qd.shard_positions(8, 1, 2).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("P", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_zigzag_causal_work_is_balanced(P, chunk):
    pairs = qd.attended_pairs("zigzag", True, P, 2 * chunk)
    N = 2 * P * chunk
    assert sum(pairs) == N * (N + 1) // 2, "the schedule must compute every causal pair once"
    mean = sum(pairs) / P
    worst = max(abs(p - mean) / mean for p in pairs)
    assert worst <= 0.10, f"P={P} chunk={chunk}: per-rank pairs {pairs}, {worst:.1%} from the mean"


def test_contiguous_causal_work_is_unbalanced_but_complete():
    pairs = qd.attended_pairs("contiguous", True, 4, 100)
    assert sum(pairs) == 400 * 401 // 2
    assert max(pairs) > 5 * min(pairs)  # why zigzag exists
    assert qd.attended_pairs("zigzag", False, 4, 10) == [400] * 4


def test_errors_before_communication():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        qd.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="unknown layout 'striped'"):
        qd.ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="cannot be cut into 8 equal chunks"):
        qd.shard(torch.randn(1, 1, 20, 2), 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        qd.shard(q, 4, 4, layout="contiguous")
    with pytest.raises(ValueError, match="same shape"):
        qd.unshard([torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 6, 2)])
    with pytest.raises(ValueError, match="supports causal and scale only; got window=4"):
        qd.RingAttention()(q, q, q, window=4)
    # A window wider than the shard (Lq + Lk = 16 here) is still a window of the whole sequence: refused,
    # never read as none (build_spec clamps such a reach to Lq + Lk rather than dropping it); the message
    # names the window as given, not as clamped.
    for window, causal, text in ((16, False, "window=16"), ((100, 100), False, "window=100"),
                                 ((16, 0), True, "window=16"), (2**70, True, f"window={2**70}"),
                                 ((3, 100), False, r"window=\(3, 100\)")):
        with pytest.raises(ValueError, match=f"supports causal and scale only; got {text}"):
            qd.RingAttention()(q, q, q, window=window, causal=causal)
