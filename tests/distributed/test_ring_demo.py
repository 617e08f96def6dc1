"""The torchrun demo runs on 2 processes and reports a small error against one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from ring_workers import free_port


def test_demo_under_torchrun():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "qkv.distributed.demo", "--seq-len", "512", "--backward", "--threads", "1", "--timeout", "60"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "P=2 (gloo), seq-len 512 = 2 x 256 local tokens" in run.stdout, run.stdout
    rows = re.findall(r"^\s+(\d)\s+([\d,]+)\s", run.stdout, flags=re.M)
    assert [r for r, _ in rows] == ["0", "1"] and rows[0][1] == rows[1][1], run.stdout  # zigzag: equal work
    err = float(re.search(r"single-process qkv.attention\| = (\S+)", run.stdout).group(1))
    assert err < 1e-5, run.stdout
