"""`qkv.explain`: which words a word looks at inside a real model, per layer and head.

Runs the model once with a `Recorder` on its attention layers, recomputes the weights
from the recorded queries and keys (`qkv.attention_weights`), and offers the analyses of
`qkv.inspect.analysis` at token or word level: raw weights, attention rollout (Abnar &
Zuidema, 2020), value-weighted norms (Kobayashi et al., 2020), entropy per head, word
merging (Clark et al., 2019), and the comparison of two sentences.

Encoder-decoder models (`is_encoder_decoder`) are run on the text and on their own greedy
translation of it. Their tokens are then the source tokens followed by the target tokens,
each target position named by the word the decoder wrote there; every layer's map is drawn
on that joint sequence: encoder self-attention in the source block, decoder self-attention
in the target block, and cross-attention (target rows over source columns, the alignment of
Bahdanau et al. 2015) in the block below the source. `cross_maps` gives the cross-attention
alone, and `to_dict` adds it as the optional "cross" field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._files import atomic_output, write_text
from . import analysis
from . import rows as _rows
from .capture import Record, Recorder
from .image import CLASS_NAMES as _CLASS_NAMES
from .image import ImageInfo
from .rows import FULL_CELLS, TOP_K, answer_bytes
from .schema import FORMAT, LEVELS, METHODS

__all__ = ["FULL_CELLS", "ROWS", "TOP_K", "ExplainResult", "Steps", "answer_bytes", "explain"]

ROWS = ("auto", "all", "focus")  # explain's `rows`: what is recorded and which view to_dict gives

_MODEL_CACHE: dict = {}


def _load_model(model):
    """A model object as it is, or a bundled name / folder path loaded once and kept."""
    if not isinstance(model, (str, os.PathLike)):
        return model, getattr(model, "name", type(model).__name__)
    key = str(model)
    if key not in _MODEL_CACHE:
        from ..models import load

        _MODEL_CACHE[key] = load(key)
    return _MODEL_CACHE[key], key


@dataclass
class Steps:
    """The seed's three steps for one query token in one head, with real numbers.

    labels: the n key tokens; query (D,); keys (n, D); scores (n,) = q.k * scale before the
    softmax (-inf where masked); weights (n,) after it; values (n, Dv); output (Dv,) = the
    weighted sum of the values (before the output projection).
    """

    layer: int
    head: int
    token: int
    labels: list[str]
    query: Tensor
    keys: Tensor
    scale: float
    scores: Tensor
    weights: Tensor
    values: Tensor
    output: Tensor

    def __str__(self) -> str:
        lines = [f"layer {self.layer}, head {self.head}, query token {self.labels[self.token]!r} "
                 f"(scale {self.scale:.4f})", f"{'key':>14} {'q.k*scale':>10} {'weight':>8}"]
        for label, s, w in zip(self.labels, self.scores.tolist(), self.weights.tolist()):
            lines.append(f"{label[:14]:>14} {s:>10.4f} {w:>8.4f}")
        head = ", ".join(f"{x:.4f}" for x in self.output[:6].tolist())
        lines.append(f"output = sum_j weight_j * v_j = [{head}, ...] ({self.output.numel()} values)")
        return "\n".join(lines)


@dataclass
class ExplainResult:
    """What `qkv.explain` found. Token-level tensors; views at word level through the methods.

    tokens: the n token strings; special: which are special tokens ([CLS], [SEP], BOS);
    words: the words of the text; word_of_token: the word index of each token (None for
    special tokens); records: one `Record` per attention layer (queries, keys, values of the
    recorded heads and rows); rows: the recorded query rows (None = all); mode: explain's `rows`
    argument ("auto", "all" or "focus"), which decides the view `to_dict` gives by default
    (`compact_view`).
    """

    text: str
    model_name: str
    tokens: list[str]
    special: list[bool]
    words: list[str]
    word_of_token: list[Optional[int]]
    records: list[Record]
    rows: Optional[list[int]] = None
    # encoder-decoder models only: each record's kind ("encoder", "decoder", "cross") and the
    # number of source tokens (the target tokens follow them)
    roles: Optional[list[str]] = None
    source_len: Optional[int] = None
    mode: str = "auto"
    # "text", or "image" for a vision transformer: then tokens are "[CLS]" and the patches "r{row}c{col}"
    # (qkv.inspect.image), text is the image's name, and `image` holds the pixels, grid and prediction
    modality: str = "text"
    image: Optional[ImageInfo] = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        """One line: the text, the model and what was recorded (never the tensors themselves)."""
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        rows = "all rows" if self.rows is None else f"rows {self.rows}"
        heads = self.num_heads if self.records else 0
        what = f"{len(self.tokens)} tokens"
        if self.image is not None:
            text = f"image={text}"
            what = f"{self.image.grid[1]}x{self.image.grid[0]} patches + class token"  # columns x rows
        return (f"ExplainResult({text!r}, model={self.model_name!r}, {what}, "
                f"{self.num_layers} layers x {heads} heads, {rows})")

    # ------------------------------------------------------------------ basics
    @property
    def num_layers(self) -> int:
        return len(self.records)

    @property
    def num_heads(self) -> int:
        return int(self.records[0].heads.numel())

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors (queries, keys, values, value norms): linear in length."""
        return sum(t.numel() * t.element_size() for r in self.records
                   for t in (r.q, r.k, r.v, r.fv_norm) if t is not None)

    def compact_view(self, level: str = "word", hide_special: bool = False) -> bool:
        """Whether `to_dict()` gives the compact "rows" view (docs/explain.md, "Long inputs") rather
        than full maps: always with rows="focus", never with rows="all" or for an encoder-decoder,
        and with rows="auto" when layers x heads x n^2 > FULL_CELLS for the n units shown."""
        if self.roles is not None:
            return False
        if self.rows is not None or self.mode == "focus":
            return True
        if self.mode == "all" or not self.records:
            return False
        n = _rows.units(self, level, hide_special).n
        return self.num_layers * self.num_heads * n * n > FULL_CELLS

    @property
    def attentions(self) -> Tensor:
        """(layers, heads, tokens, tokens) float32 weights; each row sums to 1 over the keys it may see."""
        if self.rows is not None:
            raise ValueError(
                "only the focus rows were recorded (rows='focus'); use focus_rows(), or explain again "
                "with rows='all' to get every full map"
            )
        if "attentions" not in self._cache:
            if self.roles is None:
                self._cache["attentions"] = torch.stack([r.weights()[0].float() for r in self.records])
            else:
                self._cache["attentions"] = self._joint_attentions()
        return self._cache["attentions"]

    def _joint_attentions(self) -> Tensor:
        """Encoder-decoder: each record's (H, Lq, Lk) weights placed in the joint (H, n, n) square."""
        n, ns = len(self.tokens), self.source_len
        offsets = {"encoder": (0, 0), "decoder": (ns, ns), "cross": (ns, 0)}
        out = []
        for r, role in zip(self.records, self.roles):
            w = r.weights()[0].float()  # (H, Lq, Lk)
            joint = torch.zeros(w.shape[0], n, n)
            q0, k0 = offsets[role]
            joint[:, q0:q0 + w.shape[1], k0:k0 + w.shape[2]] = w
            out.append(joint)
        return torch.stack(out)  # (layers, H, n, n)

    @property
    def cross_layers(self) -> list[int]:
        """Indices of the cross-attention layers (empty for encoder-only and decoder-only models)."""
        return [i for i, role in enumerate(self.roles or []) if role == "cross"]

    def layer_attention(self) -> list[dict]:
        """How each recorded layer attended, as it called `qkv.attention`: one dict per layer,
        {"layer", "name", "causal", "window": [left, right] or None (unbounded), "score_mod":
        a description such as "soft_cap(cap=50.0)" or None}. Read from the run, for any model
        built on qkv.nn: a sliding window (Mistral) or soft-capping shows here, global layers
        have window None."""
        return [r.describe() for r in self.records]

    def cross_maps(self, level: str = "word"):
        """Cross-attention alone: (source labels, target labels, (cross layers, H, target, source) weights).

        Each row is one decoder step, named by the word it wrote, over the source words."""
        if not self.cross_layers:
            raise ValueError(f"{self.model_name} has no cross-attention; cross_maps is for encoder-decoder models")
        maps = self.maps("raw", level)[self.cross_layers]  # (C, H, n, n)
        labels, _, unit_of = self.units(level)
        n_src = len(set(unit_of[:self.source_len]))
        return labels[:n_src], labels[n_src:], maps[:, :, n_src:, :n_src]

    def units(self, level: str = "word", hide_special: bool = False):
        """(labels, special flags, unit of each token) at `level`; specials are units of their own."""
        _check_choice("level", level, LEVELS)
        if level == "token":
            labels, special, unit_of = list(self.tokens), list(self.special), list(range(len(self.tokens)))
        else:
            labels, special, unit_of, seen = [], [], [], {}
            for t, w in enumerate(self.word_of_token):
                key = ("w", w) if w is not None else ("t", t)
                if key not in seen:
                    seen[key] = len(labels)
                    labels.append(self.words[w] if w is not None else self.tokens[t])
                    special.append(w is None)
                unit_of.append(seen[key])
        return labels, special, unit_of

    def labels(self, level: str = "word", hide_special: bool = False) -> list[str]:
        labels, special, _ = self.units(level)
        return [lab for lab, s in zip(labels, special) if not (hide_special and s)]

    # ---------------------------------------------------------------- analyses
    def maps(self, method: str = "raw", level: str = "word", hide_special: bool = False) -> Tensor:
        """(layers, heads, n, n) maps at `level`; for rollout heads = 1 (heads averaged first).

        raw: attention weights. rollout: attention rollout with the residual term, up to each
        layer. value-norm: ||alpha_ij f(v_j)||, not normalised. Special tokens are hidden
        after the analysis, and rows renormalised to 1 (raw, rollout).
        """
        _check_choice("method", method, METHODS)
        if self.roles is not None and method != "raw":
            raise ValueError(f"{method} is defined for one stack of layers; for an encoder-decoder model use "
                             "method 'raw'")
        if self.roles is None and method != "rollout":
            if self.rows is not None:
                _ = self.attentions  # raises: only the focus rows were recorded
            u = _rows.units(self, level, hide_special)  # every layer built a chunk of rows at a time
            return torch.stack([_rows.full_layer(self, layer, method, u) for layer in range(self.num_layers)])
        if method == "raw":
            maps = self.attentions
        else:
            maps = analysis.rollout(self.attentions.double().mean(dim=1)).float().unsqueeze(1)  # (L, 1, n, n)
        labels, special, unit_of = self.units(level)
        if level == "word":
            maps = analysis.merge_units(maps, unit_of, len(labels))
        if hide_special:
            maps = analysis.drop_and_renormalise(maps, [not s for s in special], renormalise=method != "value-norm")
        return maps

    def focus_rows(self, focus: Union[str, int], method: str = "raw", level: str = "word",
                   hide_special: bool = False) -> Tensor:
        """(layers, heads, n) the focus unit's row of every layer and head (for rollout heads = 1).

        Computed from the recorded queries and keys for that row alone (works with rows='focus',
        and at any length); a short input's full maps are used when they are already built."""
        _check_choice("method", method, METHODS)
        index = self.focus_index(focus, level)
        u = _rows.units(self, level, hide_special)
        shown = u.shown.index(index) if index in u.shown else None
        if shown is None:
            raise ValueError(f"the focus {focus!r} is a special token, and special tokens are hidden")
        if self.roles is not None or (self.rows is None and not self.compact_view(level, hide_special)):
            return self.maps(method, level, hide_special)[:, :, shown]
        return _rows.row_maps(self, [shown], method, u)[:, :, 0]  # (L, H, n)

    def entropy(self, level: str = "token") -> Tensor:
        """(layers, heads) mean entropy in nats of each head's rows: low = focused."""
        if self.roles is None:
            return self.summaries(level)["entropy"]
        maps = self.maps("raw", level)
        ent = analysis.entropy(maps)  # (L, H, n)
        if self.roles is None:
            return ent.mean(dim=-1)
        live = (maps.sum(dim=-1) > 0).float()  # rows of this layer's queries (joint layout)
        return (ent * live).sum(dim=-1) / live.sum(dim=-1).clamp_min(1.0)

    def summaries(self, level: str = "word", hide_special: bool = False) -> dict:
        """Raw-weight summaries over every row, built a chunk of rows at a time (`qkv.inspect.rows`):
        entropy, distance, sink (layers, heads); received, row_entropy (layers, n)."""
        if self.roles is not None:
            raise ValueError("summaries are for encoder or decoder models; an encoder-decoder's result gives "
                             "its full maps (maps(), entropy())")
        key = ("summaries", level, hide_special)
        if key not in self._cache:
            self._cache[key] = _rows.summaries(self, _rows.units(self, level, hide_special))
        return self._cache[key]

    def sharpest_heads(self, focus: Union[str, int], k: int = 5, level: str = "word", hide_special: bool = False):
        """The k (layer, head) pairs whose focus row has the lowest entropy, with their top words."""
        rows = self.focus_rows(focus, "raw", level, hide_special)  # (L, H, n)
        ent = analysis.entropy(rows)  # (L, H)
        labels = self.labels(level, hide_special)
        order = torch.argsort(ent.flatten())[:k]
        out = []
        for flat in order.tolist():
            layer, head = divmod(flat, rows.shape[1])
            top = torch.argsort(rows[layer, head], descending=True)[:3].tolist()
            out.append({"layer": layer, "head": int(self.records[layer].heads[head]),
                        "entropy": float(ent[layer, head]),
                        "top": [{"label": labels[j], "weight": float(rows[layer, head, j])} for j in top]})
        return out

    def image_maps(self, focus: Union[str, int] = "cls", method: str = "raw",
                   hide_special: bool = False) -> Tensor:
        """Image results: (layers, heads, rows, columns) the focus unit's attention over the patch
        grid (for rollout heads = 1): by default the class token's, per layer and head. The class
        token's own column is left out, so a row sums to 1 minus the weight on the class token;
        with hide_special the class token is hidden first and each row renormalised over the
        patches (raw, rollout). focus: "cls", a patch "r<row>c<column>", or a unit index."""
        if self.image is None:
            raise ValueError("image_maps is for image results (qkv.explain(image=...)); this result is text")
        if hide_special and self.focus_index(focus, "token") == 0:
            raise ValueError("the class token is hidden (hide_special=True); give a patch as focus, or show it")
        rows = self.focus_rows(focus, method, "token", hide_special)  # (L, H, n)
        first = 0 if hide_special else 1  # the patches follow the class token
        grid = self.image.grid
        return rows[:, :, first:].reshape(rows.shape[0], rows.shape[1], *grid)  # (L, H, n - 1) -> (L, H, gh, gw)

    def steps(self, focus: Union[str, int], layer: int, head: int) -> Steps:
        """The three steps of the seeds for the focus word's first token in one head."""
        if self.roles is not None:
            raise ValueError("the step-through is for encoder or decoder models; this one is an encoder-decoder")
        index = self.focus_index(focus, "token") if isinstance(focus, int) else self._first_token(focus)
        rec = self._record(layer)
        h = self._head_position(rec, head)
        if self.rows is not None:
            if index not in self.rows:
                raise ValueError(f"token {index} was not recorded; recorded rows: {self.rows}")
            r = self.rows.index(index)
        else:
            r = index
        scores = rec.scores([r])[0, h, 0]  # (n,)
        mask = rec.mask_for([r])  # (B|1, nh|1, 1, n)
        m_h = 0 if mask.shape[1] == 1 else h  # a mask with one head broadcasts over heads
        masked = scores + mask[0, m_h, 0].to(scores.dtype)
        weights = rec.weights([r], [h])[0, 0, 0]
        values = rec.v[0, h].to(weights.dtype)
        return Steps(layer=layer, head=head, token=index, labels=list(self.tokens), query=rec.q[0, h, r].float(),
                     keys=rec.k[0, h].float(), scale=rec.scale, scores=masked, weights=weights, values=values,
                     output=weights @ values)

    def compare(self, other: "ExplainResult", focus: Union[str, int, None] = None, level: str = "word") -> dict:
        """Per-head difference maps (self - other) and, with a focus, the Jensen-Shannon
        divergence (bits) of the focus rows per layer and head. Both must have the same labels count."""
        if not isinstance(other, ExplainResult):
            raise TypeError(f"other must be an ExplainResult (what qkv.explain returns); got {type(other).__name__}")
        na, nb = len(self.labels(level)), len(other.labels(level))
        shape_a, shape_b = (self.num_layers, self.num_heads, na), (other.num_layers, other.num_heads, nb)
        if shape_a != shape_b:
            raise ValueError(
                f"the two sentences have {na} and {nb} {level}s (or different models); "
                f"difference maps need sentences of the same length, e.g. one word swapped"
            )
        out: dict = {"difference": None, "labels": (self.labels(level), other.labels(level))}
        if not (self.compact_view(level) or other.compact_view(level)):  # long inputs: the focus rows only
            out["difference"] = self.maps("raw", level) - other.maps("raw", level)
        if focus is not None:
            i = self.focus_index(focus, level)
            out["jsd"] = analysis.jensen_shannon(self.focus_rows(i, "raw", level),
                                                 other.focus_rows(i, "raw", level))  # (L, H)
        return out

    # ---------------------------------------------------------------- lookups
    def focus_index(self, focus: Union[str, int], level: str = "word") -> int:
        """Index of a word (first match, case-insensitive, punctuation ignored) or a unit index."""
        labels, special, _ = self.units(level)
        if isinstance(focus, int) and not isinstance(focus, bool):
            if not 0 <= focus < len(labels):
                what = (f"the image has {len(labels)} units (the class token and {len(labels) - 1} patches)"
                        if self.image is not None else f"the text has {len(labels)} {level}s")
                raise ValueError(f"focus index {focus} is out of range: {what}")
            return focus
        if not isinstance(focus, str) or not focus.strip():
            raise ValueError("focus must be a word of the text or an index")
        want = _norm(focus)
        if self.image is not None and focus.strip().lower() in _CLASS_NAMES:
            return 0  # the class token is the first token, and a unit of its own at both levels
        for i, (label, s) in enumerate(zip(labels, special)):
            if not s and _norm(label) == want:
                return i
        if level == "token":  # a word given at token level: its first token
            try:
                return self._first_token(focus)
            except ValueError:
                pass
        words = list(dict.fromkeys(w for w, s in zip(labels, special) if not s))  # distinct, in order
        shown = ", ".join(repr(w) for w in words[:_LISTED])
        if len(words) > _LISTED:
            shown += f", ... ({len(words):,} distinct {level}s in all)"
        if self.image is not None:
            rows, cols = self.image.grid
            raise ValueError(f"focus {focus!r} is not a patch of the image; name a patch as r<row>c<column> "
                             f"(r0c0 to r{rows - 1}c{cols - 1}) or the class token as 'cls'")
        raise ValueError(f"focus word {focus!r} is not in the text; its {level}s are: {shown}")

    def _first_token(self, focus: str) -> int:
        w = self.focus_index(focus, "word")
        _, _, unit_of = self.units("word")
        return unit_of.index(w)

    def _record(self, layer: int) -> Record:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} does not exist: the model has layers 0..{self.num_layers - 1}")
        return self.records[layer]

    @staticmethod
    def _head_position(rec: Record, head: int) -> int:
        hits = (rec.heads == head).nonzero()
        if not hits.numel():
            raise ValueError(f"head {head} does not exist or was not recorded: heads {rec.heads.tolist()}")
        return int(hits[0, 0])

    def _fv_norm(self, rec: Record) -> Tensor:
        if rec.fv_norm is None:
            raise ValueError(f"value-norm needs each layer's values and output projection, and qkv found no output "
                             f"projection for layer {rec.layer} ({rec.name}); use method 'raw' or 'rollout'")
        return rec.fv_norm[0]

    # ---------------------------------------------------------------- output
    def to_dict(self, method: str = "raw", level: str = "word", hide_special: bool = False,
                focus: Union[str, int, None] = None, layer: Optional[int] = None, head: Optional[int] = None,
                rows: Union[str, Sequence[int], None] = None, top_k: Optional[int] = None) -> dict:
        """The JSON-ready form "qkv.explain/1" that the HTML and PNG renderers draw.

        rows: None = the result's default view (`compact_view`); "all" = full maps (layers, heads,
        n, n); "focus" = the compact "rows" view shipping the focus word's row (without a focus, the
        last word's); a list of shown unit indices = the compact view shipping those rows. The
        compact view (docs/explain.md, "Long inputs") has no "maps": per-head summaries, a minimap
        of the whole sequence, and each shipped row's `top_k` keys with the exact weight left out
        (default TOP_K; for an image every key, so a shipped row draws whole over the patches).

        An image result adds "modality": "image" and the "image" block (`ImageInfo.to_dict`: the
        picture as a PNG data URL, the patch grid, the prediction); its compact view ships the
        class token's row when no focus is given.
        """
        _check_choice("method", method, METHODS)
        _check_choice("level", level, LEVELS)
        if layer is not None:
            self._record(layer)
        if isinstance(rows, str):
            _check_choice("rows", rows, ("all", "focus"))
        elif rows is not None:
            rows = _check_rows(rows)
        if top_k is None:
            top_k = TOP_K if self.image is None else len(self.tokens)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number >= 1; got {top_k!r}")
        compact = self.compact_view(level, hide_special) if rows is None else rows != "all"
        if compact and self.roles is not None:
            raise ValueError("the compact rows view is for encoder or decoder models; an encoder-decoder's "
                             "result gives full maps (rows='all')")
        if not compact and self.rows is not None:
            raise ValueError("only the focus rows were recorded (rows='focus'), so there are no full maps; "
                             "explain again with rows='all'")
        data = self._common_dict(method, level, hide_special, layer, head)
        if compact:
            self._compact_dict(data, method, level, hide_special, focus, rows, top_k)
            return data
        maps = self.maps(method, level, hide_special)
        # one (layer, head) map at a time: one list of a long input's maps would hold the GIL for seconds
        data.update(view="full", maps=[[_round(amap) for amap in layer] for layer in maps],
                    entropy=_round(self.entropy(level)))
        labels = data["labels"]
        if self.cross_layers and not hide_special:
            source, target, cross = self.cross_maps(level)
            data["cross"] = {"layers": self.cross_layers, "source": source, "target": target, "maps": _round(cross)}
        if focus is not None:
            index = self.focus_index(focus, level)
            if hide_special:
                index -= sum(self.units(level)[1][:index])
            data["focus"] = {
                "index": index, "label": labels[index],
                "per_layer": _round(maps[:, :, index].mean(dim=1)),
                "sharpest_heads": self.sharpest_heads(focus, 5, level, hide_special),
            }
        return data

    def _common_dict(self, method: str, level: str, hide_special: bool, layer, head) -> dict:
        head_names = ["rollout"] if method == "rollout" else [str(int(h)) for h in self.records[0].heads]
        labels, special, _ = self.units(level)
        if hide_special:
            labels = [lab for lab, s in zip(labels, special) if not s]
            special = [False] * len(labels)
        data = {
            "format": FORMAT, "model": self.model_name, "text": self.text, "method": method, "level": level,
            "labels": labels, "special": special, "layers": self.num_layers, "heads": len(head_names),
            "head_names": head_names, "normalised": method != "value-norm", "focus": None,
            "selected": {"layer": layer, "head": head}, "attention": self.layer_attention(),
            "modality": self.modality,
        }
        if self.image is not None:
            data["image"] = self.image.to_dict(first_patch=0 if hide_special else 1,
                                               class_token=None if hide_special else 0)
        return data

    def _compact_dict(self, data: dict, method: str, level: str, hide_special: bool, focus, rows, top_k: int) -> None:
        """Fill `data` with the compact "rows" view (qkv.inspect.rows)."""
        u = _rows.units(self, level, hide_special)
        focus_shown = None
        if focus is not None:
            index = self.focus_index(focus, level)
            if index not in u.shown:
                raise ValueError(f"the focus {focus!r} is a special token, and special tokens are hidden")
            focus_shown = u.shown.index(index)
        if isinstance(rows, list):
            wrong = [r for r in rows if not 0 <= r < u.n]
            if wrong:
                raise ValueError(f"row {wrong[0]} does not exist: the text has {u.n} {level}s shown (0..{u.n - 1})")
            ship = rows
        elif focus_shown is not None:
            ship = [focus_shown]
        elif self.image is not None and not hide_special and self.rows is None:
            ship = [0]  # an image: the class token's row
        elif self.rows is not None:  # rows='focus' without a focus given again: the recorded word
            recorded = set(self.rows)
            ship = [i for i, unit in enumerate(u.shown) if set(u.tokens_of[unit]) <= recorded][:1]
            if not ship:
                raise ValueError("no shown word has all its tokens recorded (rows='focus'); pass focus=")
            focus, focus_shown = u.shown[ship[0]], ship[0]
        else:
            ship = _rows.default_rows(u)
        if self.rows is not None:  # rows='focus': only the focus word's rows can be shipped
            _rows._positions(self, [t for i in ship for t in u.tokens_of[u.shown[i]]])
        maps = _rows.row_maps(self, ship, method, u)  # (L, H', R, n)
        L, H = maps.shape[0], maps.shape[1]
        k = min(top_k, u.n)
        data.update(view="rows", rows={"index": ship, "k": k, "top": _rows.top_keys(maps, k)},
                    omitted={"weights": L * H * u.n * u.n - L * H * len(ship) * k, "rows": u.n - len(ship)},
                    entropy=None, summary=None, minimap=None)
        if self.rows is None:
            summary = self.summaries(level, hide_special)
            data["entropy"] = _round(summary["entropy"])
            data["summary"] = {name: _round(summary[name]) for name in ("entropy", "distance", "sink")}
            data["minimap"] = {"received": _round(summary["received"]), "entropy": _round(summary["row_entropy"])}
        if focus_shown is not None:
            per_layer = (maps[:, :, ship.index(focus_shown)] if focus_shown in ship
                         else _rows.row_maps(self, [focus_shown], method, u)[:, :, 0])  # (L, H', n)
            data["focus"] = {"index": focus_shown, "label": data["labels"][focus_shown],
                             "per_layer": _round(per_layer.mean(dim=1)),
                             "sharpest_heads": self.sharpest_heads(focus, 5, level, hide_special)}

    def weights_dict(self, rows: Sequence[int], layers: Optional[Sequence[int]] = None,
                     heads: Optional[Sequence[int]] = None, method: str = "raw", level: str = "word",
                     hide_special: bool = False) -> dict:
        """Full rows of some layers and heads, "qkv.weights/1", computed from the recorded queries
        and keys (what the web page fetches one piece at a time).

        rows: indices of shown units (the labels of `to_dict` with the same level and hide_special);
        layers: layer indices (None = all); heads: head indices of the model (None = every recorded
        head; rollout has the one head "rollout"). Returns {"format", "method", "level",
        "hide_special", "n", "layers", "heads", "rows", "weights": (layers, heads, rows, n)}.
        """
        _check_choice("method", method, METHODS)
        _check_choice("level", level, LEVELS)
        if self.roles is not None:
            raise ValueError("weights_dict is for encoder or decoder models; an encoder-decoder's maps come whole "
                             "from to_dict")
        ship = _check_rows(rows)
        u = _rows.units(self, level, hide_special)
        wrong = [r for r in ship if not 0 <= r < u.n]
        if wrong:
            raise ValueError(f"row {wrong[0]} does not exist: the text has {u.n} {level}s shown (0..{u.n - 1})")
        layer_list = list(range(self.num_layers)) if layers is None else _check_rows(layers, "layers")
        for layer in layer_list:
            self._record(layer)
        if method == "rollout":
            if heads is not None and list(heads) not in ([], ["rollout"]):
                raise ValueError("rollout averages the heads first; give heads=None")
            names: list = ["rollout"]
            positions = None
        else:
            names = [int(h) for h in self.records[0].heads] if heads is None else _check_rows(heads, "heads")
            positions = [self._head_position(self.records[0], h) for h in names]
        maps = _rows.row_maps(self, ship, method, u, layer_list, positions)  # (nl, nh, R, n)
        return {"format": "qkv.weights/1", "method": method, "level": level, "hide_special": hide_special,
                "n": u.n, "layers": layer_list, "heads": names, "rows": ship, "weights": _round(maps)}

    def save_json(self, path, **options) -> None:
        """Write `to_dict(**options)` as JSON to `path` (str or path-like) through qkv's one
        writer (`qkv._files`: whole or not at all; a non-regular target is refused). Full maps of
        a long input are written one layer at a time."""
        big = options.get("rows") == "all" or (options.get("rows") is None and self.mode == "all")
        method = options.get("method", "raw")
        if big and self.roles is None and method != "rollout" and self.rows is None:
            level, hide = options.get("level", "word"), options.get("hide_special", False)
            u = _rows.units(self, level, hide)
            if self.num_layers * self.num_heads * u.n * u.n > FULL_CELLS:
                self._stream_json(path, options, u)
                return
        write_text(path, json.dumps(self.to_dict(**options), ensure_ascii=False), what="JSON")

    def _stream_json(self, path, options: dict, u) -> None:
        """Full maps as JSON, each layer computed (a chunk of rows at a time) and written in turn."""
        method = options.get("method", "raw")
        head = self.to_dict(**{**options, "rows": [0]})  # everything but the maps, from the compact view
        data = self._common_dict(method, u.level, u.hide_special, options.get("layer"), options.get("head"))
        data.update(view="full", entropy=_round(self.entropy(u.level)))  # as to_dict's full view
        if options.get("focus") is not None:
            focus = head["focus"]
            data["focus"] = focus
        layers = (_rows.full_layer(self, layer, method, u) for layer in range(self.num_layers))
        with atomic_output(path, what="JSON") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for part in _rows.dumps_full(data, layers):
                f.write(part)

    def save_html(self, path, **options) -> None:
        from .html import write_html

        write_html(self.to_dict(**options), path)

    def save_png(self, path, *, layer: Optional[int] = None, head: Optional[int] = None, **options) -> None:
        """Draw the result as a PNG at any length (`qkv.inspect.png.save_png`: a long input's compact
        view plus a block map of one layer, built a chunk of rows at a time)."""
        from .png import save_png

        save_png(self, path, layer=layer, head=head, **options)

    # ------------------------------------------------------------------ notebooks (Jupyter's display protocol)
    def _repr_html_(self) -> str:
        """The offline page, isolated in its own frame (qkv.inspect.notebook)."""
        from .notebook import repr_html

        return repr_html(self)

    def _repr_png_(self) -> Optional[bytes]:
        """The PNG picture where matplotlib is installed, else None (qkv.inspect.notebook)."""
        from .notebook import repr_png

        return repr_png(self)


