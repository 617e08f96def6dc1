"""Capture of queries, keys and values inside qkv's attention layer, whatever backend ran.

A `Recorder` is attached to every `qkv.nn.MultiHeadAttention` of a model. The layer hands it
the queries, keys and values it is about to pass to `qkv.attention`, with the same
constraint arguments; the recorder keeps only what was asked for (layers, heads, query
rows) and never changes a tensor, so inspected outputs are bit-identical. Weights are
recomputed afterwards from the recorded rows with `qkv.attention_weights`, so the fast path
stays fast, and a 4,000-token input can be explained for one focus word without building
every full map.

The constraints of the selected rows (causal band, window, masks, mask functions) are taken
from the core's own `AttentionSpec.rows_mask`, so the recomputed weights mean
exactly what the forward pass computed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from ..core import attention_weights
from ..core.spec import AttentionSpec, build_spec


class Cancelled(RuntimeError):
    """The work was stopped by the `check` of an enclosing `stopping(check)` (a web request whose
    client went away)."""


_STOP = threading.local()


@contextlib.contextmanager
def stopping(check: Callable[[], bool]) -> Iterator[None]:
    """In this thread, while the block runs, the recorder (at every layer) and every chunk loop of
    explain call `check()` and raise `Cancelled` when it returns True."""
    previous = getattr(_STOP, "check", None)
    _STOP.check = check
    try:
        yield
    finally:
        _STOP.check = previous


def check_stop() -> None:
    """Raise `Cancelled` if this thread runs under `stopping(check)` and `check()` says stop."""
    check = getattr(_STOP, "check", None)
    if check is not None and check():
        raise Cancelled("stopped: the request was cancelled")


@dataclass
class Record:
    """What one attention layer saw, restricted to the selected heads and query rows.

    q: (B, nh, nr, D) selected query heads and rows; k: (B, nh, Lk, D) and v: (B, nh, Lk, Dv),
    the key/value head each selected query head reads (grouped-query heads resolved);
    spec: the layer's normalised constraints (`AttentionSpec`), from which `mask_for` builds
    the float mask of any recorded rows on demand (a dense mask of every row would be n x n per
    layer: 256 MB at 8k tokens); heads, rows: the indices selected; fv_norm: (B, nh, Lk) norms
    ||v_j W_O^h|| of each value after the output projection (Kobayashi et al., 2020), or None.
    """

    layer: int
    name: str
    q: Tensor
    k: Tensor
    v: Tensor
    spec: AttentionSpec
    scale: float
    score_mod: Optional[Callable]
    heads: Tensor
    rows: Tensor
    num_heads: int
    num_kv_heads: int
    fv_norm: Optional[Tensor] = None
    # how the layer attended, as it called qkv.attention: causal, the window (left, right) (None =
    # unbounded), and a description of its score_mod (e.g. "soft_cap(cap=50.0)"; None = none)
    causal: bool = False
    window: Optional[tuple[Optional[int], Optional[int]]] = None
    score_mod_text: Optional[str] = None
    layer_score_mod: Optional[Callable] = None  # the layer's own score_mod (its indices are the layer's)

    @property
    def mask(self) -> Tensor:
        """float (B or 1, nh or 1, nr, Lk) of every recorded row: 0 (or the additive bias) where
        attending is allowed, -inf elsewhere. Built on demand; prefer `mask_for` for a few rows."""
        return self.mask_for(None)

    def mask_for(self, positions: Union[Tensor, Sequence[int], None]) -> Tensor:
        """float (B or 1, nh or 1, r, Lk): the mask of the recorded rows at `positions` (indices into
        `rows`; None = all)."""
        rows = self.rows if positions is None else self.rows[torch.as_tensor(positions, dtype=torch.long)]
        return self.spec.rows_mask(rows, self.heads, self.q.device)

    def describe(self) -> dict:
        """{"layer", "name", "causal", "window": [left, right] or None, "score_mod": text or None}."""
        return {"layer": self.layer, "name": self.name, "causal": self.causal,
                "window": None if self.window is None else list(self.window), "score_mod": self.score_mod_text}

    def weights(self, positions: Union[Tensor, Sequence[int], None] = None,
                heads: Union[Tensor, Sequence[int], None] = None) -> Tensor:
        """(B, nh', r, Lk) attention weights, float32 or float64, of the recorded rows at `positions`
        (indices into `rows`; None = all) and the recorded heads at `heads` (indices into `heads`;
        None = all). A chunk of rows costs r x Lk, never the full n x n."""
        q, k, mask = self.q, self.k, None
        if heads is not None:
            hpos = torch.as_tensor(heads, dtype=torch.long)
            q, k = q[:, hpos], k[:, hpos]  # (B, nh', nr, D), (B, nh', Lk, D)
        if positions is not None:
            q = q[:, :, torch.as_tensor(positions, dtype=torch.long)]  # (B, nh', r, D)
        q = q if q.dtype == torch.float64 else q.float()
        band = self._band_keys(positions)
        if band is not None:  # a run of rows under a causal band (or no constraint): only the keys it sees
            return self._band_weights(q, k, positions, heads, *band)
        mask = self.mask_for(positions)  # (B|1, nh|1, r, Lk)
        if heads is not None and mask.shape[1] != 1:
            mask = mask[:, hpos]
        mod = self.score_mod
        if self.layer_score_mod is not None and (positions is not None or heads is not None):
            sel_heads = self.heads if heads is None else self.heads[hpos]
            sel_rows = self.rows if positions is None else self.rows[torch.as_tensor(positions, dtype=torch.long)]
            mod = _remap_score_mod(self.layer_score_mod, sel_heads, sel_rows)
        return attention_weights(q, k.to(q.dtype), mask=mask.to(q.dtype), scale=self.scale, score_mod=mod)

    def _band_keys(self, positions) -> Optional[tuple[int, int]]:
        """(j0, j1): the keys a run of consecutive rows can see, when the layer's only constraint is
        the causal band (with or without a left window) or nothing at all; else None (the mask path).

        Under a causal band row i sees keys [i + offset - left, i + offset], so the run [i0, i1) sees
        [j0, j1) with j1 = i1 + offset, and the band of the sliced call, aligned bottom-right as qkv
        aligns every band, is the same band."""
        spec = self.spec
        if positions is None or spec.has_dense_constraints or spec.right not in (None, 0) or \
                (spec.right is None and spec.left is not None):
            return None
        pos = torch.as_tensor(positions, dtype=torch.long)
        if pos.numel() == 0:
            return None
        rows = self.rows[pos]
        i0, i1 = int(rows[0]), int(rows[-1]) + 1
        if rows.numel() != i1 - i0 or not bool((rows == torch.arange(i0, i1)).all()):
            return None
        if spec.right is None:  # no band at all
            return 0, spec.Lk
        j1 = i1 + spec.offset
        j0 = 0 if spec.left is None else max(0, i0 + spec.offset - spec.left)
        if not 0 <= j0 <= j1 <= spec.Lk or j1 - j0 < i1 - i0:
            return None
        return j0, j1

    def _band_weights(self, q: Tensor, k: Tensor, positions, heads, j0: int, j1: int) -> Tensor:
        """weights of the rows at `positions` over keys [j0, j1) alone, placed in (B, nh', r, Lk)."""
        spec = self.spec
        mod = None
        if self.layer_score_mod is not None:
            sel_heads = self.heads if heads is None else self.heads[torch.as_tensor(heads, dtype=torch.long)]
            mod = _remap_score_mod(self.layer_score_mod, sel_heads, self.rows[torch.as_tensor(positions)], j0)
        causal = spec.right == 0
        window = None if spec.left is None else (spec.left, 0)
        w = attention_weights(q, k[:, :, j0:j1].to(q.dtype), causal=causal, window=window, scale=self.scale,
                              score_mod=mod)  # (B, nh', r, j1 - j0)
        if j0 == 0 and j1 == spec.Lk:
            return w
        return torch.nn.functional.pad(w, (j0, spec.Lk - j1))  # (B, nh', r, Lk), zeros outside the band

    def scores(self, positions: Union[Tensor, Sequence[int], None] = None) -> Tensor:
        """(B, nh, r, Lk) the scaled scores q.k * scale before the softmax (no mask applied), of the
        recorded rows at `positions` (None = all)."""
        q = self.q if positions is None else self.q[:, :, torch.as_tensor(positions, dtype=torch.long)]
        q = q if q.dtype == torch.float64 else q.float()
        return torch.matmul(q, self.k.to(q.dtype).transpose(-1, -2)) * self.scale


@dataclass
class Recorder:
    """Which layers, heads and query rows to record; None = all.

    Attach with `attach(model)`; every `MultiHeadAttention` in the model, in module order,
    becomes one layer index. `records` holds one `Record` per recorded call.
    """

    layers: Optional[Sequence[int]] = None
    heads: Optional[Sequence[int]] = None
    rows: Optional[Sequence[int]] = None
    with_values: bool = True
    records: list[Record] = field(default_factory=list)
    _layer_of: dict = field(default_factory=dict, repr=False)
    _out_weight: dict = field(default_factory=dict, repr=False)  # id(module) -> W_O (E, Hq * D) or None

    def attach(self, model: torch.nn.Module) -> "Recorder":
        """Hook every attention layer of `model`: each qkv `MultiHeadAttention`, or for a transformers
        model the modules `qkv.integrations.transformers.attention_modules` lists (they call the
        recorder when the model runs with attn_implementation="qkv"). Layer i is the i-th, in order."""
        from ..nn import MultiHeadAttention

        found = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
        if not found and is_transformers_model(model):
            from ..integrations.transformers import attention_modules

            found = attention_modules(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no qkv MultiHeadAttention layers to inspect; explain works on "
                "models built from qkv.nn and on transformers models"
            )
        for index, (name, module) in enumerate(found):
            self._layer_of[id(module)] = (index, name)
            self._out_weight[id(module)] = output_projection(model, name, module)
            module.recorder = self
        self._modules = [m for _, m in found]
        return self

    def detach(self) -> None:
        for module in getattr(self, "_modules", []):
            module.recorder = None
        self._modules = []

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def num_layers(self) -> int:
        return len(self._layer_of)

    def __call__(self, module, q: Tensor, k: Tensor, v: Tensor, *, mask=None, causal=False, window=None,
                 scale=None, score_mod=None) -> None:
        """Called by the layer with q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)."""
        check_stop()
        layer, name = self._layer_of[id(module)]
        if self.layers is not None and layer not in self.layers:
            return
        with torch.no_grad():
            spec = build_spec(q, k, v, mask=mask, causal=causal, window=window, scale=scale, score_mod=score_mod)
            B, Hq, Lq, _ = q.shape
            heads = torch.arange(Hq) if self.heads is None else torch.as_tensor(list(self.heads), dtype=torch.long)
            rows = torch.arange(Lq) if self.rows is None else torch.as_tensor(list(self.rows), dtype=torch.long)
            if heads.numel() and (heads.min() < 0 or heads.max() >= Hq):
                raise ValueError(f"head {heads.max().item()} does not exist: layer {layer} has heads 0..{Hq - 1}")
            if rows.numel() and (rows.min() < 0 or rows.max() >= Lq):
                raise ValueError(f"row {rows.max().item()} does not exist: the input has {Lq} tokens")
            kv_heads = heads // spec.groups  # the key/value head each selected query head reads
            q_sel = q[:, heads][:, :, rows].detach().clone()  # (B, nh, nr, D)
            k_sel = k[:, kv_heads].detach().clone()  # (B, nh, Lk, D)
            v_sel = v[:, kv_heads].detach().clone()  # (B, nh, Lk, Dv)
            fv_norm = self._fv_norm(module, v_sel, heads, Hq) if self.with_values else None
        mod = None if score_mod is None else _remap_score_mod(score_mod, heads, rows)
        self.records.append(Record(
            layer=layer, name=name, q=q_sel, k=k_sel, v=v_sel if self.with_values else v_sel[..., :0],
            spec=spec, scale=spec.scale, score_mod=mod, heads=heads, rows=rows,
            num_heads=Hq, num_kv_heads=spec.Hkv, fv_norm=fv_norm, causal=bool(causal),
            window=_window_of(window, causal),
            score_mod_text=None if score_mod is None else describe_function(score_mod), layer_score_mod=score_mod,
        ))

    def _fv_norm(self, module, v_sel: Tensor, heads: Tensor, Hq: int) -> Optional[Tensor]:
        """(B, nh, Lk) ||v_j W_O^h||: each value after the output projection's slice for head h, or None
        when the layer has no output projection of Hq blocks of D columns."""
        w = self._out_weight.get(id(module))
        D = v_sel.shape[-1]
        if w is None or w.shape[1] != Hq * D:
            return None
        w = w.detach()  # (E, Hq * D)
        w_heads = w.view(w.shape[0], -1, D)[:, heads].transpose(0, 1)  # (nh, E, D)
        fv = torch.matmul(v_sel.to(w.dtype), w_heads.transpose(-1, -2).unsqueeze(0))  # (B, nh, Lk, E)
        return fv.norm(dim=-1).float()


# where attention modules keep their output projection W_O: qkv's MultiHeadAttention and OPT, GPT-J,
# CodeGen: out_proj; Llama, Mistral, Gemma: o_proj; GPT-2: c_proj; GPT-NeoX, Phi: dense; DistilBERT: out_lin
_OUT_NAMES = ("out_proj", "o_proj", "c_proj", "dense", "out_lin")


def output_projection(model: Optional[torch.nn.Module], name: str, module) -> Optional[Tensor]:
    """The output projection's weight of an attention module as nn.Linear holds it, (E, Hq * D), or None.

    Looked up on the module by the names above, then (BERT, RoBERTa, ELECTRA: the module is the
    "self" part of an attention block) on its parent's `output.dense`. GPT-2's Conv1D stores (in, out)
    and is transposed (a view of the parameter, so it follows the model's weights)."""
    layer = None
    for attr in _OUT_NAMES:
        sub = getattr(module, attr, None)
        if isinstance(sub, torch.nn.Module) and isinstance(getattr(sub, "weight", None), Tensor):
            layer = sub
            break
    if layer is None and model is not None and "." in name:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        output = getattr(parent, "output", None)
        sub = getattr(output, "dense", None) if isinstance(output, torch.nn.Module) else None
        if isinstance(sub, torch.nn.Module) and isinstance(getattr(sub, "weight", None), Tensor):
            layer = sub
    if layer is None or layer.weight.dim() != 2:
        return None
    weight = layer.weight
    return weight.t() if type(layer).__name__ == "Conv1D" else weight  # Conv1D: (in, out) -> (out, in)


def is_transformers_model(obj) -> bool:
    """Whether `obj` is a transformers `PreTrainedModel` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(obj).__mro__)


def _window_of(window, causal: bool) -> Optional[tuple[Optional[int], Optional[int]]]:
    """qkv.attention's `window` argument as (left, right): an int w is (w, 0) under causal, else (w, w)."""
    if window is None:
        return None
    if isinstance(window, int):
        return (window, 0 if causal else window)
    left, right = window
    return (None if left is None else int(left), None if right is None else int(right))


_GENERIC_NAMES = {"<lambda>", "score_mod", "mask_mod", "mod", "fn", "f", "func", "shifted"}


def describe_function(fn) -> str:
    """A short text for a score or mask function, read from the function itself (no list of
    known functions): its `description` attribute if it has one; else the name of the function
    that built it (for a closure such as qkv.masks.soft_cap's, the factory) with the numbers,
    strings and booleans it captured, e.g. "soft_cap(cap=50.0)". Wrappers that set `__wrapped__`
    (functools.wraps; a windowed cache's index shift) are looked through."""
    seen = 0
    while getattr(fn, "__wrapped__", None) is not None and seen < 16:
        fn, seen = fn.__wrapped__, seen + 1
    text = getattr(fn, "description", None)
    if isinstance(text, str) and text:
        return text
    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args if _plain(a)] + [f"{k}={v!r}" for k, v in fn.keywords.items() if _plain(v)]
        return f"{describe_function(fn.func).split('(')[0]}({', '.join(args)})"
    qualname = getattr(fn, "__qualname__", None)
    if qualname is None:  # a callable object
        return type(fn).__name__
    parts = qualname.split(".<locals>.")
    name = parts[-1]
    if len(parts) > 1 and name in _GENERIC_NAMES:
        name = parts[-2]  # the function that built it
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    captured = []
    if code is not None:
        for var, cell in zip(code.co_freevars, cells):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if _plain(value):
                captured.append(f"{var}={value!r}")
    return f"{name}({', '.join(captured)})"


def _plain(value) -> bool:
    return isinstance(value, (bool, int, float, str)) and len(repr(value)) <= 40


def _remap_score_mod(score_mod, heads: Tensor, rows: Tensor, key_start: int = 0):
    """The score function seen from the recorded heads and rows (and keys from `key_start`): indices
    map back to the layer's own."""
    def mod(s, b, h, qi, kj):
        return score_mod(s, b, heads.to(h.device)[h], rows.to(qi.device)[qi], kj + key_start)

    return mod
