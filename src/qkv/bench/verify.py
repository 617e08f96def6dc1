"""The check of every qkv result in `qkv bench`: sampled query rows against the float64
reference under the tolerance rule of `qkv.testing` (after flash-attention's tests): the
error must be at most FWD_FACTOR times the plain reference's error in the same dtype, plus a
rounding term."""

from __future__ import annotations

from typing import Optional

import torch

from ..testing import FWD_FACTOR, within_rule


def check_rows(Lq: int, n: int) -> torch.Tensor:
    """Up to n query rows spread evenly over 0..Lq-1, first and last included: (rows,) long."""
    return torch.linspace(0, Lq - 1, min(n, Lq)).round().long().unique()


def verify(q, k, v, outputs: dict, rows: torch.Tensor, allowed: Optional[torch.Tensor]) -> dict:
    """Errors of each method's output against float64 on the given rows; qkv's against the rule.

    Args:
        q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), the inputs every method ran on.
        outputs: {method: (B, H, Lq, D) output}.
        rows: (R,) long, the query rows to check.
        allowed: (R, Lk) bool, the keys each checked row sees, or None for all.
    """
    from .. import reference_attention

    mask = None if allowed is None else allowed[None, None]  # (1, 1, R, Lk)
    q_rows = q[:, :, rows]  # (B, H, R, D)
    exact = reference_attention(q_rows.double(), k.double(), v.double(), mask=mask)  # (B, H, R, D)
    plain = reference_attention(q_rows, k, v, mask=mask)  # (B, H, R, D)
    # the plain run against itself: its own error, and the bound every method is held to
    _, plain_err, bound = within_rule(plain, plain, exact, factor=FWD_FACTOR)
    check = {"rows_checked": int(rows.numel()), "exact_max_abs": exact.abs().max().item(),
             "plain_max_err": plain_err, "bound": bound}
    check["ok"] = True  # stays so when there is nothing of qkv's to check (its backend refused the case)
    for method, out in outputs.items():
        ok, check[f"{method}_max_err"], _ = within_rule(out[:, :, rows], plain, exact, factor=FWD_FACTOR)
        check["ok" if method == "qkv" else f"{method}_within_rule"] = ok
    if "qkv" in outputs and "sdpa" in outputs:
        check["qkv_vs_sdpa_max_diff"] = (outputs["qkv"].double() - outputs["sdpa"].double()).abs().max().item()
    return check


def check_band(q, k, v, outputs: dict, spec, n_rows: int = 48) -> tuple[list, dict]:
    """`verify` on up to n_rows query rows spread over q's, each against the keys `spec`'s band lets it
    see (AttentionSpec.band_edges): (the methods of `outputs` outside the rule, verify's check).

    Args:
        q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); outputs: {method: (B, H, Lq, D)}, "qkv" among them or not.
        spec: the call's AttentionSpec (its band: causal, window).
    """
    rows = check_rows(q.shape[2], n_rows)  # (R,)
    lo, hi = spec.band_edges(rows.view(-1, 1))  # (R, 1) each
    keys = torch.arange(k.shape[2]).view(1, -1)  # (1, Lk)
    check = verify(q, k, v, outputs, rows, (keys >= lo) & (keys < hi))  # allowed: (R, Lk)
    return [m for m in outputs if not check["ok" if m == "qkv" else f"{m}_within_rule"]], check