def explain(text: Optional[str] = None, model=None, *, image=None, focus: Union[str, int, None] = None,
            layers: Optional[Sequence[int]] = None, heads: Optional[Sequence[int]] = None, rows: str = "auto",
            truncate: bool = False, name: Optional[str] = None, tokenizer=None,
            interpolate_pos_encoding: bool = False) -> ExplainResult:
    """Run `model` on `text` (or on `image`) and record its attention.

    Args:
        text: the input text (give text or image, not both).
        model: a bundled name, a model folder path or Hub id ("org/name"), a model from
            `qkv.load`, or a transformers `PreTrainedModel` (encoder-only or decoder-only; it runs once
            with attn_implementation "qkv", restored afterwards; `qkv.inspect.foreign`). Default:
            "minilm" for text, "digits" for an image.
        image: one image for a vision transformer (qkv.inspect.image): a path, a PIL image, or a float
            tensor (H, W), (C, H, W) or (1, C, H, W) in [0, 1]; resized and normalised by the model's
            preprocessor. The units are then the class token "[CLS]" and the patches "r{row}c{col}".
        focus: a word of the text (or a word index), needed with rows="focus"; for an image, "cls"
            (the class token) or a patch "r3c4".
        layers, heads: record only these (indices); None = all.
        rows: "auto" (default) records every query row (queries and keys: linear in length), and
            `to_dict` gives full maps while layers x heads x n^2 <= FULL_CELLS, else the compact
            "rows" view (docs/explain.md, "Long inputs"); "all" records every row and gives full
            maps at any length (built a chunk of rows at a time); "focus" records only the focus
            word's tokens, for one word of a very long input.
        truncate: cut text longer than the model's positions instead of raising.
        name: the model's name in the result and its pictures (default: the bundled name or
            path given, or the model's class name for a model object; a transformers model's
            name_or_path).
        tokenizer: a transformers model's fast tokenizer (AutoTokenizer); required with one, unless
            it came from `qkv.models.load_transformers`, which attaches it. qkv's own models carry theirs.
        interpolate_pos_encoding: an image of another size than the model's runs on resampled
            position embeddings instead of being refused (when the preprocessor does not resize).

    Returns:
        an `ExplainResult`. The model's outputs are not changed by the recording.
    """
    if image is not None:
        if text is not None:
            raise TypeError("give text or image=, not both: explain reads one input")
        if tokenizer is not None:
            raise TypeError("tokenizer= is for text; an image needs none: drop tokenizer=")
        return _explain_image(image, "digits" if model is None else model, focus=focus, layers=layers,
                              heads=heads, rows=rows, name=name, interpolate=interpolate_pos_encoding)
    if interpolate_pos_encoding:
        raise TypeError("interpolate_pos_encoding is for images (explain(image=...)); drop it for text")
    model = "minilm" if model is None else model
    text = _check_text(text)
    _check_choice("rows", rows, ROWS)
    _check_focus_type(focus)
    if rows == "focus" and focus is None:
        raise ValueError("rows='focus' needs a focus word")
    if not isinstance(model, (str, os.PathLike, torch.nn.Module)):
        raise TypeError(f"model must be a bundled name, a model folder path, a model from qkv.load or a "
                        f"transformers model; got {type(model).__name__}")
    from .foreign import is_transformers_model

    if is_transformers_model(model):
        return _explain_transformers(text, model, tokenizer, focus=focus, layers=layers, heads=heads, rows=rows,
                                     truncate=truncate, name=name)
    if tokenizer is not None:
        raise TypeError("tokenizer= is for transformers models; qkv's own models carry their tokenizer "
                        "(model.tokenizer): drop tokenizer=")
    model, loaded_name = _load_model(model)
    name = loaded_name if name is None else str(name)
    _check_layers_heads(model, name, layers, heads)
    if getattr(model, "is_encoder_decoder", False):
        if rows == "focus":
            raise ValueError("rows='focus' is for encoder or decoder models; "
                             "explain an encoder-decoder with rows='all'")
        _tokenizer_of(model, name)
        return _explain_seq2seq(text, model, name, focus=focus, layers=layers, heads=heads, truncate=truncate)
    probe, batch = prepare(text, model, name, truncate=truncate)
    ids, attention_mask = batch.input_ids, batch.attention_mask
    record_rows = _focus_rows(probe, focus, rows)

    recorder = Recorder(layers=layers, heads=heads, rows=record_rows).attach(model)
    try:
        with torch.no_grad():
            model(ids, attention_mask=attention_mask)
    finally:
        recorder.detach()
    return _result(probe, recorder, record_rows, layers, rows)


