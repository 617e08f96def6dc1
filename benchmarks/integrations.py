"""attn_implementation="qkv" inside transformers against "sdpa" and "eager", same model, same run.

One small Llama-shaped model with random weights (speed does not depend on them): hidden 512,
`--layers` blocks (default 4), 8 query heads and 4 key/value heads (GQA, D=64), SwiGLU 1408,
vocabulary 32000, float32 on the CPU. The same weights run under each implementation (one
copy of the model per implementation, set once with `set_attn_implementation`). Measured with
qkv.bench.timing (a warm-up call, then `--repeats` samples of each implementation in turns, the best kept):

- forward: one forward pass of a batch of one random prompt of L tokens (`--lengths`, default
  512 and 2048), no cache, `logits_to_keep=1` (as generate's prefill);
- generate: `model.generate` of `--new-tokens` (default 32) greedy tokens after a prompt of
  `--prompt` tokens (default 512), DynamicCache; the tokens of every implementation are compared;
- weights: the forward pass at the longest length with `output_attentions=True` (qkv: the output on
  its fast path, weights recomputed; eager: its own; sdpa cannot return weights and is absent), the
  largest difference of the returned weights against eager's is printed.

Ratios: "vs sdpa" = sdpa time / qkv time (1.0 = as fast; above 1: qkv faster), "vs eager" likewise.

    python benchmarks/integrations.py                      # the table in docs/benchmarks.md
    python benchmarks/integrations.py --quick              # 256 tokens, 8 new tokens, 2 repeats
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qkv._files import write_text  # noqa: E402
from qkv.bench.timing import best_times  # noqa: E402

IMPLS = ("qkv", "sdpa", "eager")


def build_model(layers: int):
    import transformers

    from qkv.integrations import transformers as qkv_hf

    qkv_hf.register()
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def copies(model) -> dict:
    """{implementation: a copy of `model` running it}."""
    out = {}
    for impl in IMPLS:
        m = copy.deepcopy(model)
        m.set_attn_implementation(impl)
        out[impl] = m
    return out


def forward(models, impl: str, ids, **kw):
    return models[impl](ids, logits_to_keep=1, **kw)


def generate(models, impl: str, ids, new_tokens: int):
    return models[impl].generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)


def timed(fns: dict, repeats: int) -> dict:
    with torch.inference_mode():
        return best_times(fns, repeats=repeats)


def row(what: str, t: dict) -> dict:
    out = {"case": what, **{f"{k}_s": v for k, v in t.items()}}
    if "sdpa" in t:
        out["vs_sdpa"] = t["sdpa"] / t["qkv"]
    out["vs_eager"] = t["eager"] / t["qkv"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="256 tokens, 8 new tokens, 2 repeats")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.prompt, args.new_tokens, args.repeats = [256], 128, 8, 2

    model = copies(build_model(args.layers))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for L in args.lengths:
        ids = torch.randint(0, 32000, (1, L), generator=gen)
        rows.append(row(f"forward {L}", timed({i: partial(forward, model, i, ids) for i in IMPLS}, args.repeats)))

    prompt = torch.randint(0, 32000, (1, args.prompt), generator=gen)
    with torch.inference_mode():
        tokens = {i: generate(model, i, prompt, args.new_tokens) for i in IMPLS}
    same = all(torch.equal(tokens[i], tokens["eager"]) for i in IMPLS)
    t = timed({i: partial(generate, model, i, prompt, args.new_tokens) for i in IMPLS}, args.repeats)
    rows.append({**row(f"generate {args.new_tokens} after {args.prompt}", t), "same_tokens": same})

    L = max(args.lengths)
    ids = torch.randint(0, 32000, (1, L), generator=gen)
    with torch.inference_mode():
        a = forward(model, "qkv", ids, output_attentions=True).attentions
        b = forward(model, "eager", ids, output_attentions=True).attentions
    diff = max((x - y).abs().max().item() for x, y in zip(a, b))
    fns = {i: partial(forward, model, i, ids, output_attentions=True) for i in ("qkv", "eager")}
    rows.append({**row(f"forward {L}, output_attentions", timed(fns, args.repeats)), "max_weight_diff": diff})

    print(f"attn_implementation inside transformers: Llama-shaped, hidden 512, {args.layers} layers, 8 heads "
          f"(4 kv), float32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; best of {args.repeats}")
    print(f"{'case':<34} {'qkv s':>9} {'sdpa s':>9} {'eager s':>9} {'vs sdpa':>8} {'vs eager':>9}")
    for r in rows:
        sdpa = f"{r['sdpa_s']:9.4f}" if "sdpa_s" in r else f"{'-':>9}"
        vs = f"{r['vs_sdpa']:7.2f}x" if "vs_sdpa" in r else f"{'-':>8}"
        print(f"{r['case']:<34} {r['qkv_s']:9.4f} {sdpa} {r['eager_s']:9.4f} {vs} {r['vs_eager']:8.2f}x")
    gen_row = rows[len(args.lengths)]
    print(f"greedy tokens identical across implementations: {gen_row['same_tokens']}; largest difference of the "
          f"returned weights, qkv vs eager: {rows[-1]['max_weight_diff']:.2e}")
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
