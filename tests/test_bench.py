"""`qkv bench`: the table, the JSON, the PNG, the progress bar, bad input, and the bench's own
check of every qkv result against the float64 reference. Tiny lengths; no timing assertions."""

from __future__ import annotations

import io
import json
import math
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
from qkv import bench
from qkv.cli import main
from qkv.testing import FWD_FACTOR, rounding_term

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--lengths", "64", "128", "--repeats", "1", "--check-rows", "16", "--no-progress"]


def _table_rows(stdout: str) -> list[list[str]]:
    """The cells of the main table's body rows (the first Markdown table in the output)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| case | dtype | L | qkv |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Every case, both dtypes, lengths 64 and 128, through the CLI in this process."""
    folder = tmp_path_factory.mktemp("bench")
    js, png = folder / "bench.json", folder / "bench.png"
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(["bench", *TINY, "--json", str(js), "--png", str(png)])
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue(), json.loads(js.read_text()), png


def test_table_has_one_row_per_case_dtype_length(full_run):
    code, stdout, _, _, _ = full_run
    assert code == 0, stdout
    rows = _table_rows(stdout)
    expected = [(c, d, L) for c in bench.CASES for d in ("float32", "bfloat16") for L in ("64", "128")]
    assert [(r[0], r[1], r[2]) for r in rows] == expected
    for r in rows:
        assert r[3].endswith(" ms") and r[5].endswith(" ms") and r[6].endswith("x"), r
        assert r[-1] == "ok", r
    assert "Growth of time with L" in stdout


def test_json_structure_and_every_number_positive_finite(full_run):
    _, _, _, doc, _ = full_run
    assert doc["format"] == "qkv.bench/1"
    assert doc["torch"] == torch.__version__ and doc["qkv"] == qkv.__version__
    assert doc["command"].startswith("qkv bench --cases dense causal window gqa decode --dtypes float32 bfloat16 "
                                     "--lengths 64 128 ")
    assert isinstance(doc["argv"], list)
    assert doc["threads"] >= 1 and doc["machine"]["logical_cpus"] >= 1
    assert doc["config"]["kv_heads"] == 2 and doc["config"]["repeats"] == 1
    assert doc["ok"] is True
    assert len(doc["rows"]) == 20
    for row in doc["rows"]:
        assert row["Hkv"] == (2 if row["case"] in ("gqa", "decode") else 8), row
        assert row["Lq"] == (1 if row["case"] == "decode" else row["L"])
        for method in ("qkv", "sdpa"):
            m = row[method]
            for key in ("seconds", "median_s", "first_call_s"):
                assert _positive_finite(m[key]), (row["case"], method, key, m[key])
            assert len(m["samples_s"]) == 1 and all(_positive_finite(s) for s in m["samples_s"])
            assert m["calls_per_sample"] >= 1
        assert _positive_finite(row["sdpa_over_qkv"])
        assert row["flex"] == {"skipped": "not requested (--flex)"} and row["flex_over_qkv"] is None
    assert {(g["case"], g["dtype"], g["method"]) for g in doc["growth"]} == {
        (c, d, m) for c in bench.CASES for d in ("float32", "bfloat16") for m in ("qkv", "sdpa")}


def test_every_result_checked_against_float64_within_the_tolerance_rule(full_run):
    """The bench's own check, re-derived here from qkv.testing's rule."""
    _, _, _, doc, _ = full_run
    for row in doc["rows"]:
        c = row["check"]
        assert c["rows_checked"] == (1 if row["case"] == "decode" else 16)
        dtype = getattr(torch, row["dtype"])
        bound = FWD_FACTOR * c["plain_max_err"] + rounding_term(torch.tensor([c["exact_max_abs"]]), dtype)
        assert c["bound"] == pytest.approx(bound, rel=1e-12)
        assert c["ok"] and c["qkv_max_err"] <= bound, (row["case"], row["dtype"], row["L"], c)
        assert math.isfinite(c["qkv_vs_sdpa_max_diff"])


