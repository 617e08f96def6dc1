"""Bad input at the command line: one line on stderr naming the flag, exit status 2, nothing on
stdout (every check runs before a model does and before anything is printed); and a pipe
closed early (`qkv explain ... | head -1`) stops the command quietly after its files are written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_checks import one_line_error
from qkv import cli

TEXT = "The cat sat on the mat."
SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY_BENCH = ["bench", "--cases", "dense", "--dtypes", "float32", "--lengths", "64", "--repeats", "1",
              "--no-progress"]


# --------------------------------------------------------------------------- explain: one pass

EXPLAIN_COMBINATIONS = [
    # (extra argv, needles)
    (["--focus", "cat", "--compare", "A cat."],
     ["--compare needs a sentence as long as the text", "7 words", "the --compare text 3"]),
    (["--focus", "cat", "--compare", "The cat sat on the mat today."], ["7 words", "the --compare text 8"]),
    (["--focus", "cat", "--compare", "The cat sat on the mat.", "--level", "token", "--truncate"], None),
    # --rows focus goes with --json, --html, --png and --compare (tests/inspect/test_views_long.py); not rollout
    (["--focus", "cat", "--rows", "focus", "--compare", "The dog sat on the mat."], None),
    (["--focus", "cat", "--rows", "focus", "--method", "rollout"],
     ["--method rollout", "--rows focus", "use --rows auto (the default) or --rows all"]),
    (["--rows", "focus"], ["--rows focus needs --focus WORD"]),
    (["--method", "rollout", "--head", "3"], ["--method rollout", "--head"]),
    (["--focus", "cat", "--method", "rollout", "--head", "3"], ["--method rollout", "--head"]),
    (["--focus", "dog"], ["focus word 'dog' is not in the text"]),
    (["--focus", "cat", "--layer", "6"], ["--layer 6 does not exist"]),
    (["--head", "12"], ["--head 12 does not exist"]),
    (["--json", "{tmp}/same.json", "--html", "{tmp}/same.json"], ["--json and --html name the same file"]),
    (["--model", "translate", "--focus", "cat", "--rows", "focus"], ["--rows focus", "encoder-decoder"]),
    (["--model", "translate", "--method", "value-norm"], ["--method value-norm", "use --method raw"]),
    (["--model", "translate", "--layer", "0"], ["--layer 0 is not a cross-attention layer", "3, 5"]),
]


@pytest.mark.parametrize("extra, needles", EXPLAIN_COMBINATIONS)
def test_explain_checks_every_combination_before_running_or_printing(extra, needles, tmp_path, capsys, monkeypatch):
    """Refused before the model runs (its forward is replaced by a failure) and before any output."""
    from qkv.inspect.capture import Recorder

    argv = ["explain", "the big red cat sees a small dog" if "translate" in extra else TEXT, "--color", "never"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    if needles is None:  # a control: the same checks let a good command through
        assert cli.main(argv) == 0
        assert "comparison with" in capsys.readouterr().out
        return

    def no_forward(*a, **k):
        raise AssertionError("the model ran before every option was checked")

    monkeypatch.setattr(Recorder, "attach", no_forward)
    one_line_error(capsys, argv, *needles)
    assert not list(tmp_path.iterdir()), "a file was written"


# --------------------------------------------------------------------------- numbers

NUMBERS = [
    # (argv, the flag named)
    (["generate", "c3 a7 k2 ? a", "--temperature", "nan"], "--temperature"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "inf"], "--temperature"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "-0.5"], "--temperature"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "1", "--top-p", "0"], "--top-p"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "1", "--top-p", "1.5"], "--top-p"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "1", "--top-p", "nan"], "--top-p"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "1", "--top-k", "0"], "--top-k"),
    (["generate", "c3 a7 k2 ? a", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "c3 a7 k2 ? a", "--max-new-tokens", "50"], "--max-new-tokens"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "1", "--seed", "-1"], "--seed"),
    (["generate", "c3 a7 k2 ? a", "--temperature", "1", "--seed", str(2**70)], "--seed"),
    (["demo", "--columns", "nan"], "--columns"),
    (["demo", "--columns", "65"], "--columns"),
    (["explain", TEXT, "--layer", "-1"], "--layer"),
    (["explain", TEXT, "--top-k", "0"], "--top-k"),
    (["explain", TEXT, "--head", "1.5"], "--head"),
    (["serve", "--port", "-1"], "--port"),
    (["serve", "--max-chars", "nan"], "--max-chars"),
    ([*TINY_BENCH, "--max-seconds", "inf"], "--max-seconds"),
    ([*TINY_BENCH, "--max-seconds", "nan"], "--max-seconds"),
    ([*TINY_BENCH, "--max-memory-gib", "-1"], "--max-memory-gib"),
    ([*TINY_BENCH, "--batch", "0"], "--batch"),
    ([*TINY_BENCH, "--dim", "nan"], "--dim"),
    ([*TINY_BENCH, "--window", "-1"], "--window"),
    ([*TINY_BENCH, "--check-rows", "0"], "--check-rows"),
    ([*TINY_BENCH, "--seed", "-5"], "--seed"),
    ([*TINY_BENCH, "--kv-heads", "0"], "--kv-heads"),
]


@pytest.mark.parametrize("argv, flag", NUMBERS)
def test_numbers_out_of_range_or_not_finite_name_their_flag(argv, flag, capsys):
    one_line_error(capsys, argv, flag)


# --------------------------------------------------------------------------- text

TEXTS = [
    # (argv, needles): "\udce9" is how Python hands over the byte 0xE9 of an argument that is not UTF-8
    (["explain", "caf\udce9 au lait"], ["the text is not valid Unicode at index 3", "byte 0xE9"]),
    (["explain", TEXT, "--focus", "cat", "--compare", "The \udcff sat on the mat."],
     ["the --compare text is not valid Unicode at index 4", "byte 0xFF"]),
    (["explain", "\ud800 cat"], ["not valid Unicode at index 0", "U+D800"]),
    (["generate", "c3 a7\udce9"], ["the prompt is not valid Unicode at index 5"]),
    (["translate", "the cat sees a dog", "the \udce4og"], ["sentence 2 is not valid Unicode at index 4"]),
    (["similarity", "a cat", "a d\udcf6g"], ["sentence 2 is not valid Unicode at index 3"]),
    (["explain", "  "], ["the text is empty"]),
    (["explain", TEXT, "--focus", "cat", "--compare", " "], ["the --compare text is empty"]),
    (["explain", "word " * 600, "--focus", "word"], ["512", "--truncate"]),
    (["similarity", "a cat", "word " * 300], ["sentence 2 has", "at most 256", "--truncate"]),
]


@pytest.mark.parametrize("argv, needles", TEXTS)
def test_text_the_tokenizer_cannot_take_is_one_line(argv, needles, capsys):
    one_line_error(capsys, argv, *needles)


@pytest.mark.slow
def test_bytes_that_are_not_utf8_from_a_real_command_line():
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, "-m", "qkv", "explain", b"caf\xe9 au lait"], env=env,
                          capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and proc.stdout == b"", (proc.returncode, err)
    assert "not valid Unicode at index 3" in err and "0xE9" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- output files

OUTPUTS = [
    (["explain", TEXT, "--json", ""], "--json: the file name is empty"),
    (["explain", TEXT, "--html", " "], "--html: the file name is empty"),
    (["explain", TEXT, "--png", ""], "--png: the file name is empty"),
    (["explain", TEXT, "--json", "{tmp}"], "it is a directory; give a file name"),
    (["explain", TEXT, "--html", "{tmp}/no/such/folder/a.html"], "--html: cannot write"),
    ([*TINY_BENCH, "--json", ""], "--json: the file name is empty"),
    ([*TINY_BENCH, "--png", ""], "--png: the file name is empty"),
    ([*TINY_BENCH, "--json", "{tmp}/b.json", "--png", "{tmp}/b.json"], "--json and --png name the same file"),
    # what is at the path is checked as the writer will check it (qkv._files), before the run
    (["explain", TEXT, "--json", "{tmp}/fifo"], "--json: cannot write the file to"),
    ([*TINY_BENCH, "--json", "{tmp}/fifo"], "it is a FIFO"),
    (["train", "recall", "--out", ""], "--out: the folder name is empty"),
]


@pytest.mark.parametrize("argv, needle", OUTPUTS)
def test_output_paths_are_checked_before_anything_runs(argv, needle, tmp_path, capsys):
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
    one_line_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], needle)
    if (tmp_path / "fifo").exists():
        assert (tmp_path / "fifo").is_fifo(), "the FIFO was replaced"


# --------------------------------------------------------------------------- closed pipes


def _explain_argv(tmp_path):
    return ["explain", TEXT, "--focus", "cat", "--color", "always", "--json", str(tmp_path / "a.json"),
            "--html", str(tmp_path / "a.html")]


def _check_files(tmp_path):
    assert (tmp_path / "a.json").stat().st_size > 1000 and (tmp_path / "a.html").stat().st_size > 1000


class _ClosedPipe:
    """A stdout whose reader has gone: every write raises BrokenPipeError, as a closed pipe does."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def isatty(self):
        return False


