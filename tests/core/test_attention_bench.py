"""benchmarks/attention.py's shapes beyond self-attention with one kv head per query head: --kv-heads (grouped
heads) and --kv-length (cross-attention, every query length against N keys), each output and gradient checked
by the tolerance rule before it is timed; a bad count or length refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attention.py"


def test_the_attention_benchmark_takes_cross_attention(tmp_path):
    out = tmp_path / "a.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--backends", "native", "--heads", "2", "--kv-length", "320",
                          "--lengths", "96", "--dtypes", "float32", "--repeats", "1", "--backward",
                          "--memory-lengths", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "keys Lk=320 for every query length L (cross-attention)" in run.stdout, run.stdout
    assert "| float32 | False | 96 |" in run.stdout and "| float32 | True |" not in run.stdout, run.stdout
    assert "outside the tolerance rule" not in run.stdout, run.stdout
    rows = json.loads(out.read_text())["speed"]
    assert [(r["L"], r["Lk"], r["causal"], r["grads_checked"]) for r in rows] == [(96, 320, False, True)]


def test_a_bad_kv_length_is_refused_by_name():
    bad = subprocess.run([sys.executable, str(SCRIPT), "--kv-length", "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--kv-length must be at least 1, got 0" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_attention_benchmark_takes_grouped_heads(tmp_path):
    """`benchmarks/attention.py --kv-heads N` times grouped-query heads (SDPA with enable_gqa), checks each
    output and, with --backward, each gradient by the rule first, and refuses a count that does not divide
    --heads by name, no traceback."""
    run = subprocess.run([sys.executable, str(SCRIPT), "--backends", "native", "--heads", "4", "--kv-heads", "2",
                          "--backward", "--lengths", "128", "--dtypes", "bfloat16", "--repeats", "1",
                          "--memory-lengths", "--json", str(tmp_path / "a.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "B=1, H=4, Hkv=2, D=64" in run.stdout and "gradients checked whole" in run.stdout, run.stdout
    assert "| bfloat16 | True | 128 |" in run.stdout and "outside the tolerance rule" not in run.stdout, run.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--heads", "8", "--kv-heads", "3"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--kv-heads must divide --heads (8), got 3" in bad.stderr
    assert "Traceback" not in bad.stderr