def _explain_image(image, model, *, focus, layers, heads, rows: str, name: Optional[str],
                   interpolate: bool) -> ExplainResult:
    """explain for a vision transformer (qkv.inspect.image): the class token and the patches as units."""
    from . import image as _image

    _check_choice("rows", rows, ROWS)
    _check_focus_type(focus)
    if rows == "focus" and focus is None:
        focus = "cls"
    if isinstance(interpolate, bool) is False:
        raise TypeError(f"interpolate_pos_encoding must be True or False; got {interpolate!r}")
    from .foreign import is_transformers_model

    if is_transformers_model(model):
        raise TypeError("explain(image=...) runs qkv's own vision transformer; load the checkpoint's folder with "
                        "qkv.load(folder) (ViTModel and ViTForImageClassification folders load natively)")
    if not isinstance(model, (str, os.PathLike, torch.nn.Module)):
        raise TypeError(f"model must be a bundled name, a model folder path or a model from qkv.load; "
                        f"got {type(model).__name__}")
    model, loaded_name = _load_model(model)
    name = loaded_name if name is None else str(name)
    if not _image.is_image_model(model):
        raise ValueError(f"model {name!r} reads text, not images; explain an image with a vision transformer "
                         f"(model='digits' or a ViT folder), or pass text")
    _check_layers_heads(model, name, layers, heads)
    shown, pixels, label = _image.read_image(image, model, name, interpolate)  # (1, C, H, W) each
    probe = image_probe(label, shown, model, name)
    assert probe.image is not None
    record_rows = _focus_rows(probe, focus, rows)
    recorder = Recorder(layers=layers, heads=heads, rows=record_rows).attach(model)
    try:
        with torch.no_grad():
            out = model(pixels.to(model.device), interpolate)
    finally:
        recorder.detach()
    result = _result(probe, recorder, record_rows, layers, rows)
    if hasattr(model, "classifier"):  # ViTForImageClassification: out is (1, num_labels) logits
        probe.image.probabilities = out[0].float().softmax(-1).cpu()
    result.modality, result.image = "image", probe.image
    return result


