"""Attention of long inputs, a chunk of query rows at a time: the compact "rows" view of
"qkv.explain/1", summaries, and full maps built without the whole layers x heads x n x n at once.

Every number here is computed from the queries and keys a `Recorder` kept (linear in length),
by `Record.weights` on a few hundred rows at a time, so explaining 8,000 tokens never forms an
n x n tensor per layer unless the caller asks for full maps. At word level a row is merged as
Clark et al. (2019) merge a map: the keys of a word summed, the query pieces of a word averaged.
Rollout rows (Abnar & Zuidema, 2020) are products of a row vector with each layer's residual
map, R_l[i] = e_i^T A~_l A~_{l-1} ... A~_1, again chunk by chunk: linear memory, L(L+1)/2 passes.

The compact view ("view": "rows"; docs/explain.md, "Long inputs") ships, for n shown units, L
layers and H heads: labels and flags (n each); per-layer/head summaries (entropy, mean attention
distance, sink share: 3 x L x H); a minimap of the whole sequence (weight received and row
entropy per unit: 2 x L x n); the focus row mean over heads (L x n); and, for each shipped row,
layer and head, its top-k keys with their weights and the exact weight and number of the keys
left out (L x H x R x (2k + 2)). Its size is O(L n + L H R k) against the full view's L H n^2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from . import analysis
from .capture import check_stop

# An `ExplainResult` (qkv.inspect.explain, which imports this module: not imported back, to keep
# the import graph free of cycles).
ExplainResult = Any

FULL_CELLS = 1 << 22  # rows="auto": full maps while layers x heads x n^2 <= this (about 30 MB of JSON)
TOP_K = 8  # keys kept per shipped row in the compact view
CHUNK_ELEMENTS = 1 << 22  # weights of one chunk (heads x rows x keys): 16 MB in float32
BYTES_PER_WEIGHT = 9  # a weight in the JSON: "0.01234," at most, rounded to 5 decimals


@dataclass
class Units:
    """The units of one level as the views show them.

    labels/special: every unit (specials included); unit_of: the unit of each token; shown: the
    unit index of each shown unit (specials dropped with hide_special); tokens_of: the tokens of
    each unit."""

    labels: list[str]
    special: list[bool]
    unit_of: list[int]
    shown: list[int]
    tokens_of: list[list[int]]
    level: str
    hide_special: bool

    @property
    def n(self) -> int:
        return len(self.shown)

    def shown_labels(self) -> list[str]:
        return [self.labels[u] for u in self.shown]


def units(result: ExplainResult, level: str, hide_special: bool) -> Units:
    labels, special, unit_of = result.units(level)
    shown = [u for u, s in enumerate(special) if not (hide_special and s)]
    tokens_of: list[list[int]] = [[] for _ in labels]
    for t, u in enumerate(unit_of):
        tokens_of[u].append(t)
    return Units(labels, special, unit_of, shown, tokens_of, level, hide_special)


def chunks(count: int, size: int) -> Iterator[list[int]]:
    """[0, size), [size, 2 size), ... of range(count)."""
    for start in range(0, count, max(1, size)):
        yield list(range(start, min(count, start + size)))


def chunk_rows(result: ExplainResult) -> int:
    """Query tokens per chunk: CHUNK_ELEMENTS weights of every head over every key."""
    heads = max(1, result.num_heads)
    return max(1, CHUNK_ELEMENTS // (heads * max(1, len(result.tokens))))


def unit_chunks(u: Units, tokens: int) -> Iterator[list[int]]:
    """The shown units in order, packed into runs of at most `tokens` tokens (a unit of more
    tokens is a run of its own; `unit_rows` splits its tokens again)."""
    run: list[int] = []
    count = 0
    for i, unit in enumerate(u.shown):
        size = len(u.tokens_of[unit])
        if run and count + size > tokens:
            yield run
            run, count = [], 0
        run.append(i)
        count += size
    if run:
        yield run


def _positions(result: ExplainResult, tokens: Sequence[int]) -> list[int]:
    """Where each token's row sits in the records (all rows recorded: the token itself)."""
    if result.rows is None:
        return list(tokens)
    where = {t: i for i, t in enumerate(result.rows)}
    missing = [t for t in tokens if t not in where]
    if missing:
        raise ValueError(f"token {missing[0]} was not recorded (rows='focus' recorded tokens {result.rows}); "
                         "explain again with rows='auto' or rows='all' to see other rows")
    return [where[t] for t in tokens]


