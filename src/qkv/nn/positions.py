"""Position information for attention: rotary embeddings, ALiBi, learned absolute positions.

- Rotary position embedding (RoPE): Su et al. 2021, "RoFormer: Enhanced Transformer with
  Rotary Position Embedding". Default layout is the Llama convention (Touvron et al. 2023;
  Hugging Face `rotate_half`): the head dimension is split in two halves, and feature i is
  rotated together with feature i + D/2. `interleaved=True` gives the original RoFormer /
  GPT-J pairing of features (2i, 2i+1).
- ALiBi: Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases": a
  per-head linear penalty on the query-key distance, added to the scores.
- Learned absolute positions (Vaswani et al. 2017 used fixed sinusoids; BERT and GPT-2 learn a
  table): `LearnedPositions`, an embedding indexed by position that checks the range.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


# ------------------------------------------------------------------------------ rotary
def rope_inv_freq(head_dim: int, theta: float = 10000.0, *,
                  rope_scaling: Optional[dict] = None) -> tuple[Tensor, float]:
    """Inverse frequencies of RoPE, float32, and the factor cos/sin are multiplied by.

    Args:
        head_dim: D, the rotated size (even).
        theta: the base (Llama's `rope_theta`).
        rope_scaling: None / {"rope_type": "default"}, {"rope_type": "linear", "factor": f}, or
            {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"} as in Hugging Face configs.

    Returns:
        (inv_freq (D/2,) float32, attention_scaling float).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension; got {head_dim}")
    # Explicit CPU device: models are built under `with torch.device("meta")`.
    even = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()  # (D/2,)
    inv_freq = 1.0 / (theta ** (even / head_dim))  # (D/2,)
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    needs = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [k for k in needs.get(kind, ()) if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope scaling type {kind!r} needs {', '.join(missing)}; got {rope_scaling}")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(rope_scaling["factor"])
        low, high = float(rope_scaling["low_freq_factor"]), float(rope_scaling["high_freq_factor"])
        old_len = float(rope_scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(
        f"rope scaling type {kind!r} is not supported; qkv supports 'default', 'linear' and 'llama3'"
    )


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions (no parameters, nothing in the state dict).

    Args:
        head_dim: D, the size of each head that is rotated (or R < D, the rotated part of each
            head, for a partial rotation; `apply_rotary` leaves the rest).
        theta: frequency base (10000 in RoFormer and Llama 1/2).
        rope_scaling: optional Hugging Face rope scaling dict (see `rope_inv_freq`).
        interleaved: False = Llama's half-split layout, True = RoFormer's pairs (2i, 2i+1).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, *, rope_scaling: Optional[dict] = None,
                 interleaved: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.interleaved = interleaved
        self._inv_freq, self._attention_scaling = rope_inv_freq(head_dim, theta, rope_scaling=rope_scaling)
        self._table: Optional[tuple[Tensor, Tensor]] = None  # cos, sin (L, D) float32, grown on demand

    def _ensure(self, length: int, device) -> tuple[Tensor, Tensor]:
        t = self._table
        if t is None or t[0].shape[0] < length or t[0].device != torch.device(device):
            n = max(length, 2 * t[0].shape[0] if t is not None else 256)
            pos = torch.arange(n, device=device, dtype=torch.int64).float()  # (n,)
            freqs = torch.outer(pos, self._inv_freq.to(device))  # (n, D/2): one rounding, as HF
            if self.interleaved:
                emb = freqs.repeat_interleave(2, dim=-1)  # (n, D): f0 f0 f1 f1 ...
            else:
                emb = torch.cat([freqs, freqs], dim=-1)  # (n, D): f0 f1 ... f0 f1 ...
            t = (emb.cos() * self._attention_scaling, emb.sin() * self._attention_scaling)
            self._table = t
        return t

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """positions (L,) or (B, L) int64 -> (cos, sin), each (L, D) or (B, 1, L, D) in `dtype`.

        The result broadcasts against q/k of shape (B, H, L, D).
        """
        cos, sin = self._ensure(int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        cos, sin = cos[positions], sin[positions]  # (L, D) or (B, L, D)
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, L, D)
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat([-x2, x1], dim=-1)  # (..., D)


def _rotate_pairs(x: Tensor) -> Tensor:
    x = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
    return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-2)  # (..., D)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate queries or keys by their positions.

    Args:
        x: (B, H, L, D) queries or keys.
        cos, sin: from `RotaryEmbedding`, (L, R) or (B, 1, L, R) with R <= D even. R < D is a
            partial rotation (GPT-NeoX, StableLM, Phi: `partial_rotary_factor`): the first R
            features of each head are rotated, the other D - R pass through unchanged.
        interleaved: must match the RotaryEmbedding's layout.

    Returns:
        (B, H, L, D), x's dtype.
    """
    R, D = cos.shape[-1], x.shape[-1]
    if R > D:
        raise ValueError(f"rotary tables of size {R} do not fit heads of size {D}; build the RotaryEmbedding "
                         f"with head_dim <= {D}")
    if R < D:
        part, rest = x[..., :R], x[..., R:]  # (B, H, L, R), (B, H, L, D - R)
        return torch.cat([apply_rotary(part, cos, sin, interleaved=interleaved), rest], dim=-1)  # (B, H, L, D)
    rotated = _rotate_pairs(x) if interleaved else _rotate_half(x)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------- ALiBi
def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's per-head slopes, float32 (H,): 2^(-8/n), 2^(-16/n), ... (Press et al. 2022).

    For a head count that is not a power of two, the paper's recipe: the slopes of the next
    lower power of two, then every other slope of the next higher one.
    """
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive; got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, q_len: int, k_len: int, *, causal_offset: Optional[int] = None) -> Tensor:
    """ALiBi as a float mask for `qkv.attention(mask=...)`.

    Args:
        slopes: (H,) per-head slopes, e.g. `alibi_slopes(H)`.
        q_len, k_len: Lq and Lk.
        causal_offset: key position of query 0; default Lk - Lq (qkv's bottom-right alignment,
            so a chunk of new queries against a KV cache gets the right distances).

    Returns:
        (1, H, Lq, Lk) float32 bias -slope * |i_pos - j|.
    """
    offset = k_len - q_len if causal_offset is None else causal_offset
    q_pos = torch.arange(q_len, device=slopes.device).unsqueeze(1) + offset  # (Lq, 1)
    k_pos = torch.arange(k_len, device=slopes.device).unsqueeze(0)  # (1, Lk)
    dist = (q_pos - k_pos).abs().float()  # (Lq, Lk)
    return (-slopes.float().view(1, -1, 1, 1) * dist).contiguous()  # (1, H, Lq, Lk)


def alibi_score_mod(slopes: Tensor, q_len: int, k_len: int):
    """ALiBi as a `score_mod(score, b, h, q_idx, kv_idx)` for `qkv.attention(score_mod=...)`.

    Same meaning as `alibi_bias` (bottom-right aligned), but evaluated per block by the
    backends that take score functions, so no (Lq, Lk) tensor is materialised.
    """
    offset = k_len - q_len

    def score_mod(score, b, h, q_idx, kv_idx):
        dist = (q_idx + offset - kv_idx).abs().to(score.dtype)
        return score - slopes.to(score.device, score.dtype)[h] * dist

    return score_mod


# -------------------------------------------------------------- learned absolute positions
class LearnedPositions(nn.Embedding):
    """A learned table of absolute positions (BERT, GPT-2): `weight` (max_positions, dim).

    Indexing beyond the table raises a ValueError that names the limit, instead of an
    IndexError from inside the embedding.
    """

    def forward(self, positions: Tensor) -> Tensor:
        """positions (L,) or (B, L) int64 -> (L, dim) or (B, L, dim)."""
        if positions.numel() and int(positions.max()) >= self.num_embeddings:
            raise ValueError(
                f"position {int(positions.max())} is beyond this model's {self.num_embeddings} learned "
                f"positions; shorten the input (or truncate it) to at most {self.num_embeddings} tokens"
            )
        return super().forward(positions)