def image_probe(label: str, shown: Tensor, model, name: str) -> ExplainResult:
    """An image's ExplainResult without records: the class token and the patches of `shown` (1, C, H, W)
    in [0, 1] at the model's size, and its ImageInfo (no prediction yet). `qkv serve` checks a focus
    patch and estimates the cost on it before the model runs, as `prepare` does for a text."""
    from . import image as _image

    P = model.config.patch_size
    grid = (shown.shape[-2] // P, shown.shape[-1] // P)
    patches = _image.patch_labels(*grid)
    probe = ExplainResult(label, name, [_image.CLASS_TOKEN] + patches, [True] + [False] * len(patches),
                          list(patches), [None] + list(range(len(patches))), records=[], modality="image")
    probe.image = _image.ImageInfo(label, shown[0].float(), grid, P, list(getattr(model, "labels", [])))
    return probe


def _focus_rows(probe: "ExplainResult", focus, rows: str) -> Optional[list[int]]:
    """The token rows to record: the focus word's with rows='focus', else None (all). A missing
    focus word is reported now, before the model runs."""
    if focus is None:
        return None
    w = probe.focus_index(focus, "word")
    if rows != "focus":
        return None
    _, _, unit_of = probe.units("word")
    return [t for t, u in enumerate(unit_of) if u == w]


def _result(probe: "ExplainResult", recorder: Recorder, record_rows, layers, mode: str) -> "ExplainResult":
    result = ExplainResult(probe.text, probe.model_name, probe.tokens, probe.special, probe.words,
                           probe.word_of_token, recorder.records, rows=record_rows, mode=mode)
    if not result.records:
        raise ValueError(f"no layer was recorded: layers {list(layers or [])} do not exist "
                         f"(the model has {recorder.num_layers} attention layers)")
    return result


def _explain_transformers(text: str, model, tokenizer, *, focus, layers, heads, rows: str, truncate: bool,
                          name: Optional[str]) -> "ExplainResult":
    """explain for a transformers model (qkv.inspect.foreign): its tokenizer's tokens and words, one
    run with attn_implementation "qkv" and a Recorder on its attention modules."""
    from . import foreign

    tok = foreign.tokenizer_for(model, tokenizer)
    if name is None:
        name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    foreign.check_model(model, name)
    n_layers, n_heads = foreign.shape_of(model)
    _check_indices(name, layers, heads, n_layers, n_heads)
    probe, enc = prepare(text, model, name, truncate=truncate, tokenizer=tok)
    record_rows = _focus_rows(probe, focus, rows)
    recorder = foreign.record(model, foreign.model_inputs(model, enc), layers=layers, heads=heads, rows=record_rows)
    return _result(probe, recorder, record_rows, layers, rows)


def _check_text(text) -> str:
    """The text explain takes: one string, checked by the tokenizer's own check (qkv.models.tokenizer)."""
    from ..models.tokenizer import check_texts

    if not isinstance(text, str):
        hint = ("; explain takes one sentence: call it once per sentence, e.g. [qkv.explain(t) for t in texts]"
                if isinstance(text, (list, tuple)) else
                "; or explain an image with image=path" if text is None else "")
        raise TypeError(f"text must be a string (the sentence to explain); got {type(text).__name__}{hint}")
    return check_texts(text, what="the text")[0]


def _check_focus_type(focus) -> None:
    if focus is not None and (isinstance(focus, bool) or not isinstance(focus, (str, int))):
        raise TypeError(f"focus must be a word of the text (a string), a word index (an int) or None; "
                        f"got {type(focus).__name__}")


def _tokenizer_of(model, name: str):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        from .image import is_image_model

        if is_image_model(model):
            raise ValueError(f"model {name!r} is a vision transformer: it reads images, not text; explain an image "
                             f"(qkv.explain(image=path, model=...); qkv explain --image FILE)")
        raise ValueError(f"model {name!r} has no tokenizer; explain needs one to turn text into tokens")
    return tok


def attention_layers(model) -> list:
    """(name, module) of every qkv attention layer of `model`, in the order of explain's layer indices."""
    from ..nn import MultiHeadAttention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]