def _merge_keys(w: Tensor, u: Units) -> Tensor:
    """Token rows (nh, t, n_tok) -> (nh, t, m_all): the keys of a unit summed (Clark et al., 2019)."""
    if u.level != "token" and len(u.labels) != len(u.unit_of):  # some word has several tokens
        index = torch.as_tensor(u.unit_of, dtype=torch.long)
        return w.new_zeros(w.shape[0], w.shape[1], len(u.labels)).index_add_(2, index, w)
    return w


def _finish(out: Tensor, u: Units, normalised: bool) -> Tensor:
    """Unit rows (nh, R, m_all) -> (nh, R, m_shown): hidden units dropped, rows renormalised."""
    if u.hide_special and len(u.shown) != len(u.labels):
        out = out.index_select(2, torch.as_tensor(u.shown, dtype=torch.long))  # (nh, R, m_shown)
        if normalised:
            total = out.sum(dim=-1, keepdim=True)
            out = torch.where(total > 0, out / torch.where(total > 0, total, torch.ones_like(total)), out)
    return out


def _tokens_of_rows(u: Units, shown_rows: Sequence[int]) -> tuple[list[int], list[int], Tensor]:
    """(the unit of each shown row, the tokens of those units in order, the row of each token)."""
    row_units = [u.shown[i] for i in shown_rows]
    tokens = [t for x in row_units for t in u.tokens_of[x]]
    group = torch.as_tensor([i for i, x in enumerate(row_units) for _ in u.tokens_of[x]], dtype=torch.long)
    return row_units, tokens, group


def unit_rows(result: ExplainResult, layer: int, shown_rows: Sequence[int], u: Units, method: str = "raw",
              heads: Optional[Sequence[int]] = None) -> Tensor:
    """(nh, R, m) float32 rows of one recorded layer at `u`'s level: shown_rows are indices into the
    shown units, heads indices into the layer's recorded heads (None = all). method raw or
    value-norm (rollout: `rollout_rows`). The rows' tokens are computed `chunk_rows` at a time
    (a word of thousands of tokens too) and each unit's query pieces averaged as they come."""
    rec = result.records[layer]
    row_units, tokens, group = _tokens_of_rows(u, shown_rows)
    positions = _positions(result, tokens)
    fv = None
    if method == "value-norm":
        fv = result._fv_norm(rec)  # (nh_all, n_tok)
        if heads is not None:
            fv = fv[torch.as_tensor(heads, dtype=torch.long)]
    step = chunk_rows(result)
    out = None
    for start in range(0, len(tokens), step):
        check_stop()
        w = rec.weights(positions[start:start + step], heads)[0].float()  # (nh, t, n_tok)
        if fv is not None:
            w = analysis.value_norms(w, fv.float())
        w = _merge_keys(w, u)  # (nh, t, m_all)
        if len(tokens) == len(row_units) and len(tokens) <= step:  # one token per row, one chunk
            out = w
            break
        if out is None:
            out = w.new_zeros(w.shape[0], len(row_units), w.shape[2])  # (nh, R, m_all)
        out.index_add_(1, group[start:start + step], w)
    assert out is not None
    if len(tokens) != len(row_units):
        counts = torch.as_tensor([len(u.tokens_of[x]) for x in row_units], dtype=out.dtype)  # (R,)
        out = out / counts.view(1, -1, 1)  # query pieces averaged
    return _finish(out, u, normalised=method != "value-norm")