def test_png_is_a_png_of_the_documented_size(full_run):
    png = full_run[4]
    assert _png_size(png) == bench.PNG_SIZE
    assert not [p for p in png.parent.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


def test_subprocess_run_keeps_stdout_clean(tmp_path):
    """`python -m qkv bench` in a child: exit 0, the table on stdout, no progress bar (not a TTY)."""
    js = tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "qkv", "bench", "--cases", "causal", "decode", "--dtypes", "float32",
         "--lengths", "64", "128", "--repeats", "1", "--check-rows", "8", "--json", str(js)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\r" not in proc.stderr and "[#" not in proc.stderr
    assert proc.stdout.startswith("qkv bench: B=1, H=8, D=64")
    assert len(_table_rows(proc.stdout)) == 4
    assert json.loads(js.read_text())["ok"] is True


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_goes_to_a_terminal_stderr_only(monkeypatch, capsys):
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    assert main(["bench", "--cases", "dense", "--dtypes", "float32", "--lengths", "64", "--repeats", "1",
                 "--check-rows", "4"]) == 0
    out = capsys.readouterr().out
    bar = fake.getvalue()
    assert "\rqkv bench   0/1 [------------------------]" in bar and "  1/1 [####" in bar, bar
    assert bar.endswith("\n")
    assert "\r" not in out and "[#" not in out and "[-" not in out
    assert len(_table_rows(out)) == 1


def test_no_progress_silences_the_bar(monkeypatch, capsys):
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    assert main(["bench", "--cases", "dense", "--dtypes", "float32", "--lengths", "64", "--repeats", "1",
                 "--check-rows", "4", "--no-progress"]) == 0
    assert "[--" not in fake.getvalue() and "\r" not in fake.getvalue()
    assert "\r" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--cases", "dense", "sparse"], "unknown case 'sparse'"),
    (["--lengths", "64", "0"], "--lengths must be a positive whole number; got 0"),
    (["--lengths", "-128"], "--lengths must be a positive whole number; got -128"),
    (["--decode-lengths", "0"], "--decode-lengths must be a positive whole number; got 0"),
    (["--dtypes", "float8"], "unknown dtype 'float8'"),
    (["--lengths", "64", "128", "64"], "--lengths: 64 given more than once"),
    (["--cases", "gqa", "gqa"], "--cases: gqa given more than once"),
    (["--heads", "8", "--kv-heads", "3"], "--kv-heads 3 must be positive and divide --heads 8"),
    (["--repeats", "0"], "--repeats must be a positive whole number; got 0"),
    (["--backend", "fastest"], "unknown backend 'fastest'"),
    (["--threads", "0"], "--threads must be a positive whole number; got 0"),
    (["--json", "/nonexistent-folder/b.json"], "--json: cannot write the file to '/nonexistent-folder/b.json'"),
    (["--png", "/nonexistent-folder/b.png"], "--png: cannot write the file to '/nonexistent-folder/b.png'"),
])
def test_bad_arguments_exit_2_naming_the_value(argv, needle, capsys):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("qkv bench: error: ") and needle in captured.err, captured.err
    assert captured.out == ""  # nothing ran


def test_non_integer_length_is_a_usage_error(capsys):
    assert main(["bench", "--lengths", "1k"]) == 2
    err = capsys.readouterr().err
    assert "'1k'" in err and err.count("\n") == 1


