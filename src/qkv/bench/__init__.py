"""`qkv bench`: the attention core against torch SDPA and FlexAttention, in one run.

Cases (B, H query heads, D head size, length L; `kv_heads` for the grouped cases):

- ``dense``   non-causal self-attention, Lq = Lk = L, Hq = Hkv = H.
- ``causal``  causal self-attention (Vaswani et al., 2017).
- ``window``  causal sliding window: each query sees itself and the `window` keys before it
              (Mistral 7B, Jiang et al., 2023), through ``qkv.attention(causal=True, window=w)``.
- ``gqa``     causal grouped-query attention, Hkv = kv_heads (Ainslie et al., 2023, "GQA").
- ``decode``  one new query (Lq = 1) against a KV cache of L keys, Hkv = kv_heads.

Peers, measured in the same run on the same inputs: torch's ``F.scaled_dot_product_attention``
(``is_causal``, ``enable_gqa=True`` for the grouped cases, a dense bool mask for the window,
built outside the timing), and with ``flex=True`` FlexAttention (Dong et al., 2024):
``torch.compile(flex_attention)`` with a ``create_block_mask`` of the same mask function.

Timing (`qkv.bench.timing`, the one timer the scripts in benchmarks/ share too): a first call
(for Flex it includes compilation: reported apart as ``first_call_s``), then ``repeats``
samples per method, the methods interleaved so that a burst of load on a shared machine hits
all of them; a sample repeats a fast call until it lasts at least `min_sample_s` and is
divided by the count. The table shows the best sample (the least noisy estimate on a shared
machine); the JSON keeps every sample.

Verification: every qkv result is checked before it is timed. On up to `check_rows` query
rows spread over the sequence, it is compared with ``qkv.reference_attention`` in float64
under the tolerance rule of `qkv.testing` (the test suite's, after flash-attention's
tests): its error must be at most twice the error of the plain reference run in the same
dtype, plus a rounding term. Where SDPA runs, the largest difference from its full output is
reported too. A result outside the rule makes `qkv bench` exit with status 1.

Skipped peers (shown as "-", with the reason in the JSON): a peer is skipped where it would
need more than `max_memory_gib` beyond the inputs (SDPA with the window's dense bool mask:
about 10 bytes per query-key pair on torch 2.13's CPU kernel, the mask and its float copy;
Flex's ``create_block_mask`` evaluates the whole Lq x Lk grid, about 10 bytes per pair), or
where one call would take longer than `max_seconds`, predicted from the same method at the
previous length by its growth (L^2 for SDPA and for Flex without a sparse mask, L for decode
and for Flex on the window). qkv itself always runs at every length asked for.

Layout: `config` (what to measure), `cases` (one cell: inputs, peers, skip rules), `timing`
(the timer), `verify` (the check), `report` (JSON, table, machine), `plot` (the PNG); the
progress bar is tqdm's, on stderr when it is a terminal. See docs/architecture.md.
"""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timezone
from typing import Optional, TextIO

import torch
from tqdm import tqdm

from .cases import flex_probe, inputs, run_cell
from .config import CASES, DTYPES, FORMAT, METHODS, BenchConfig
from .plot import PNG_SIZE, require_matplotlib, write_png
from .report import BenchResult, format_table, growth, loadavg, machine_info, write_json

__all__ = ["CASES", "DTYPES", "FORMAT", "METHODS", "PNG_SIZE", "BenchConfig", "BenchResult", "cells", "command_line",
           "flex_probe", "format_table", "growth", "inputs", "machine_info", "require_matplotlib", "run", "write_json",
           "write_png"]


def _progress_bar(total: int, stream: TextIO, enabled: bool) -> tqdm:
    """The one-line bar on `stream` ("qkv bench   3/20 [###---] 00:41 causal float32 L=4096: sdpa 2/3")."""
    return tqdm(total=total, file=stream, disable=not enabled, bar_format="qkv bench {n:>3}/{total} [{bar:24}] "
                "{elapsed} {desc}", ascii="-#", ncols=119, mininterval=0)


def cells(cfg: BenchConfig) -> list[tuple[str, str, int]]:
    """(case, dtype, L) in the order they run: one row of the table each."""
    return [(case, d, L) for case in cfg.cases for d in cfg.dtypes for L in sorted(cfg.lengths_of(case))]


def command_line(cfg: BenchConfig) -> str:
    """The `qkv bench` command that measures exactly `cfg`, every option spelled out."""
    words = ["qkv", "bench", "--cases", *cfg.cases, "--dtypes", *cfg.dtypes,
             "--lengths", *map(str, cfg.lengths)]
    if cfg.decode_lengths is not None:
        words += ["--decode-lengths", *map(str, cfg.decode_lengths)]
    words += ["--batch", str(cfg.batch), "--heads", str(cfg.heads), "--kv-heads", str(cfg.Hkv),
              "--dim", str(cfg.dim), "--window", str(cfg.window), "--repeats", str(cfg.repeats),
              "--backend", cfg.backend]
    if cfg.threads is not None:
        words += ["--threads", str(cfg.threads)]
    if cfg.flex:
        words.append("--flex")
    words += ["--max-seconds", f"{cfg.max_seconds:g}", "--max-memory-gib", f"{cfg.max_memory_gib:g}",
              "--check-rows", str(cfg.check_rows), "--seed", str(cfg.seed)]
    return shlex.join(words)


def run(cfg: BenchConfig, *, progress: bool = False, stream: Optional[TextIO] = None) -> BenchResult:
    """Run the suite of `cfg` and return every measurement.

    Args:
        cfg: what to measure (validated here).
        progress: draw a progress bar on `stream` (default sys.stderr).
        stream: where the progress bar and notes go; never stdout's table.
    """
    cfg.validate()
    stream = stream or sys.stderr
    result = BenchResult(config=cfg, command=command_line(cfg), argv=list(sys.argv),
                         started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    try:
        result.machine = machine_info()
        load = result.machine.get("load_average_start")
        cpus = result.machine.get("logical_cpus") or 1
        if load is not None and load[0] > 0.75 * cpus:
            note = (f"the machine is busy (load average {load[0]:.1f} on {cpus} logical CPUs): "
                    "times are noisy; ratios within one run are steadier")
            result.notes.append(note)
            print(f"qkv bench: note: {note}", file=stream)
        todo = cells(cfg)
        bar = _progress_bar(len(todo), stream, progress)
        flex_state: dict = {}
        if cfg.flex:
            bar.set_description_str("checking torch.compile for FlexAttention")
            reason = flex_probe()
            result.flex = {"requested": True, "available": reason is None}
            if reason is not None:
                flex_state["unavailable"] = f"skipped: {reason}"
                result.flex["reason"] = reason
                result.notes.append(f"FlexAttention skipped: {reason}")
        else:
            result.flex = {"requested": False}
        history: dict = {}
        with torch.inference_mode():
            for case, dtype_name, L in todo:
                where = f"{case} {dtype_name} L={L}"
                result.rows.append(run_cell(case, dtype_name, L, cfg, history, flex_state,
                                            lambda what, where=where: bar.set_description_str(f"{where}: {what}")))
                bar.update(1)
        bar.set_description_str("done", refresh=False)
        bar.close()
        result.machine["load_average_end"] = loadavg()
    finally:
        torch.set_num_threads(old_threads)
        if cfg.flex:
            torch._dynamo.reset()  # free the compiled kernels
    result.seconds = time.perf_counter() - start
    return result

