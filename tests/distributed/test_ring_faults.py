"""A rank that dies, never joins, or never calls: the others raise a clear error in bounded time."""

from __future__ import annotations

import os
import signal
import time

from ring_workers import launch

TIMEOUT = 3.0  # the ring's per-wait deadline in these tests
SLACK = 6.0  # scheduling noise on a busy 2-core machine


def test_killed_rank_mid_ring_stops_the_others():
    killed = {}

    def kill_last_when_ready(rank, msg, procs):
        killed.setdefault("ready", set()).add(rank)
        if len(killed["ready"]) == len(procs) and "t" not in killed:
            time.sleep(0.5)  # let the ranks get into their ring passes
            killed["t"] = time.time()
            os.kill(procs[-1].pid, signal.SIGKILL)

    t0 = time.monotonic()
    out = launch(3, "survive_kill", {"timeout": TIMEOUT}, timeout=90, on_message=kill_last_when_ready)
    assert out[2][0] == "died"
    for r in (0, 1):
        status, res = out[r]
        assert status == "ok" and res["type"] == "RingAttentionError", (r, status, res)
        assert res["calls"] > 0, "the kill should land after some complete ring passes"
        assert "got no answer" in res["msg"] and "A peer rank has probably died" in res["msg"], res["msg"]
        assert res["t_error"] - killed["t"] < TIMEOUT + SLACK, f"rank {r} took {res['t_error'] - killed['t']:.1f} s"
    assert time.monotonic() - t0 < 60


def test_silent_rank_times_out():
    out = launch(3, "silent_peer", {"timeout": TIMEOUT}, timeout=60)
    for r in (0, 1):
        status, res = out[r]
        assert res["type"] == "RingAttentionError", (r, status, res)
        assert "within the timeout of 3 s" in res["msg"], res["msg"]
        assert TIMEOUT - 0.5 < res["elapsed"] < TIMEOUT + SLACK


def test_rank_that_never_joins():
    t0 = time.monotonic()
    out = launch(3, "never_join", timeout=60, init_timeout=TIMEOUT)
    assert out[2][0] == "died"
    for r in (0, 1):
        status, res = out[r]
        assert status == "error" and res["type"] == "RingAttentionError", (r, status, res)
        assert "could not form the process group of 3 ranks" in res["msg"], res["msg"]
        assert res["elapsed"] < TIMEOUT + SLACK
    assert time.monotonic() - t0 < 40
