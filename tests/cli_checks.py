"""How the command line must fail, shared by the tests of `qkv ...`'s refusals (test_cli_errors.py,
test_cli_image.py)."""

from __future__ import annotations

import re

from qkv import cli


def one_line_error(capsys, argv, *needles) -> str:
    """Run the CLI in-process; it must exit 2 with one line on stderr holding every needle, stdout empty,
    in the command line's words, not the Python API's (truncate=True, rows='focus', focus_rows(),
    interpolate_pos_encoding)."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}; stdout {out[:300]!r}; stderr {err[:300]!r}"
    assert out == "", f"printed before failing: {out[:300]!r}"
    assert err.count("\n") == 1 and err.startswith("qkv"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not re.search(r"\b[a-z_]+=(True|False|'|\")|\w\(\)", err), err
    assert "interpolate_pos_encoding" not in err, err
    return err
