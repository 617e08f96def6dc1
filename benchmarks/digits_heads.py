"""What the bundled digits model's heads learned, over the 360 held-out images (never trained on).

An analysis, not a timing: it prints the Markdown tables of docs/images.md.

- distance: mean attention distance in pixels (Dosovitskiy et al. 2021, fig. 7;
  `qkv.inspect.image.attention_distance`), against the same measure for uniform attention;
- self: the mean weight a patch gives itself;
- ink: the share of the class token's attention on "ink" patches (mean intensity above 0.25),
  against the share of patches that are ink (what uniform attention would give);
- rollout: the same ink share for the class token's attention rollout (Abnar & Zuidema, 2020)
  up to each layer.

    python benchmarks/digits_heads.py            # needs scikit-learn (the test extra): the held-out images
"""

from __future__ import annotations

import argparse

import torch

import qkv
from qkv.inspect.image import attention_distance
from qkv.train.digits import held_out

INK = 0.25  # a patch whose mean intensity is above this holds part of the stroke


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=360, help="held-out images to average over (default: all 360)")
    args = ap.parse_args()
    images, digits = held_out()  # (360, 8, 8) in [0, 1], (360,)
    images, digits = images[:args.images], digits[:args.images]
    model = qkv.load("digits")
    L, H = 4, 4
    distance = torch.zeros(L, H, dtype=torch.float64)
    self_w = torch.zeros(L, H, dtype=torch.float64)
    ink_cls = torch.zeros(L, H, dtype=torch.float64)
    ink_roll = torch.zeros(L, dtype=torch.float64)
    ink_fraction = 0.0
    uniform = None
    for x in images:
        r = qkv.explain(image=x, model=model)
        patches = x.view(4, 2, 4, 2).mean(dim=(1, 3)).flatten()  # (8, 8) -> (4, 2, 4, 2) -> (16,) patch means
        ink = (patches > INK).double()  # (16,)
        ink_fraction += float(ink.mean())
        distance += attention_distance(r).double()
        att = r.attentions.double()  # (L, H, 17, 17)
        self_w += torch.diagonal(att[:, :, 1:, 1:], dim1=-2, dim2=-1).mean(-1)  # (L, H)
        cls = att[:, :, 0, 1:]  # (L, H, 16): the class token over the patches
        ink_cls += (cls * ink).sum(-1) / cls.sum(-1)
        roll = r.image_maps("cls", "rollout")[:, 0].flatten(1).double()  # (L, 16)
        ink_roll += (roll * ink).sum(-1) / roll.sum(-1)
        if uniform is None:
            g = torch.arange(4, dtype=torch.float64)
            rr, cc = g.repeat_interleave(4), g.repeat(4)
            d = torch.sqrt((rr[:, None] - rr) ** 2 + (cc[:, None] - cc) ** 2) * 2  # (16, 16) pixels
            uniform = float(d.mean())
    n = len(images)
    print(f"digits model, {n} held-out images (torch {torch.__version__}); ink patches: {ink_fraction / n:.1%} "
          f"of the 16 on average\n")
    print(f"| layer | head | distance (px; uniform {uniform:.2f}) | self weight | class token on ink |")
    print("|---|---|---|---|---|")
    for layer in range(L):
        for head in range(H):
            print(f"| {layer} | {head} | {distance[layer, head] / n:.2f} | {self_w[layer, head] / n:.3f} | "
                  f"{ink_cls[layer, head] / n:.1%} |")
    print(f"\n| rollout up to layer | class token on ink (uniform: {ink_fraction / n:.1%}) |")
    print("|---|---|")
    for layer in range(L):
        print(f"| {layer} | {ink_roll[layer] / n:.1%} |")


if __name__ == "__main__":
    main()
