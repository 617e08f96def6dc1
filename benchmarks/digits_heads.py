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
    python benchmarks/digits_heads.py --png docs/images/digits-rollout.png   # and the samples' rollout picture
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
    ap.add_argument("--png", metavar="FILE", help="also draw each sample digit with its class token's rollout "
                    "up to the last layer (needs matplotlib)")
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


    if args.png:
        draw_samples(model, args.png)
        print(f"\nwrote {args.png}")


def draw_samples(model, path: str) -> None:
    """The ten sample digits (samples/digit-*.png): the picture, and over it the class token's attention
    rollout up to the last layer, each scaled to its own max."""
    from matplotlib.figure import Figure

    from qkv._files import atomic_output
    from qkv.inspect.image import samples
    from qkv.models import bundled_path

    files = samples(bundled_path("digits"))
    fig = Figure(figsize=(2.0 * len(files), 4.4))
    for i, f in enumerate(files):
        r = qkv.explain(image=f, model=model)
        picture = r.image.pixels[0].numpy()  # (8, 8)
        roll = r.image_maps("cls", "rollout")[-1, 0]  # (4, 4): rollout up to the last layer
        heat = (roll / roll.max()).repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()  # (4, 4) -> (8, 8)
        top = r.image.prediction(1)[0]
        for row, (data, cmap) in enumerate(((picture, "gray"), (heat, "magma"))):
            ax = fig.add_subplot(2, len(files), row * len(files) + i + 1)
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if row:
                ax.imshow(data, cmap=cmap, vmin=0, vmax=1, alpha=0.75, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f.name if not row else f"{top['label']} {top['probability']:.0%}, rollout", fontsize=8)
    fig.tight_layout()
    with atomic_output(path, what="PNG") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


if __name__ == "__main__":
    main()
