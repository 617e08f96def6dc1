"""A synthetic "qkv.explain/1" dict for the renderer tests (no model): Dirichlet rows, one
malicious label, special ends. A plain helper module, imported by name (a conftest.py cannot
be: every conftest.py outside a package is the module `conftest`, so the name is ambiguous)."""

from __future__ import annotations

import numpy as np

MALICIOUS_LABEL = "<script>alert(1)</script>"
MALICIOUS_TEXT = 'The cat </script><b>x</b> sat on the "mat" & été\u2028.'


def make_data(n_words: int = 8, layers: int = 3, heads: int = 4, *, seed: int = 0, method: str = "raw",
              focus: int | None = 2) -> dict:
    """A synthetic "qkv.explain/1" dict: Dirichlet rows, one malicious label, special ends."""
    rng = np.random.default_rng(seed)
    base = ["the", "cat", MALICIOUS_LABEL, "sat", "on", "the", "mat", "été", "\u2028", "'q\""]
    words = [base[i % len(base)] if i < len(base) else f"w{i}" for i in range(n_words)]
    labels = ["[CLS]", *words, "[SEP]"]
    n = len(labels)
    maps = rng.dirichlet(np.full(n, 0.3), size=(layers, heads, n))  # (L, H, n, n), rows sum to 1
    if method == "value-norm":
        maps = maps * rng.uniform(0.5, 4.0, size=(layers, heads, n, 1))
    entropy = -(maps * np.log(np.clip(maps, 1e-12, None))).sum(-1).mean(-1)  # (L, H)
    data = {
        "format": "qkv.explain/1",
        "model": "synthetic",
        "text": MALICIOUS_TEXT,
        "method": method,
        "level": "word",
        "labels": labels,
        "special": [lab in ("[CLS]", "[SEP]") for lab in labels],
        "layers": layers,
        "heads": heads,
        "head_names": [str(h) for h in range(heads)],
        "maps": maps.tolist(),
        "normalised": method != "value-norm",
        "focus": None,
        "entropy": entropy.tolist(),
    }
    if focus is not None:
        rows = maps[:, :, focus, :]  # (L, H, n)
        ent = -(rows * np.log(np.clip(rows, 1e-12, None))).sum(-1)  # (L, H)
        order = np.argsort(ent, axis=None)[:5]
        sharpest = []
        for flat in order:
            lay, head = divmod(int(flat), heads)
            top = np.argsort(-rows[lay, head])[:3]
            sharpest.append({
                "layer": lay, "head": head, "entropy": float(ent[lay, head]),
                "top": [{"label": labels[j], "weight": float(rows[lay, head, j])} for j in top],
            })
        data["focus"] = {
            "index": focus,
            "label": labels[focus],
            "per_layer": rows.mean(1).tolist(),
            "sharpest_heads": sharpest,
        }
    return data
