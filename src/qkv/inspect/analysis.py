"""Analyses of attention maps, as pure functions of tensors.

- Attention rollout with the residual identity term: Abnar & Zuidema, 2020, "Quantifying
  Attention Flow in Transformers".
- Value-weighted norms ||alpha_ij f(v_j)||: Kobayashi et al., 2020, "Attention is Not Only
  a Weight: Analyzing Transformers with Vector Norms".
- Sub-word to word merging (sum over a word's key pieces, mean over its query pieces):
  Clark et al., 2019, "What Does BERT Look At?".
- Entropy per head, and the Jensen-Shannon divergence for comparing two focus rows.

Maps are (..., n, n) with rows = queries and columns = keys.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def aggregate(maps: Tensor, dim: int, how: str = "mean") -> Tensor:
    """Mean or max of maps over one dimension (heads or layers)."""
    if how == "mean":
        return maps.mean(dim=dim)
    if how == "max":
        return maps.amax(dim=dim)
    raise ValueError(f"aggregation must be 'mean' or 'max'; got {how!r}")


def rollout(layer_maps: Tensor, residual: bool = True) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020).

    layer_maps: (L, n, n) attention of each layer, already aggregated over heads, rows
    summing to 1. With `residual`, each layer becomes 0.5 A + 0.5 I (the skip connection),
    rows renormalised. Returns (L, n, n): R_l = A~_l R_{l-1}, how much each token at layer l
    draws from each input token.
    """
    L, n, _ = layer_maps.shape
    eye = torch.eye(n, dtype=layer_maps.dtype, device=layer_maps.device)
    out = []
    current = eye
    for layer in range(L):
        a = layer_maps[layer]
        if residual:
            a = 0.5 * a + 0.5 * eye
            a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        current = a @ current  # (n, n)
        out.append(current)
    return torch.stack(out)


def value_norms(weights: Tensor, fv_norm: Tensor) -> Tensor:
    """||alpha_ij f(v_j)|| = alpha_ij ||f(v_j)|| (Kobayashi et al., 2020).

    weights (..., nr, Lk), fv_norm (..., Lk): the norm of each value after the output
    projection -> (..., nr, Lk) non-negative, not normalised.
    """
    return weights * fv_norm.unsqueeze(-2)


def entropy(rows: Tensor) -> Tensor:
    """Entropy in nats of each row (..., n) -> (...); 0 log 0 counts as 0."""
    p = rows.clamp_min(0)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=-1)


def jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in bits of rows (..., n), each summing to 1 -> (...) in [0, 1]."""
    m = 0.5 * (p + q)

    def kl(a, b):
        safe = torch.where(a > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.ones_like(a))
        return (a * safe.log2()).sum(dim=-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def merge_units(maps: Tensor, unit_of_token: Sequence[int], num_units: int) -> Tensor:
    """Token maps (..., n, n) -> unit maps (..., m, m): sum over a unit's key tokens, mean over its query tokens.

    unit_of_token[t] is the unit (word) of token t. Rows still sum to 1 when they did.
    """
    index = torch.as_tensor(list(unit_of_token), dtype=torch.long, device=maps.device)
    n = maps.shape[-1]
    onehot = torch.zeros(n, num_units, dtype=maps.dtype, device=maps.device)
    onehot[torch.arange(n, device=maps.device), index] = 1.0  # (n, m)
    keys_summed = maps @ onehot  # (..., n, m)
    counts = onehot.sum(dim=0).clamp_min(1)  # tokens per unit
    return (onehot.transpose(0, 1) @ keys_summed) / counts.unsqueeze(-1)  # (..., m, m)


def drop_and_renormalise(maps: Tensor, keep: Sequence[bool], renormalise: bool = True) -> Tensor:
    """Remove rows and columns where keep is False; rows that summed to 1 are rescaled to 1."""
    idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=maps.device)
    out = maps.index_select(-2, idx).index_select(-1, idx)
    if renormalise:
        total = out.sum(dim=-1, keepdim=True)
        out = torch.where(total > 0, out / torch.where(total > 0, total, torch.ones_like(total)), out)
    return out