def model_shape(model) -> tuple[int, int]:
    """(attention layers, the fewest query heads of a layer) of a qkv model or a transformers model."""
    from .foreign import is_transformers_model, shape_of

    if is_transformers_model(model):
        return shape_of(model)
    found = attention_layers(model) if isinstance(model, torch.nn.Module) else []
    return len(found), min((m.num_heads for _, m in found), default=0)


def _check_layers_heads(model, name: str, layers, heads) -> None:
    """Refuse layer and head indices the model lacks before it runs (the recorder would find out later)."""
    _check_indices(name, layers, heads, *model_shape(model))


def _check_indices(name: str, layers, heads, n_layers: int, n_heads: int) -> None:
    for what, values, count in (("layers", layers, n_layers), ("heads", heads, n_heads)):
        if values is None:
            continue
        values = _check_rows(values, what, empty_ok=True)
        if n_layers:
            missing = [v for v in values if not 0 <= v < count]
            if missing:
                raise ValueError(f"{what} {missing} do not exist: {name!r} has {what} 0..{count - 1}")


def prepare(text: str, model, name: str, *, truncate: bool = False, tokenizer=None):
    """(an ExplainResult without records, the tokenizer's Batch (a BatchEncoding for a transformers
    model)): the tokens, words and units that explain uses for `text`, found without running the
    model. The command line checks a focus word and the length of --compare's sentence on it
    before anything runs."""
    from .foreign import encode, is_transformers_model, tokenizer_for

    if is_transformers_model(model):
        tok = tokenizer_for(model, tokenizer)
        enc, tokens, special, words, word_of_token = encode(text, model, tok, name, truncate=truncate)
        return ExplainResult(text, name, tokens, special, words, word_of_token, records=[]), enc
    tok = _tokenizer_of(model, name)
    batch = tok([text], truncate=truncate)
    word_of_token = list(batch.word_ids[0])
    special = [w is None for w in word_of_token]
    words = _words(text, word_of_token, batch.offsets[0])
    return ExplainResult(text, name, list(batch.tokens[0]), special, words, word_of_token, records=[]), batch


