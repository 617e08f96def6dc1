"""`qkv demo`: the numpy sample of the seed article, reproduced through qkv.

The seed (shared/seeds/001) draws Q, K and V with `np.random.seed(42); np.random.rand(5, 64)`,
scores them with unscaled dot products and a plain softmax exp(x) / sum(exp(x)). This
module draws the very same numbers without numpy: numpy's legacy seeding is MT19937's
init_genrand (Matsumoto & Nishimura, 1998), and its random_sample uses the same 53-bit
construction as Python's random.random(), so setting Python's generator to that state
reproduces the stream exactly.
"""

from __future__ import annotations

import math
import random

import torch

from .core import reference_attention

TOKENS = ["The", "cat", "sat", "on", "mat"]


def numpy_rand(seed: int, *shape: int) -> torch.Tensor:
    """The values `np.random.seed(seed); np.random.rand(*shape)` gives, as float64."""
    key = [0] * 624
    key[0] = seed & 0xFFFFFFFF
    for i in range(1, 624):  # MT19937 init_genrand, as numpy's legacy seeding does
        key[i] = (1812433253 * (key[i - 1] ^ (key[i - 1] >> 30)) + i) & 0xFFFFFFFF
    gen = random.Random()
    gen.setstate((3, tuple(key) + (624,), None))
    n = math.prod(shape)
    return torch.tensor([gen.random() for _ in range(n)], dtype=torch.float64).reshape(shape)


def seed_sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V of the seed sample, in the order numpy draws them: each (5, 64) float64."""
    gen_all = numpy_rand(42, 3 * 5 * 64).reshape(3, 5, 64)
    return gen_all[0], gen_all[1], gen_all[2]


def sample_math(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor):
    """The sample's three steps exactly as written there: no scaling, no max subtraction."""
    scores = Q @ K.T  # (5, 5)
    weights = torch.exp(scores) / torch.exp(scores).sum(dim=-1, keepdim=True)  # (5, 5)
    return scores, weights, weights @ V  # output (5, 64)


def format_array(a: torch.Tensor, linewidth: int = 75) -> str:
    """A 2-D array printed in the style of numpy's repr (8 decimals, wrapped rows)."""
    cells = [[f"{x:.8f}" for x in row.tolist()] for row in a]
    width = max(len(c) for row in cells for c in row)
    lines = []
    for r, row in enumerate(cells):
        prefix = "[[" if r == 0 else " ["
        line, out = prefix, []
        for c, cell in enumerate(row):
            piece = cell.rjust(width)
            if len(line) + len(piece) + 3 > linewidth and line.strip("[ "):
                out.append(line.rstrip())
                line = "  "
            line += piece + ("" if c == len(row) - 1 else " ")
        line += "]]" if r == len(cells) - 1 else "]"
        out.append(line)
        lines.extend(out)
    return "\n".join(lines)


def run(show_output_columns: int = 64) -> str:
    """The demo's text."""
    Q, K, V = seed_sample()
    scores, weights, output = sample_math(Q, K, V)
    # The same computation through qkv's reference: (1, 1, 5, 64) is (batch, heads, tokens, dim).
    qkv_out = reference_attention(Q[None, None], K[None, None], V[None, None], scale=1.0)[0, 0]
    diff = (qkv_out - output).abs().max().item()

    lines = [
        "qkv demo: the seed's numpy sample, computed again through qkv",
        "",
        f"tokens {TOKENS}; Q, K, V of shape (5, 64) from np.random.seed(42), np.random.rand",
        "",
        "Attention Scores:",
        " " + format_array(scores),
        "Attention Weights (after Softmax):",
        " " + format_array(weights),
        "Final Attention Output:"
        + ("" if show_output_columns >= 64 else f" (first {show_output_columns} of 64 columns)"),
        " " + format_array(output[:, :show_output_columns]),
        "",
        f"qkv.reference_attention(Q, K, V, scale=1.0) gives the same output: max |difference| = {diff:.1e}"
        + ("  (match)" if diff < 1e-12 else "  (MISMATCH)"),
        "",
        "Row 'cat': " + ", ".join(f"{t} {w:.3f}" for t, w in zip(TOKENS, weights[1].tolist())),
        "",
    ]

    # What qkv does differently by default, and why.
    d = Q.shape[-1]
    scaled = reference_attention(Q[None, None], K[None, None], V[None, None])[0, 0]
    big_scores, big_weights, _ = sample_math(Q * 50, K, V)
    safe = torch.softmax(big_scores, dim=-1)
    nan_count = int(torch.isnan(big_weights).sum())
    lines += [
        "What qkv does by default, and why:",
        f"- scale = 1/sqrt(d) = 1/sqrt({d}) = {1 / math.sqrt(d):.3f}. Dot products of d-dimensional vectors grow",
        "  with d; unscaled, the softmax saturates towards one key and its gradients vanish",
        "  (Vaswani et al., 2017). Pass scale=1.0 to get the sample's numbers, as above.",
        f"  With the default scale, the output's first row starts {[round(x, 4) for x in scaled[0, :4].tolist()]}.",
        "- the softmax subtracts each row's maximum before exp(). The sample's exp(x)/sum(exp(x))",
        f"  overflows once scores pass about 709: with Q scaled by 50 (scores up to {big_scores.max().item():.0f})",
        f"  it returns {nan_count} NaN weights of 25, while the max-subtracted softmax gives rows",
        f"  that sum to {safe.sum(-1).min().item():.6f}..{safe.sum(-1).max().item():.6f}.",
        "- float32 accumulation for bfloat16 and float16, zeros (never NaN) for a row that may",
        "  attend to nothing, and backends that never build the full score matrix (backend='tiled').",
    ]
    return "\n".join(lines)