def _times_residual(result: ExplainResult, v: Tensor, layer: int) -> Tensor:
    """v (R, n) float64 times layer's A~ = (0.5 A + 0.5 I) / row sums, A the head mean; chunked."""
    out = torch.zeros_like(v)
    n = v.shape[1]
    for rows in chunks(n, chunk_rows(result)):
        check_stop()
        a = result.records[layer].weights(_positions(result, rows))[0].double().mean(dim=0)  # (c, n)
        d = 0.5 * a.sum(dim=-1) + 0.5  # (c,) the row sums of 0.5 A + 0.5 I
        scaled = v[:, rows] / d  # (R, c)
        out += scaled @ (0.5 * a)  # (R, n)
        out[:, rows] += 0.5 * scaled
    return out


def rollout_rows(result: ExplainResult, shown_rows: Sequence[int], u: Units,
                 layers: Optional[Sequence[int]] = None) -> Tensor:
    """(nl, 1, R, m) attention rollout (Abnar & Zuidema, 2020) of the shown rows at `layers` (None =
    every layer), without any n x n product: R_l[i] = e_i^T A~_l ... A~_1 (the rollout of
    `analysis.rollout`). A unit's row starts as the mean of its tokens' indicator rows (the product
    is linear, so this is the mean of their rollout rows, as a merged map's row is)."""
    if result.rows is not None:
        raise ValueError("rollout needs every row of every layer; explain again with rows='auto' or rows='all'")
    row_units, tokens, group = _tokens_of_rows(u, shown_rows)
    n = len(result.tokens)
    counts = torch.as_tensor([len(u.tokens_of[x]) for x in row_units], dtype=torch.float64)  # (R,)
    start = torch.zeros(len(row_units), n, dtype=torch.float64)  # (R, n)
    start[group, torch.as_tensor(tokens, dtype=torch.long)] = 1.0 / counts[group]
    out = []
    for layer in range(result.num_layers) if layers is None else layers:
        v = start
        for j in range(layer, -1, -1):
            v = _times_residual(result, v, j)
        out.append(_finish(_merge_keys(v.float().unsqueeze(0), u), u, normalised=True))  # (1, R, m)
    return torch.stack(out)  # (nl, 1, R, m)


def row_maps(result: ExplainResult, shown_rows: Sequence[int], method: str, u: Units,
             layers: Optional[Sequence[int]] = None, heads: Optional[Sequence[int]] = None) -> Tensor:
    """(nl, nh, R, m) rows of the selected layers (None = all) and heads (positions among the
    recorded heads; None = all). Rollout has one head, and its layers are all computed."""
    layers = list(range(result.num_layers)) if layers is None else list(layers)
    if method == "rollout":
        return rollout_rows(result, shown_rows, u, layers)
    return torch.stack([unit_rows(result, layer, shown_rows, u, method, heads) for layer in layers])


def full_layer(result: ExplainResult, layer: int, method: str, u: Units) -> Tensor:
    """(H, m, m) the full map of one layer, built chunk of rows by chunk (raw or value-norm)."""
    parts = [unit_rows(result, layer, rows, u, method) for rows in unit_chunks(u, chunk_rows(result))]
    return torch.cat(parts, dim=1)


def summaries(result: ExplainResult, u: Units) -> dict[str, Tensor]:
    """Raw-weight summaries over every shown row, one chunk of rows at a time:
    entropy (L, H): mean row entropy in nats; distance (L, H): mean over rows of sum_j w_ij |i - j|
    (in shown units); sink (L, H): mean weight on the first shown unit; received (L, m): mean over
    heads and rows of the weight each unit receives; row_entropy (L, m): each row's entropy, mean
    over heads."""
    if result.rows is not None:
        raise ValueError("the summaries need every row; explain again with rows='auto' or rows='all'")
    m, L, H = u.n, result.num_layers, result.num_heads
    pos = torch.arange(m, dtype=torch.float32)
    ent, dist, sink = torch.zeros(L, H), torch.zeros(L, H), torch.zeros(L, H)
    received, row_ent = torch.zeros(L, m), torch.zeros(L, m)
    for layer in range(L):
        for rows in unit_chunks(u, chunk_rows(result)):
            w = unit_rows(result, layer, rows, u)  # (H, r, m)
            h, r = w.shape[0], w.shape[1]
            logs = w.clamp_min(torch.finfo(w.dtype).tiny).log_()  # (H, r, m); 0 log 0 counts as 0
            e = -torch.bmm(w.reshape(h * r, 1, m), logs.view(h * r, m, 1)).view(h, r)  # (H, r) nats
            ent[layer] += e.sum(dim=1)
            gap = (pos.view(1, -1) - torch.as_tensor(rows, dtype=torch.float32).view(-1, 1)).abs()  # (r, m)
            dist[layer] += torch.bmm(w.transpose(0, 1), gap.unsqueeze(-1)).sum(dim=(0, 2))  # (r, H, 1) -> (H,)
            sink[layer] += w[:, :, 0].sum(dim=1)
            received[layer] += w.sum(dim=1).mean(dim=0)
            row_ent[layer, rows] = e.mean(dim=0)
    return {"entropy": ent / m, "distance": dist / m, "sink": sink / m, "received": received / m,
            "row_entropy": row_ent}