def _explain_seq2seq(text: str, model, name: str, *, focus, layers, heads, truncate: bool) -> ExplainResult:
    """Translate `text` greedily, then record every attention while the decoder reads its own output."""
    tok = model.tokenizer
    batch = tok([text], truncate=truncate)
    src, src_mask = batch.input_ids, batch.attention_mask  # (1, Ls)
    out = model.generate(src, attention_mask=src_mask)  # (1, 1 + T): [BOS] y1 .. [EOS]
    dec_in, produced = out[:, :-1], out[0, 1:].tolist()  # step t reads dec_in[t] and writes produced[t]
    word_of_token = list(batch.word_ids[0])
    words = _words(text, word_of_token, batch.offsets[0])
    specials = {tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "<s>", "</s>", "<pad>")} - {None}
    target = [tok.backend.id_to_token(i) or str(i) for i in produced]
    for t, i in zip(target, produced):
        if i in specials:
            word_of_token.append(None)
        else:
            word_of_token.append(len(words))
            words.append(t)
    tokens = list(batch.tokens[0]) + target
    special = [w is None for w in word_of_token]
    recorder = Recorder(layers=layers, heads=heads).attach(model)
    try:
        with torch.no_grad():
            model(src, dec_in, attention_mask=src_mask)
    finally:
        recorder.detach()
    if not recorder.records:
        raise ValueError(f"no layer was recorded: layers {list(layers or [])} do not exist "
                         f"(the model has {recorder.num_layers} attention layers)")
    roles = [model.attention_role(r.name) for r in recorder.records]
    result = ExplainResult(text, name, tokens, special, words, word_of_token, recorder.records,
                           roles=roles, source_len=src.shape[1])
    if focus is not None:
        result.focus_index(focus, "word")
    return result


def _words(text: str, word_of_token, offsets) -> list[str]:
    spans: dict[int, list[int]] = {}
    for w, (start, end) in zip(word_of_token, offsets):
        if w is None:
            continue
        span = spans.setdefault(w, [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return [text[spans[w][0]:spans[w][1]] for w in sorted(spans)]


def _norm(word: str) -> str:
    stripped = re.sub(r"[^\w]", "", word.lower())
    return stripped or word.lower()


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


_LISTED = 40  # words a "not in the text" message lists


def _check_rows(values, what: str = "rows", empty_ok: bool = False) -> list[int]:
    """A list of whole numbers (indices), else a TypeError naming `what` (an empty one: a ValueError
    unless `empty_ok`)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a list of indices; got {type(values).__name__}")
    values = list(values)
    wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
    if wrong:
        raise TypeError(f"{what} must be whole numbers; got {wrong[0]!r}")
    if not values and not empty_ok:
        raise ValueError(f"{what} is empty; give at least one index")
    return values


def _round(t: Tensor, digits: int = 5):
    return torch.round(t.double(), decimals=digits).tolist()
