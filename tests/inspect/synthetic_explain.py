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


def docs_data() -> dict:
    """'The cat sat on the mat.' with synthetic, structured heads (previous word, next word,
    [SEP], itself, broad), for the picture in the docs until the real MiniLM one replaces it."""
    rng = np.random.default_rng(7)
    labels = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]
    n, L, H = len(labels), 6, 12
    idx = np.arange(n)
    patterns = [np.eye(n, k=-1) + 0.02, np.eye(n, k=1) + 0.02, np.zeros((n, n)) + np.eye(n)[[-1] * n] * 3 + 0.05,
                np.eye(n) * 2 + 0.1, np.ones((n, n)), np.exp(-np.abs(idx[:, None] - idx[None, :]))]
    maps = np.empty((L, H, n, n))
    for lay in range(L):
        for h in range(H):
            base = patterns[(lay * 5 + h * 7) % len(patterns)]
            noisy = base + rng.dirichlet(np.full(n, 0.5), size=n) * 0.6
            maps[lay, h] = noisy / noisy.sum(-1, keepdims=True)
    maps[3:, :4, 2] = 0.02  # late heads: "cat" looks at "sat" and "mat"
    maps[3:, :4, 2, 3] += 0.5
    maps[3:, :4, 2, 6] += 0.3
    maps /= maps.sum(-1, keepdims=True)
    data = make_data(n_words=1, layers=L, heads=H, focus=None)
    ent = -(maps * np.log(maps)).sum(-1)  # (L, H, n)
    rows = maps[:, :, 2]
    order = np.argsort(ent[:, :, 2], axis=None)[:5]
    data.update(
        model="synthetic (docs picture)", text="The cat sat on the mat.", labels=labels,
        special=[lab in ("[CLS]", "[SEP]") for lab in labels], layers=L, heads=H,
        head_names=[str(h) for h in range(H)], maps=maps.tolist(), entropy=ent.mean(-1).tolist(),
        focus={
            "index": 2, "label": "cat", "per_layer": rows.mean(1).tolist(),
            "sharpest_heads": [
                {"layer": int(f) // H, "head": int(f) % H, "entropy": float(ent[int(f) // H, int(f) % H, 2]),
                 "top": [{"label": labels[j], "weight": float(rows[int(f) // H, int(f) % H, j])}
                         for j in np.argsort(-rows[int(f) // H, int(f) % H])[:3]]}
                for f in order
            ],
        },
    )
    return data