def test_png_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["bench", *TINY, "--png", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib: pip install 'qkv[viz]'" in err
    assert not (tmp_path / "b.png").exists()


def _cfg(**kw) -> bench.BenchConfig:
    base = dict(cases=("causal",), dtypes=("float32",), lengths=(64, 128), repeats=1, check_rows=8, min_sample_s=0.0)
    base.update(kw)
    return bench.BenchConfig(**base)


def test_a_wrong_qkv_result_fails_the_check_and_the_command(monkeypatch, capsys):
    """The check can fail: a qkv that is 1% off is caught, reported, and the command exits 1."""
    real = qkv.attention
    monkeypatch.setattr(qkv, "attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.01)
    result = bench.run(_cfg(), stream=io.StringIO())
    assert not result.ok
    assert all(not r["check"]["ok"] and r["check"]["qkv_max_err"] > r["check"]["bound"] for r in result.rows)
    assert "outside the tolerance rule for: causal float32 L=64, causal float32 L=128" in bench.format_table(result)
    assert main(["bench", "--cases", "causal", "--dtypes", "float32", "--lengths", "64", "--repeats", "1",
                 "--check-rows", "8"]) == 1
    captured = capsys.readouterr()
    assert "| causal | float32 | 64 |" in captured.out and "FAILED" in captured.out
    assert "outside the tolerance rule" in captured.err


def test_peers_are_skipped_by_the_memory_and_time_rules():
    stream = io.StringIO()
    result = bench.run(_cfg(cases=("window", "dense"), max_memory_gib=1e-6, max_seconds=1e-9), stream=stream)
    window, dense = [r for r in result.rows if r["case"] == "window"], [r for r in result.rows if r["case"] == "dense"]
    # the window's SDPA needs its L x L bool mask: over a budget of about 1 KiB at both lengths
    assert all("above --max-memory-gib" in r["sdpa"]["skipped"] for r in window)
    # dense SDPA runs at 64, then its predicted time at 128 exceeds --max-seconds
    assert "seconds" in dense[0]["sdpa"] and "above --max-seconds" in dense[1]["sdpa"]["skipped"]
    assert all(r["sdpa_over_qkv"] is None for r in window) and dense[1]["sdpa_over_qkv"] is None
    # qkv itself always runs, and is still checked against float64
    assert all("seconds" in r["qkv"] and r["check"]["ok"] for r in result.rows)
    table = bench.format_table(result)
    assert "| window | float32 | 64 |" in table and "not run: sdpa:" in table
    body = [line for line in table.splitlines() if line.startswith("| window | float32 | 128 |")][0]
    assert body.split("|")[6].strip() == "-"


def test_decode_lengths_and_kv_heads(tmp_path):
    result = bench.run(_cfg(cases=("decode", "gqa"), lengths=(64,), decode_lengths=(256, 512), heads=6, kv_heads=3),
                       stream=io.StringIO())
    assert [(r["case"], r["L"], r["Lq"], r["Hq"], r["Hkv"]) for r in result.rows] == [
        ("decode", 256, 1, 6, 3), ("decode", 512, 1, 6, 3), ("gqa", 64, 64, 6, 3)]
    assert "--decode-lengths 256 512" in result.command and "--kv-heads 3" in result.command
    assert result.ok


def test_threads_option_applies_during_the_run_only():
    before = torch.get_num_threads()
    result = bench.run(_cfg(lengths=(64,), threads=1), stream=io.StringIO())
    assert result.machine["threads"] == 1
    assert torch.get_num_threads() == before


def test_named_backend_is_timed_and_checked():
    result = bench.run(_cfg(cases=("window",), backend="tiled"), stream=io.StringIO())
    assert [r["qkv_backend"] for r in result.rows] == ["tiled", "tiled"] and result.ok


def test_a_backend_that_refuses_a_case_is_reported_not_fatal():
    result = bench.run(_cfg(cases=("dense", "decode"), lengths=(64,), backend="decode"), stream=io.StringIO())
    dense, decode = result.rows
    assert "at most 16 queries" in dense["qkv"]["skipped"] and "seconds" in dense["sdpa"]
    assert dense["sdpa_over_qkv"] is None and dense["check"]["ok"]
    assert "seconds" in decode["qkv"] and decode["qkv_backend"] == "decode" and decode["check"]["ok"]
    table = bench.format_table(result)
    assert "| dense | float32 | 64 | - | decode |" in table and "not run: qkv: the decode backend" in table


def test_flex_unavailable_is_a_note_not_a_failure(monkeypatch):
    monkeypatch.setattr(bench, "flex_probe", lambda: "torch.compile cannot compile FlexAttention here: no compiler")
    result = bench.run(_cfg(lengths=(64,), flex=True), stream=io.StringIO())
    assert result.ok and result.flex == {"requested": True, "available": False,
                                         "reason": "torch.compile cannot compile FlexAttention here: no compiler"}
    assert result.rows[0]["flex"]["skipped"].startswith("skipped: torch.compile cannot")
    table = bench.format_table(result)
    assert "Flex/qkv" in table and "Note: FlexAttention skipped: torch.compile cannot" in table


def test_flex_compiled_when_available():
    """One small cell with compiled FlexAttention: compile time apart, its result checked too."""
    result = bench.run(_cfg(cases=("window",), lengths=(128,), window=32, flex=True), stream=io.StringIO())
    if not result.flex["available"]:
        pytest.skip(f"torch.compile unavailable here: {result.flex['reason']}")
    flex = result.rows[0]["flex"]
    assert _positive_finite(flex["seconds"]) and _positive_finite(flex["first_call_s"])
    assert flex["compile_s"] >= 0 and flex["block_mask_s"] > 0 and flex["calls_per_sample"] >= 1
    check = result.rows[0]["check"]
    assert check["flex_within_rule"] and check["ok"], check
    assert _positive_finite(result.rows[0]["flex_over_qkv"])


def test_growth_exponent_of_synthetic_series():
    rows = [{"case": "causal", "dtype": "float32", "L": L, "qkv": {"seconds": 1e-9 * L * L},
             "sdpa": {"seconds": 1e-6 * L}, "flex": {"skipped": "x"}} for L in (1024, 2048, 8192)]
    got = {g["method"]: g["exponent"] for g in bench.growth(rows)}
    assert got == {"qkv": pytest.approx(2.0), "sdpa": pytest.approx(1.0)}


def test_json_is_written_atomically_over_an_old_file(tmp_path):
    result = bench.run(_cfg(lengths=(64,)), stream=io.StringIO())
    path = tmp_path / "b.json"
    path.write_text("old")
    bench.write_json(result, str(path))
    assert json.loads(path.read_text())["rows"][0]["L"] == 64
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]


def test_json_through_a_symlink_keeps_the_link(tmp_path):
    """The JSON goes to the link's target; the link stays a link (it used to become a file)."""
    result = bench.run(_cfg(lengths=(64,)), stream=io.StringIO())
    real = tmp_path / "results" / "b.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "b.json"
    link.symlink_to(real)
    bench.write_json(result, str(link))
    assert link.is_symlink() and json.loads(real.read_text())["rows"][0]["L"] == 64
    assert not [p for d in (tmp_path, real.parent) for p in d.iterdir() if p.name.endswith(".tmp")]


def test_cli_refuses_a_fifo_as_json_with_status_2(tmp_path, capsys):
    """A FIFO at --json is neither replaced nor written to: one line, status 2."""
    fifo = tmp_path / "b.json"
    os.mkfifo(fifo)
    assert main(["bench", *TINY, "--json", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert f"qkv bench: error: --json: cannot write the file to '{fifo}': it is a FIFO" in err, err  # before the run
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]


def test_inputs_are_deterministic():
    cfg = _cfg()
    a = bench.inputs(cfg, "gqa", "bfloat16", 64)
    b = bench.inputs(cfg, "gqa", "bfloat16", 64)
    c = bench.inputs(bench.BenchConfig(seed=1), "gqa", "bfloat16", 64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert [tuple(x.shape) for x in a] == [(1, 8, 64, 64), (1, 2, 64, 64), (1, 2, 64, 64)]


def test_shared_timer_keeps_the_first_call_apart_and_interleaves():
    """qkv.bench.timing, the timer of `qkv bench` and benchmarks/: first call apart, samples in turns."""
    from qkv.bench.timing import best_of, best_of_turns

    calls = []
    runs = best_of_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    for run in runs.values():
        assert len(run["samples_s"]) == 3 and run["seconds"] == min(run["samples_s"]) and run["calls_per_sample"] == 1
        assert run["first_call_s"] >= 0 and run["median_s"] == sorted(run["samples_s"])[1]
    calls.clear()
    once = best_of(lambda: calls.append("c"), repeats=2, warmup=False)  # the first call counts as a sample
    assert calls == ["c", "c"] and once["samples_s"][0] == once["first_call_s"]
    fast = best_of(lambda: None, repeats=1, min_sample_s=0.01)
    assert fast["calls_per_sample"] > 1  # a fast call is repeated until a sample lasts min_sample_s


def test_within_rule_is_the_rule_assert_within_rule_enforces():
    from qkv.testing import assert_within_rule, within_rule

    exact = torch.tensor([1.0, -2.0], dtype=torch.float64)
    plain = torch.tensor([1.001, -2.0])
    ok, err, bound = within_rule(torch.tensor([1.002, -2.0]), plain, exact, factor=FWD_FACTOR)
    assert ok and err == pytest.approx(0.002, rel=1e-4)
    assert bound == pytest.approx(FWD_FACTOR * (plain[0].double() - 1).item() + rounding_term(exact, torch.float32))
    bad = torch.tensor([1.003, -2.0])
    assert not within_rule(bad, plain, exact, factor=FWD_FACTOR)[0]
    assert not within_rule(torch.tensor([float("nan"), -2.0]), plain, exact, factor=FWD_FACTOR)[0]
    with pytest.raises(AssertionError, match="x: error .* exceeds 2.0x the plain torch.float32"):
        assert_within_rule(bad, plain, exact, factor=FWD_FACTOR, what="x")


def test_check_band_holds_each_method_to_the_keys_its_band_lets_a_row_see():
    """qkv.bench.verify.check_band: a causal window's output passes against the windowed float64 reference; the
    same inputs' unbanded output is named as outside the rule."""
    from qkv.bench.verify import check_band
    from qkv.core.spec import build_spec

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))  # (B, H, L, D)
    kw = dict(causal=True, window=8)
    banded, unbanded = qkv.attention(q, k, v, **kw), qkv.attention(q, k, v)
    bad, check = check_band(q, k, v, {"qkv": banded, "plain": unbanded}, build_spec(q, k, v, **kw), n_rows=16)
    assert bad == ["plain"] and check["ok"] and check["rows_checked"] == 16, check