def test_closed_stdout_in_process_writes_the_files_and_returns_141(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert cli.main(_explain_argv(tmp_path)) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
    _check_files(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("buffered", [True, False])
def test_reader_gone_before_any_output(tmp_path, buffered):
    """The read end of stdout is closed before the command writes: exit 141, files written, stderr silent."""
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "qkv", *_explain_argv(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err
    _check_files(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("head") is None or shutil.which("bash") is None, reason="needs bash and head")
def test_pipe_through_head(tmp_path):
    """`qkv explain ... | head -1`: one line out, the files written, no "Broken pipe" on stderr, and
    an exit status of 0 (all output fitted in the pipe) or 141 (the reader left first)."""
    argv = " ".join(f"'{a}'" for a in _explain_argv(tmp_path))
    script = (f"{sys.executable} -m qkv {argv} 2>{tmp_path}/err | head -1 >{tmp_path}/out; "
              "echo ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], env=dict(os.environ, PYTHONPATH=SRC), capture_output=True,
                          text=True, timeout=120)
    status = int(proc.stdout.strip())
    err = (tmp_path / "err").read_text()
    assert status in (0, 141), (status, err)
    assert "Broken pipe" not in err and "Exception ignored" not in err and err == "", err
    assert (tmp_path / "out").read_text().count("\n") == 1
    _check_files(tmp_path)
