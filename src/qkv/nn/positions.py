"""Position information for attention: rotary embeddings, ALiBi, learned absolute positions.

- Rotary position embedding (RoPE): Su et al. 2021, "RoFormer: Enhanced Transformer with
  Rotary Position Embedding". Default layout is the Llama convention (Touvron et al. 2023;
  Hugging Face `rotate_half`): the head dimension is split in two halves, and feature i is
  rotated together with feature i + D/2. `interleaved=True` gives the original RoFormer /
  GPT-J pairing of features (2i, 2i+1). Longer contexts than a model was trained on come from
  rescaled frequencies (`rope_inv_freq`): linear interpolation (Chen et al. 2023, "Extending
  Context Window of Large Language Models via Positional Interpolation"), dynamic NTK-aware
  scaling (bloc97 and emozilla, 2023, posts on r/LocalLLaMA), YaRN (Peng et al. 2023, "YaRN:
  Efficient Context Window Extension of Large Language Models"), LongRoPE (Ding et al. 2024,
  "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens"; Phi-3) and Llama 3.1's
  smoothed interpolation, each as transformers 5.24 computes it.
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
# The rope types `rope_inv_freq` computes (transformers 5.24's `modeling_rope_utils`, whose
# formulas these follow) and the keys of the scaling dict each one requires. Optional keys:
# yarn's attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim, truncate; longrope's
# factor, attention_factor. `max_position_embeddings` (the config field, which transformers reads
# from the config) is required by dynamic, and by yarn and longrope when their factor is None.
ROPE_NEEDS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_inv_freq(head_dim: int, theta: float = 10000.0, *, rope_scaling: Optional[dict] = None,
                  seq_len: Optional[int] = None) -> tuple[Tensor, float]:
    """Inverse frequencies of RoPE, float32, and the factor cos/sin are multiplied by.

    Args:
        head_dim: D, the rotated size (even; for a partial rotation the rotated part R).
        theta: the base (Llama's `rope_theta`).
        rope_scaling: a Hugging Face rope dict with `rope_type` (or `type`): None or "default";
            "linear" (Chen et al. 2023, position interpolation: every frequency / factor);
            "dynamic" (NTK-aware scaling, bloc97/emozilla 2023: the base grows with the length
            beyond max_position_embeddings); "yarn" (Peng et al. 2023, "YaRN": interpolate the
            slow frequencies, keep the fast ones, ramp between, and scale cos/sin); "longrope"
            (Ding et al. 2024, "LongRoPE": one factor per frequency, a short and a long list);
            "llama3" (Llama 3.1's smoothed interpolation). Keys as in `ROPE_NEEDS`.
        seq_len: the sequence length the frequencies are for: dynamic and longrope depend on it
            (None = at build time, as transformers computes them first: dynamic as for
            max_position_embeddings, longrope's short factors).

    Returns:
        (inv_freq (D/2,) float32, attention_scaling float).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension; got {head_dim}")
    s = rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind not in ROPE_NEEDS:
        raise ValueError(f"rope scaling type {kind!r} is not supported; qkv supports "
                         f"{', '.join(repr(k) for k in ROPE_NEEDS)}")
    missing = [k for k in ROPE_NEEDS[kind] if k not in s]
    if kind in ("yarn", "longrope") and s.get("factor") is None and "max_position_embeddings" not in s:
        missing.append("max_position_embeddings")  # the factor is then max_position_embeddings / original
    if missing:
        raise ValueError(f"rope scaling type {kind!r} needs {', '.join(missing)}; got {rope_scaling}")
    if s.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_inv_freq takes the rotated size as head_dim; pass int(head_dim * "
                         "partial_rotary_factor) and leave partial_rotary_factor out of the dict")
    D = head_dim
    # Explicit CPU device: models are built under `with torch.device("meta")`.
    even = torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float()  # (D/2,): 0, 2, 4, ...
    inv_freq = 1.0 / (theta ** (even / D))  # (D/2,)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(s["factor"]), 1.0
    if kind == "dynamic":
        return _dynamic(D, theta, even, float(s["factor"]), int(s["max_position_embeddings"]), seq_len), 1.0
    if kind == "yarn":
        return _yarn(D, theta, even, s)
    if kind == "longrope":
        return _longrope(D, theta, even, s, seq_len)
    return _llama3(inv_freq, s), 1.0


def _dynamic(D: int, theta: float, even: Tensor, factor: float, max_pos: int, seq_len: Optional[int]) -> Tensor:
    """NTK-aware dynamic scaling: base * (factor * n / max_pos - (factor - 1)) ** (D / (D - 2)) for
    n = max(seq_len, max_pos), so nothing changes up to max_position_embeddings."""
    if D <= 2:
        raise ValueError(f"dynamic rope scaling needs a rotated size above 2 (it raises to D / (D - 2)); got {D}")
    if seq_len is None:  # at build time transformers computes in Python floats, n = max_pos
        base = theta * ((factor * max_pos / max_pos) - (factor - 1)) ** (D / (D - 2))
    else:  # while running, n is a tensor (the largest position + 1) and the base float32, as there
        n = torch.tensor(max(int(seq_len), max_pos), dtype=torch.int64, device="cpu")
        base = theta * ((factor * n / max_pos) - (factor - 1)) ** (D / (D - 2))
    return 1.0 / (base ** (even / D))  # (D/2,)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(D: int, theta: float, even: Tensor, s: dict) -> tuple[Tensor, float]:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are
    interpolated (/ factor), those turning more than beta_fast times kept, a linear ramp between;
    cos/sin are multiplied by the attention factor (0.1 ln(factor) + 1 unless given)."""
    orig = int(s["original_max_position_embeddings"])
    factor = s["factor"]
    factor = s["max_position_embeddings"] / orig if factor is None else float(factor)
    attention_factor = s.get("attention_factor")
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_turning(turns: float) -> float:
        """The feature index whose frequency turns `turns` times over the original context."""
        return (D * math.log(orig / (turns * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # a ramp of width 0 would divide by zero
    ramp = ((torch.arange(D // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # (D/2,) 0 -> 1
    keep = 1 - ramp  # (D/2,) share of the original (extrapolated) frequency
    pos_freqs = theta ** (even / D)  # (D/2,)
    kept, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)  # (D/2,) each
    return interpolated * (1 - keep) + kept * keep, attention_factor


def _longrope(D: int, theta: float, even: Tensor, s: dict, seq_len: Optional[int]) -> tuple[Tensor, float]:
    """LongRoPE: frequency i / long_factor[i] once the sequence is longer than the original
    context, / short_factor[i] up to it; cos/sin times sqrt(1 + ln(factor) / ln(original))."""
    orig = int(s["original_max_position_embeddings"])
    for key in ("short_factor", "long_factor"):
        if len(s[key]) != D // 2:
            raise ValueError(f"longrope's {key} must hold one factor per rotated pair, {D // 2}; "
                             f"got {len(s[key])}")
    factor = s.get("factor")
    factor = s["max_position_embeddings"] / orig if factor is None else factor
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    long = seq_len is not None and seq_len > orig
    ext = torch.tensor(s["long_factor"] if long else s["short_factor"], dtype=torch.float32, device="cpu")  # (D/2,)
    return 1.0 / (ext * theta ** (even / D)), attention_factor


def _llama3(inv_freq: Tensor, s: dict) -> Tensor:
    """Llama 3.1: wavelengths beyond original/low_freq_factor are interpolated (/ factor), those
    below original/high_freq_factor kept, a smooth blend between."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin of RoPE for given positions (no parameters, nothing in the state dict).

    Two rope types choose their frequencies by the length the sequence has reached, as
    transformers' `dynamic_rope_update` does on each forward pass, with n = the largest position
    + 1 of the call (or `reach`, below):

    - longrope: the long factors once n > original_max_position_embeddings, the short ones up to it;
    - dynamic: frequencies for n once n exceeds the longest length seen so far (first
      max_position_embeddings); back to the original ones when a call stays below
      max_position_embeddings after a longer one. Like transformers', this state persists
      between calls.

    Keys already cached keep the rotation they were stored with, as in transformers.

    Args:
        head_dim: D, the size of each head that is rotated (or R < D, the rotated part of each
            head, for a partial rotation; `apply_rotary` leaves the rest).
        theta: frequency base (10000 in RoFormer and Llama 1/2).
        rope_scaling: optional Hugging Face rope scaling dict (see `rope_inv_freq`).
        interleaved: False = Llama's half-split layout, True = RoFormer's pairs (2i, 2i+1).

    Attributes:
        reach: None, or the length of one forward pass that runs in pieces (chunked prefill):
            a call whose positions all lie below it takes its frequencies for `reach` tokens,
            as the whole pass would (`qkv.models.rope_length` sets it).
        max_length: the longest sequence the scaling is made for when it runs beyond
            max_position_embeddings (dynamic: factor * max_position_embeddings), else None.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, *, rope_scaling: Optional[dict] = None,
                 interleaved: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.interleaved = interleaved
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        s = self.rope_scaling or {}
        self.kind = s.get("rope_type", s.get("type", "default"))
        self._inv_freq, self._attention_scaling = rope_inv_freq(head_dim, theta, rope_scaling=rope_scaling)
        self._original = self._inv_freq  # (D/2,) the frequencies at build time
        self._long: Optional[Tensor] = None  # longrope's long factors' frequencies, made on first use
        self._longest = int(s["max_position_embeddings"]) if self.kind == "dynamic" else 0  # dynamic's state
        self._on_device: tuple = (None, None, None)  # (frequencies, device, their copy there)
        self.reach: Optional[int] = None
        self.max_length = (int(float(s["factor"]) * int(s["max_position_embeddings"]))
                           if self.kind == "dynamic" else None)

    @property
    def depends_on_length(self) -> bool:
        """Whether the frequencies depend on the length reached (dynamic, longrope)."""
        return self.kind in ("dynamic", "longrope")

    def _frequencies(self, positions: Tensor) -> Tensor:
        """(D/2,) float32 inverse frequencies for a call at these positions."""
        if not self.depends_on_length:
            return self._inv_freq
        n = int(positions.max()) + 1 if positions.numel() else 1
        if self.reach is not None and n <= self.reach:
            n = self.reach
        if self.kind == "longrope":
            if n <= int(self.rope_scaling["original_max_position_embeddings"]):
                return self._original
            if self._long is None:
                self._long, _ = rope_inv_freq(self.head_dim, self.theta, rope_scaling=self.rope_scaling,
                                              seq_len=int(self.rope_scaling["original_max_position_embeddings"]) + 1)
            return self._long
        # dynamic: grow past the longest length so far; reset below max_position_embeddings
        max_pos, longest = int(self.rope_scaling["max_position_embeddings"]), self._longest
        if n > longest:
            self._inv_freq, self._attention_scaling = rope_inv_freq(self.head_dim, self.theta,
                                                                    rope_scaling=self.rope_scaling, seq_len=n)
            self._longest = n
        if n < max_pos < longest:
            self._inv_freq, self._longest = self._original, max_pos
        return self._inv_freq

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """positions (L,) or (B, L) int64 -> (cos, sin), each (L, D) or (B, 1, L, D) in `dtype`.

        The result broadcasts against q/k of shape (B, H, L, D).
        """
        inv_freq = self._frequencies(positions)
        if self._on_device[0] is not inv_freq or self._on_device[1] != positions.device:
            self._on_device = (inv_freq, positions.device, inv_freq.to(positions.device))
        freqs = positions[..., None].float() * self._on_device[2]  # (L, D/2) | (B, L, D/2): one rounding, as HF
        cos, sin = freqs.cos(), freqs.sin()  # (..., D/2): each value once (the same bits as HF's on (..., D))
        if self._attention_scaling != 1.0:
            cos, sin = cos * self._attention_scaling, sin * self._attention_scaling
        if self.interleaved:
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)  # (..., D): f0 f0 f1 f1 ...
        else:
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (..., D): f0 f1 ... f0 f1 ...
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