def top_keys(rows: Tensor, k: int) -> list:
    """rows (L, H, R, m) -> [layer][head][row] {"keys", "weights", "rest", "left_out"}: the k
    largest weights of each row (largest first), the exact total of the others and how many of
    them are above 0."""
    k = min(k, rows.shape[-1])
    values, index = rows.topk(k, dim=-1)  # (L, H, R, k) each
    rest = (rows.sum(dim=-1) - values.sum(dim=-1)).clamp_min(0)  # (L, H, R)
    left_out = (rows > 0).sum(dim=-1) - (values > 0).sum(dim=-1)  # (L, H, R)
    out = []
    for layer in range(rows.shape[0]):
        per_head = []
        for head in range(rows.shape[1]):
            per_row = []
            for r in range(rows.shape[2]):
                live = values[layer, head, r] > 0
                per_row.append({"keys": index[layer, head, r][live].tolist(),
                                "weights": _round(values[layer, head, r][live]),
                                "rest": round(float(rest[layer, head, r]), 6),
                                "left_out": int(left_out[layer, head, r])})
            per_head.append(per_row)
        out.append(per_head)
    return out


def default_rows(u: Units) -> list[int]:
    """The row a compact view ships without a focus: the last shown unit that is not special."""
    for i in range(u.n - 1, -1, -1):
        if not u.special[u.shown[i]]:
            return [i]
    return [u.n - 1]


def answer_bytes(n: int, layers: int, heads: int, view: str, rows: int = 1, k: int = TOP_K) -> int:
    """Estimated bytes of a to_dict answer as JSON for n units, before anything runs (the web
    server's budget and docs/explain.md use it): "full" holds layers x heads x n^2 weights; "rows"
    (compact) holds 3 x layers x n (minimap and focus row), 3 x layers x heads summaries and
    layers x heads x rows x (2k + 2) numbers of top keys; each unit's label, flag and share of the
    text at 32 bytes, and 4 KB for the fixed fields."""
    labels = 32 * n + 4096
    if view == "full":
        return labels + BYTES_PER_WEIGHT * (layers * heads * n * n + 2 * layers * n + layers * heads)
    if view != "rows":
        raise ValueError(f"view must be 'full' or 'rows'; got {view!r}")
    return labels + BYTES_PER_WEIGHT * (3 * layers * n + 3 * layers * heads + layers * heads * rows * (2 * k + 2))


def dumps_full(data: dict, maps: Iterator[Tensor]) -> Iterator[str]:
    """The JSON text of a full-view dict, its "maps" field streamed one layer at a time from
    `maps` (each (H, m, m)), so writing it never holds every layer's numbers as text at once."""
    head = json.dumps({k: v for k, v in data.items() if k != "maps"}, ensure_ascii=False)
    yield '{"maps":['
    for i, layer in enumerate(maps):
        yield ("," if i else "") + json.dumps(_round(layer))
    yield "]" + ("," + head[1:] if head != "{}" else "}")


def _round(t: Tensor, digits: int = 5):
    return torch.round(t.double(), decimals=digits).tolist()
