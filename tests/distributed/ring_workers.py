"""Spawn a gloo process group on 127.0.0.1 and run one job in every rank.

One launch runs a whole list of cases and sends the results back, because starting
processes that import torch is the expensive part on a small machine.
"""

from __future__ import annotations

import os
import queue as queue_mod
import signal
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pack(x):
    """Tensors travel as (dtype name, float64 numpy array): plain pickling, no shared memory."""
    if isinstance(x, torch.Tensor):
        return ("__tensor__", str(x.dtype), x.detach().double().numpy())
    if isinstance(x, dict):
        return {k: _pack(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_pack(v) for v in x)
    return x


def _unpack(x):
    if isinstance(x, tuple) and len(x) == 3 and x[0] == "__tensor__":
        return torch.from_numpy(x[2]).to(getattr(torch, x[1].replace("torch.", "")))
    if isinstance(x, dict):
        return {k: _unpack(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_unpack(v) for v in x)
    return x


def _entry(rank, world, port, job, kwargs, results, init_timeout):
    torch.set_num_threads(1)
    status, payload = "ok", None
    try:
        if job == "never_join" and rank == world - 1:
            os._exit(3)  # dies before joining the group
        import qkv.distributed as qd

        t0 = time.monotonic()
        try:
            qd.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world,
                                  rank=rank, timeout=init_timeout)
        except qd.RingAttentionError as e:
            status, payload = "error", {"type": type(e).__name__, "msg": str(e), "elapsed": time.monotonic() - t0}
        else:
            payload = JOBS[job](rank, world, results=results, **kwargs)
    except BaseException as e:  # report, never hang the parent
        status, payload = "error", {"type": type(e).__name__, "msg": str(e), "tb": traceback.format_exc()}
    results.put((rank, status, _pack(payload)))
    results.close()
    results.join_thread()
    os._exit(0)  # no destroy_process_group: after a fault it could block on dead peers


def launch(world: int, job: str, kwargs=None, *, timeout: float = 120.0, init_timeout: float = 30.0,
           on_message=None) -> dict:
    """Run JOBS[job] on `world` spawned ranks; returns {rank: (status, payload)}.

    on_message(rank, payload, procs) sees extra ("msg") messages a job sends while running.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, job, kwargs or {}, results, init_timeout),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                for r in dead:  # killed or crashed without reporting
                    out[r] = ("died", {"exitcode": procs[r].exitcode})
                continue
            if status == "msg":
                if on_message is not None:
                    on_message(rank, _unpack(payload), procs)
                continue
            out[rank] = (status, _unpack(payload))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)
    missing = [r for r in range(world) if r not in out]
    assert not missing, f"ranks {missing} neither reported nor died within {timeout} s (a hang)"
    return out


def results_ok(out: dict) -> list:
    errors = {r: p for r, (s, p) in out.items() if s != "ok"}
    assert not errors, f"ranks failed: {errors}"
    return [out[r][1] for r in sorted(out)]


# ----------------------------------------------------------------------------- jobs
def make_inputs(case):
    """Full q, k, v and upstream gradients of one case, the same in every process."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    B, N, Hq, Hkv, D, Dv = (case[n] for n in ("B", "N", "Hq", "Hkv", "D", "Dv"))

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q, k, v = rnd(B, Hq, N, D), rnd(B, Hkv, N, D), rnd(B, Hkv, N, Dv)
    g_out, g_lse = rnd(B, Hq, N, Dv), rnd(B, Hq, N)
    # poison: [(name, (b, h, position, column), value)], NaN or inf placed in the full tensors
    for name, index, value in case.get("poison", ()):
        {"q": q, "k": k, "v": v}[name][index] = value
    return q, k, v, g_out, g_lse


def _cases(rank, world, *, cases, results):
    import qkv.distributed as qd
    from qkv.core.engines import flash

    got = []
    for case in cases:
        lay = case["layout"]
        q, k, v, g_out, g_lse = make_inputs(case)
        loc = [qd.shard(t, rank, world, layout=lay).requires_grad_() for t in (q, k, v)]
        before = [t.detach().clone() for t in loc]
        from qkv.distributed import ring as ring_mod

        # piece_rows: merge each step's partial output in pieces of this many query rows.
        rows = case.get("piece_rows") or 1 << 30
        ring_mod._PIECE_ENTRIES = case["B"] * case["Hq"] * case["Dv"] * rows
        tiles = case.get("tiles")
        with flash.block_sizes(*tiles) if tiles else _null():
            out, lse = qd.ring_attention_with_lse(*loc, causal=case["causal"], layout=lay, timeout=30)
            loss = (out.double() * qd.shard(g_out, rank, world, layout=lay).double()).sum()
            if case.get("lse_grad"):
                loss = loss + (lse.double() * qd.shard(g_lse, rank, world, layout=lay).double()).sum()
            loss.backward()
        intact = all(torch.equal(a, b) for a, b in zip(before, loc))
        got.append({"out": out, "lse": lse, "dq": loc[0].grad, "dk": loc[1].grad, "dv": loc[2].grad,
                    "inputs_intact": intact})
    return got


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _mismatch(rank, world, *, results):
    """Rank 1 passes a longer shard: every rank must get the same clear ValueError."""
    import qkv.distributed as qd

    L = 6 if rank == 0 else 8
    q = torch.randn(1, 2, L, 4)
    try:
        qd.ring_attention(q, q, q, causal=True, timeout=20)
    except ValueError as e:
        return str(e)
    return "no error"


def _survive_kill(rank, world, *, results, timeout):
    """Every rank loops ring passes; the parent SIGKILLs rank world-1 in the middle of them."""
    import qkv.distributed as qd

    q = torch.randn(1, 2, 256, 16)
    qd.ring_attention(q, q, q, causal=True, timeout=timeout)  # one good pass: the ring works
    results.put((rank, "msg", "ready"))
    t0 = time.monotonic()
    calls = 0
    try:
        while time.monotonic() - t0 < 60:
            # check_shards=False: no collective, so the fault is met in the ring's P2P waits
            qd.ring_attention(q, q, q, causal=True, timeout=timeout, check_shards=False)
            calls += 1
    except qd.RingAttentionError as e:
        return {"type": type(e).__name__, "msg": str(e), "t_error": time.time(), "calls": calls}
    return {"type": "none", "calls": calls}


def _silent_peer(rank, world, *, results, timeout):
    """Rank world-1 joins the group but never calls ring_attention: a pure deadline."""
    import qkv.distributed as qd

    if rank == world - 1:
        time.sleep(timeout + 3)
        return {"type": "slept"}
    q = torch.randn(1, 2, 8, 4)
    t0 = time.monotonic()
    try:
        qd.ring_attention(q, q, q, timeout=timeout)
    except qd.RingAttentionError as e:
        return {"type": type(e).__name__, "msg": str(e), "elapsed": time.monotonic() - t0}
    return {"type": "none"}


def _mha(rank, world, *, results, layout, N):
    """qkv.nn.MultiHeadAttention with RoPE in ring mode vs the same layer on one process.

    The layer runs in ring mode through `MultiHeadAttention.distribute(group, layout)`.
    """
    import torch.distributed as dist

    import qkv.distributed as qd
    from qkv.nn import MultiHeadAttention, RotaryEmbedding

    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2).double()
    rope = RotaryEmbedding(8)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, N, 32, generator=gen, dtype=torch.float64)  # (B, N, E)
    g = torch.randn(2, N, 32, generator=gen, dtype=torch.float64)
    params = list(mha.parameters())

    xs = x.clone().requires_grad_()
    ref = mha(xs, causal=True, rotary=rope(torch.arange(N), torch.float64))
    ref.backward(g)
    ref_w = [p.grad.clone() for p in params]
    mha.zero_grad()

    ring = mha.distribute(layout=layout, timeout=30).backend
    try:
        xl = qd.shard(x, rank, world, layout=layout, dim=1).requires_grad_()  # (B, N/P, E)
        pos = ring.positions(xl.shape[1])  # global positions of the local tokens
        out = mha(xl, causal=True, rotary=rope(pos, torch.float64))
        out.backward(qd.shard(g, rank, world, layout=layout, dim=1))
    finally:
        mha.backend = "auto"
    for p in params:  # data-parallel style: every rank holds part of each weight's gradient
        dist.all_reduce(p.grad)

    def err(a, b):
        return (a - b).abs().max().item()

    return {"out": err(out, qd.shard(ref, rank, world, layout=layout, dim=1)),
            "dx": err(xl.grad, qd.shard(xs.grad, rank, world, layout=layout, dim=1)),
            "dw": max(err(p.grad, r) for p, r in zip(params, ref_w))}


JOBS = {"mha": _mha, "cases": _cases, "mismatch": _mismatch, "survive_kill": _survive_kill,
        "silent_peer": _silent_peer, "never_join": lambda *a, **k: {"type": "joined"}}
