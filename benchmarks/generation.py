"""Greedy generation speed at long cache lengths: qkv against Hugging Face transformers, same run.

For each model and cache length L: a random prompt of L tokens fills the KV cache (qkv: chunked
prefill, `prefill_chunk` as `generate` uses by default; transformers: one forward pass with
`use_cache=True` and `logits_to_keep=1`, as its `generate` does by default), then N new tokens
are generated greedily, one forward pass of one position each, and timed (qkv.bench.timing: a
first run of N tokens per side, whose tokens are compared, then --repeats runs, the sides in
turns, best kept). The step loop is
the same on both sides (forward one token against the cache, argmax of the last logits);
qkv's is what `model.generate` runs. transformers uses its default attention
(attn_implementation="sdpa") and its default cache (DynamicCache). The tokens of both sides
are compared. Ratio = transformers time / qkv time (above 1: qkv is faster).

Models have random weights (speed does not depend on them), are built by transformers, saved
to a temporary folder and loaded by qkv, so both sides run the same weights:

- "gpt2": GPT-2-shaped (n_embd 768, 12 heads, D=64, vocabulary 50257, learned positions);
  the released GPT-2 has only 1024 positions, so n_positions is raised to fit the longest run.
  `--layers` blocks (default 2, to keep the 32k prefill short; GPT-2 small has 12).
- "llama": a small Llama-family config: hidden 1024, 16 query heads and 4 key/value heads
  (GQA, D=64), SwiGLU 2816, vocabulary 32000, rope_theta 500000, `--layers` blocks.

    python benchmarks/generation.py                        # 1k, 8k, 32k; both models (a few minutes)
    python benchmarks/generation.py --quick                # 1k and 8k, 2 layers, 8 tokens
    python benchmarks/generation.py --models llama --lengths 8192 --new-tokens 32
    python benchmarks/generation.py --prefill-chunks 512 1024 2048 4096 0 --lengths 8192 32768 --no-peer
                                                           # qkv prefill time per chunk size (0 = one pass)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import qkv  # noqa: E402
from qkv._files import write_text  # noqa: E402
from qkv.bench.timing import Sampler, best_of, clock, sample_in_turns  # noqa: E402
from qkv.models.generation import PREFILL_CHUNK, prefill_chunks  # noqa: E402


def hf_model(kind: str, layers: int, positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=50257, n_positions=positions, n_embd=768, n_layer=layers, n_head=12,
                         bos_token_id=0, eos_token_id=None, attn_implementation="sdpa")
        return GPT2LMHeadModel(cfg).eval(), f"GPT-2-shaped, {layers} layers x 768, 12 heads (D=64), vocab 50257"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=positions,
                      rope_theta=500000.0, bos_token_id=0, eos_token_id=None, attn_implementation="sdpa")
    return (LlamaForCausalLM(cfg).eval(),
            f"Llama-family, {layers} layers x 1024, 16 q / 4 kv heads (D=64), SwiGLU 2816, vocab 32000")


class QkvSide:
    """qkv: chunked prefill into a KVCache, then the step `generate` runs."""

    def __init__(self, model, chunk):
        self.model, self.chunk = model, chunk

    def prefill(self, prompt, capacity):
        self.cache = self.model.new_cache(prompt.shape[0], capacity=capacity)
        self.length = prompt.shape[1]
        if self.chunk:
            for chunk_h in prefill_chunks(self.model, prompt, self.chunk, cache=self.cache):
                h = chunk_h  # keep only the last chunk's states, as generate does
        else:
            h = self.model.hidden(prompt, cache=self.cache)  # (1, L, E)
        return self.model.logits(h[:, -1]).argmax(-1)  # (1,)

    def step(self, ids):
        return self.model.logits(self.model.hidden(ids[:, None], cache=self.cache)[:, -1]).argmax(-1)  # (1,)

    def reset(self):
        self.cache.crop(self.length)


class HFSide:
    """transformers: one forward over the prompt with its DynamicCache, then one position per token."""

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt, capacity):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        out = self.model(prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.length = prompt.shape[1]
        return out.logits[:, -1].argmax(-1)  # (1,)

    def step(self, ids):
        out = self.model(ids[:, None], past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].argmax(-1)  # (1,)

    def reset(self):
        extra = self.cache.get_seq_length() - self.length
        if extra:
            self.cache.crop(-extra)


def decode(side, first, n: int) -> list[int]:
    """n greedy steps from token `first` (shape (1,)); the cache is put back afterwards."""
    ids, out = first, []
    for _ in range(n):
        ids = side.step(ids)  # (1,)
        out.append(int(ids))
    side.reset()
    return out


def bench_one(kind: str, L: int, args) -> dict:
    ref, desc = hf_model(kind, args.layers, positions=L + args.new_tokens + 8)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        ours = qkv.load(tmp)
    prompt = torch.randint(1, ref.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(L))
    sides = {"qkv": QkvSide(ours, args.chunk)}
    if not args.no_peer:
        sides["transformers"] = HFSide(ref)
    row = {"model": kind, "config": desc, "L": L, "new_tokens": args.new_tokens, "prefill_chunk": args.chunk}
    first, tokens, samplers = {}, {}, {}
    with torch.inference_mode():
        for name, side in sides.items():
            t0 = clock()
            first[name] = side.prefill(prompt, capacity=L + args.new_tokens + 1)
            row[f"{name}_prefill_s"] = clock() - t0
            samplers[name] = Sampler(partial(decode, side, first[name], args.new_tokens))
            tokens[name] = [int(first[name])] + samplers[name].first()  # the warm-up run gives the tokens
        runs = sample_in_turns(samplers, args.repeats)  # alternately, so load spikes hit both sides alike
    best = {name: run["seconds"] for name, run in runs.items()}
    for name in sides:
        row[f"{name}_tokens_per_s"] = args.new_tokens / best[name]
    if "transformers" in sides:
        row["ratio"] = best["transformers"] / best["qkv"]
        row["prefill_ratio"] = row["transformers_prefill_s"] / row["qkv_prefill_s"]
        same = sum(a == b for a, b in zip(tokens["qkv"], tokens["transformers"]))
        row["check"] = "identical tokens" if same == len(tokens["qkv"]) else f"{same}/{len(tokens['qkv'])} tokens equal"
    return row


def bench_prefill_chunks(args) -> list[dict]:
    """qkv's prefill time (best of --repeats) per chunk size, on the models above."""
    rows = []
    for kind in args.models:
        for L in args.lengths:
            ref, desc = hf_model(kind, args.layers, positions=L + 8)
            with tempfile.TemporaryDirectory() as tmp:
                ref.save_pretrained(tmp, safe_serialization=True)
                ours = qkv.load(tmp)
            del ref
            prompt = torch.randint(1, ours.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(L))
            side = QkvSide(ours, None)
            for chunk in args.prefill_chunks:
                side.chunk = chunk or None
                with torch.inference_mode():  # the first run counts: prefill calls are long
                    best = best_of(partial(side.prefill, prompt, capacity=L + 1), repeats=args.repeats,
                                   warmup=False)["seconds"]
                rows.append({"model": kind, "config": desc, "L": L, "chunk": chunk, "prefill_s": best})
                print(f"  {kind} L={L} chunk={chunk or 'one pass'}: {best:.2f} s", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["gpt2", "llama"], default=["gpt2", "llama"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768], help="cache lengths (prompt tokens)")
    p.add_argument("--new-tokens", type=int, default=16, help="timed new tokens per run")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs per side (best is kept)")
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="qkv prefill chunk (0 = one pass)")
    p.add_argument("--no-peer", action="store_true", help="qkv only (no transformers)")
    p.add_argument("--prefill-chunks", type=int, nargs="+",
                   help="only time qkv's prefill for these chunk sizes (0 = one pass)")
    p.add_argument("--quick", action="store_true", help="1k and 8k, 2 layers, 8 new tokens, 2 repeats")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.layers, args.new_tokens, args.repeats = [1024, 8192], 2, 8, 2
    args.chunk = args.chunk or None
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
              f"load average {os.getloadavg()[0]:.2f} at the start")
    if args.prefill_chunks:
        rows = bench_prefill_chunks(args)
        print(f"\n{header}\nqkv prefill time by chunk size, batch 1, float32, best of {args.repeats}\n")
        chunks = args.prefill_chunks
        print("| model | L | " + " | ".join(f"chunk {c}" if c else "one pass" for c in chunks) + " |")
        print("|---|---|" + "---|" * len(chunks))
        for kind in args.models:
            for L in args.lengths:
                cells = [next(r for r in rows if r["model"] == kind and r["L"] == L and r["chunk"] == c)
                         for c in chunks]
                print(f"| {kind} | {L} | " + " | ".join(f"{r['prefill_s']:.2f} s" for r in cells) + " |")
    else:
        rows = []
        for kind in args.models:
            for L in args.lengths:
                rows.append(bench_one(kind, L, args))
                r = rows[-1]
                print(f"  {kind} L={L}: qkv {r['qkv_tokens_per_s']:.1f} tok/s"
                      + (f", transformers {r['transformers_tokens_per_s']:.1f} tok/s" if "ratio" in r else ""),
                      file=sys.stderr, flush=True)
        print(f"\n{header}")
        for kind in args.models:
            print(f"{kind}: {next(r['config'] for r in rows if r['model'] == kind)}, random weights")
        print(f"batch 1, float32, greedy; {args.new_tokens} new tokens after a prompt of L tokens, best of "
              f"{args.repeats}; qkv prefill in chunks of {args.chunk or 'all (one pass)'}\n")
        peer = not args.no_peer
        print("| model | cache length | qkv tokens/s | "
              + ("transformers tokens/s | qkv / transformers | " if peer else "")
              + "qkv prefill | " + ("transformers prefill | check |" if peer else ""))
        print("|---|---:|---:|" + ("---:|---:|" if peer else "") + "---:|" + ("---:|---|" if peer else ""))
        for r in rows:
            cells = [r["model"], f"{r['L']:,}", f"{r['qkv_tokens_per_s']:.1f}"]
            if peer:
                cells += [f"{r['transformers_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x"]
            cells.append(f"{r['qkv_prefill_s']:.2f} s")
            if peer:
                cells += [f"{r['transformers_prefill_s']:.2f} s", r["check"]]
            print("| " + " | ".join(cells) + " |")
    if args.json:
        write_text(args.json, json.dumps({"header": header, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
