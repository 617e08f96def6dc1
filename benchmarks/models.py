"""Benchmark of qkv's models against Hugging Face transformers, measured in the same run.

1. Sentence embeddings with the bundled all-MiniLM-L6-v2: 64 sentences of about 40 tokens
   (28 to 44 words), text in, normalised (64, 384) embeddings out. transformers: its fast
   tokenizer, BertModel with attn_implementation="sdpa" on one padded batch of 64, mean
   pooling and L2 normalisation (what sentence-transformers computes for this folder).
   qkv: `model.encode(texts)` with its default batching (sorted by length, batches of 32,
   as sentence-transformers does), and again with one padded batch of 64.
2. GPT-2-style greedy decoding with the KV cache on one tiny random GPT-2 (saved once by
   transformers, loaded by both): tokens per second of qkv's `generate` vs transformers'
   `generate(do_sample=False)`, same prompt, same number of new tokens (checked identical).
3. A Mistral-shaped model with a sliding window (`--tasks mistral`): Mistral 7B's attention
   (32 query and 8 key/value heads of 128, hidden 4096, window 4096, RoPE theta 1e6) in a few
   layers with a small MLP and vocabulary, random weights saved by transformers and loaded by
   both. Per prompt length (1k, 8k; 32k with --lengths): the prompt is prefilled in chunks of
   2048 on both sides (qkv's `prefill_chunks` into its window cache; transformers'
   MistralForCausalLM into `DynamicCache(config)`, whose sliding layers keep sliding_window - 1
   tokens, one forward per chunk, `logits_to_keep=1`), the two sides chunk by chunk in turns,
   timed once; then `--new-tokens` greedy steps. The first decode run of each side is the
   check: its tokens (the prefill's argmax and the steps') must be identical before any decode
   run is timed; then `--repeats` timed runs per side in turns, each from the prefilled cache
   (qkv: `crop` back; transformers: a copy of the cache), best kept. KV-cache bytes at the end:
   qkv's window cache, the full cache qkv would allocate for the same tokens
   (`new_cache(..., windowed=False)`), and transformers' cache. Prefill and decode tokens/s
   ratios are qkv / transformers (> 1: qkv is faster).

Times are best-of-N wall clock (qkv.bench.timing: a warm-up call each, then N samples with the two
sides in turns); ratio = transformers time / qkv time (> 1: qkv is faster).
Prints a table and writes JSON.

    python benchmarks/models.py --tasks embeddings gpt2   # the first table in docs/benchmarks.md
    python benchmarks/models.py --repeats 3 --new-tokens 32
    python benchmarks/models.py --tasks mistral --lengths 1024 8192 32768   # the Mistral table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import qkv  # noqa: E402
from qkv._files import write_text  # noqa: E402
from qkv.bench.timing import best_times, clock  # noqa: E402
from qkv.models import bundled_path  # noqa: E402
from qkv.models.generation import prefill_chunks  # noqa: E402

WORDS = ("the model reads every word of a sentence and weighs it against each other word so that "
         "attention heads can follow meaning across long distances in text").split()


def sentences(n: int, words: int, seed: int = 0) -> list[str]:
    """n sentences of words-8 .. words+8 words (so a batch needs padding), mean about `words`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        count = words + int(torch.randint(-8, 9, (1,), generator=g))
        idx = torch.randint(len(WORDS), (count,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return out


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's), as `qkv bench` reports it."""
    from qkv.bench.report import machine_info

    return machine_info()["cpu"]


def bench_embeddings(args) -> dict:
    from transformers import AutoTokenizer, BertModel

    folder = bundled_path("minilm")
    texts = sentences(64, args.words)
    ours = qkv.load("minilm")
    tok = AutoTokenizer.from_pretrained(str(folder))
    ref = BertModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    n_tokens = ours.tokenizer(texts).lengths.float().mean().item()

    def hf_encode():
        with torch.inference_mode():
            enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = ref(**enc).last_hidden_state  # (N, L, E)
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
            emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(emb, dim=1)

    def qkv_encode():  # qkv's default: sorted by length, batches of 32
        return ours.encode(texts)

    def qkv_encode_64():  # one padded batch of 64, as the transformers side
        return ours.encode(texts, batch_size=64)

    cos = torch.nn.functional.cosine_similarity(qkv_encode(), hf_encode(), dim=1).min().item()
    t_hf, t_qkv = best_times({"hf": hf_encode, "qkv": qkv_encode}, repeats=args.repeats).values()
    t_hf64, t_qkv64 = best_times({"hf": hf_encode, "qkv": qkv_encode_64}, repeats=args.repeats).values()
    task = f"MiniLM embeddings, 64 sentences x {n_tokens:.0f} tokens (mean)"
    return [{"task": task + ", qkv encode() default batching", "unit": "sentences/s",
             "transformers": 64 / t_hf, "qkv": 64 / t_qkv, "ratio": t_hf / t_qkv, "check": f"min cosine {cos:.6f}"},
            {"task": task + ", both one batch of 64", "unit": "sentences/s",
             "transformers": 64 / t_hf64, "qkv": 64 / t_qkv64, "ratio": t_hf64 / t_qkv64, "check": ""}]


def bench_decode(args) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=512, n_embd=args.embd, n_layer=args.layers, n_head=args.heads,
                     bos_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        ours = qkv.load(tmp)
    prompt = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    T = args.new_tokens

    def hf_generate():
        with torch.inference_mode():
            return ref.generate(prompt, attention_mask=mask, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                                pad_token_id=0)

    def qkv_generate():
        return ours.generate(prompt, max_new_tokens=T)

    same = torch.equal(hf_generate(), qkv_generate())
    t_hf, t_qkv = best_times({"hf": hf_generate, "qkv": qkv_generate}, repeats=args.repeats).values()
    return {"task": f"GPT-2 greedy decoding, {args.layers} layers x {args.embd} wide, prompt {args.prompt}, "
                    f"{T} new tokens, batch 1",
            "unit": "tokens/s", "transformers": T / t_hf, "qkv": T / t_qkv, "ratio": t_hf / t_qkv,
            "check": "identical tokens" if same else "TOKENS DIFFER"}


def mistral_models(args):
    """(transformers MistralForCausalLM, the qkv model loaded from its folder, a description)."""
    from transformers import MistralConfig, MistralForCausalLM

    heads, kv_heads, head_dim = 32, 8, 128  # Mistral 7B's attention
    cfg = MistralConfig(vocab_size=args.mistral_vocab, hidden_size=args.mistral_hidden,
                        intermediate_size=args.mistral_ffn, num_hidden_layers=args.mistral_layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=max(args.lengths) + args.new_tokens + 8,
                        sliding_window=args.window, rope_theta=1e6, bos_token_id=0, eos_token_id=None,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    ref = MistralForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        ours = qkv.load(tmp)
    desc = (f"Mistral-shaped: {args.mistral_layers} layers x {args.mistral_hidden}, {heads} q / {kv_heads} kv heads "
            f"(D={head_dim}), sliding window {args.window}, SwiGLU {args.mistral_ffn}, vocab {args.mistral_vocab}, "
            "random weights")
    return ref, ours, desc


class QkvMistral:
    """qkv: chunked prefill into its KV cache (windowed layers keep what the window reaches)."""

    name = "qkv"

    def __init__(self, model, chunk: int):
        self.model, self.chunk = model, chunk

    def prefill(self, prompt, capacity):
        """Yields after each chunk; the last yield is the next token (1,)."""
        self.cache = self.model.new_cache(prompt.shape[0], capacity=capacity)  # as generate allocates it
        self.length = prompt.shape[1]
        for h in prefill_chunks(self.model, prompt, self.chunk, cache=self.cache):
            yield self.model.logits(h[:, -1]).argmax(-1)  # (1,); only the last chunk's states are kept

    def step(self, ids):
        return self.model.logits(self.model.hidden(ids[:, None], cache=self.cache)[:, -1]).argmax(-1)  # (1,)

    def reset(self):
        self.cache.crop(self.length)

    def cache_bytes(self) -> int:
        return self.cache.nbytes


class HfMistral:
    """transformers: its chunked prefill into DynamicCache(config) (sliding layers keep
    sliding_window - 1 tokens), one forward per chunk, then one position per token."""

    name = "transformers"

    def __init__(self, model, chunk: int):
        self.model, self.chunk = model, chunk

    def prefill(self, prompt, capacity):
        """Yields after each chunk; the last yield is the next token (1,)."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        for s in range(0, prompt.shape[1], self.chunk):
            out = self.model(prompt[:, s:s + self.chunk], cache=self.cache, use_cache=True, logits_to_keep=1)
            if s + self.chunk >= prompt.shape[1]:
                self.snapshot = copy.deepcopy(self.cache)  # a sliding layer past its window cannot be cropped back
            yield out.logits[:, -1].argmax(-1)  # (1,)

    def step(self, ids):
        return self.model(ids[:, None], cache=self.cache, use_cache=True).logits[:, -1].argmax(-1)  # (1,)

    def reset(self):
        self.cache = copy.deepcopy(self.snapshot)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers
                   for t in (layer.keys, layer.values) if t is not None)


def _decode(side, first, n: int) -> list[int]:
    ids, out = first, []
    for _ in range(n):
        ids = side.step(ids)  # (1,)
        out.append(int(ids))
    return out


def bench_mistral(args) -> list[dict]:
    ref, ours, desc = mistral_models(args)
    print(f"  {desc}", file=sys.stderr, flush=True)
    sides = [QkvMistral(ours, args.chunk), HfMistral(ref, args.chunk)]
    T, rows = args.new_tokens, []
    with torch.inference_mode():
        warm = torch.randint(1, args.mistral_vocab, (1, 64), generator=torch.Generator().manual_seed(0))
        for side in sides:  # load kernels and allocators before the first timed prefill
            _decode(side, list(side.prefill(warm, 64 + 2))[-1], 2)
        for L in args.lengths:
            prompt = torch.randint(1, args.mistral_vocab, (1, L), generator=torch.Generator().manual_seed(L))
            row = {"task": "mistral", "config": desc, "L": L, "new_tokens": T, "prefill_chunk": args.chunk,
                   "load_start": os.getloadavg()[0]}
            # Prefill chunk by chunk, the sides in turns, so a burst of load from elsewhere hits both alike.
            runs = {side.name: side.prefill(prompt, L + T) for side in sides}
            for side in sides:
                row[f"{side.name}_prefill_s"] = 0.0
            for _ in range(0, L, args.chunk):
                for side in sides:
                    t0 = clock()
                    side.first = next(runs[side.name])
                    row[f"{side.name}_prefill_s"] += clock() - t0
            tokens = {}
            for side in sides:
                tokens[side.name] = [int(side.first)] + _decode(side, side.first, T)  # the check, untimed
                side.reset()
                print(f"  L={L} {side.name}: prefill {row[f'{side.name}_prefill_s']:.1f} s", file=sys.stderr,
                      flush=True)
            same = tokens["qkv"] == tokens["transformers"]
            row["check"] = "identical tokens" if same else (
                f"TOKENS DIFFER: {sum(a == b for a, b in zip(tokens['qkv'], tokens['transformers']))}/{T + 1} equal")
            best = {side.name: float("inf") for side in sides}
            if same:  # timed decode runs only once the tokens agree
                for _ in range(args.repeats):
                    for side in sides:
                        t0 = clock()
                        _decode(side, side.first, T)
                        best[side.name] = min(best[side.name], clock() - t0)
                        row[f"{side.name}_cache_bytes"] = side.cache_bytes()  # at L + T tokens
                        side.reset()
            for side in sides:
                row[f"{side.name}_prefill_tokens_per_s"] = L / row[f"{side.name}_prefill_s"]
                row[f"{side.name}_decode_tokens_per_s"] = T / best[side.name]
            row["full_cache_bytes"] = ours.new_cache(1, capacity=L + T, windowed=False).nbytes  # a full cache
            row["load_end"] = os.getloadavg()[0]
            rows.append(row)
            print(f"  L={L}: {row['check']}", file=sys.stderr, flush=True)
    return rows


def print_mistral(rows: list[dict], args) -> None:
    print(f"{rows[0]['config']}\nbatch 1, float32, greedy; prefill in chunks of {args.chunk} on both sides; "
          f"{args.new_tokens} new tokens, decode best of {args.repeats}")
    print("| prompt tokens | qkv prefill tok/s | transformers prefill tok/s | ratio | qkv decode tok/s "
          "| transformers decode tok/s | ratio | check |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['L']:,} | {r['qkv_prefill_tokens_per_s']:.1f} | {r['transformers_prefill_tokens_per_s']:.1f} "
              f"| {r['qkv_prefill_tokens_per_s'] / r['transformers_prefill_tokens_per_s']:.2f}x "
              f"| {r['qkv_decode_tokens_per_s']:.2f} | {r['transformers_decode_tokens_per_s']:.2f} "
              f"| {r['qkv_decode_tokens_per_s'] / r['transformers_decode_tokens_per_s']:.2f}x | {r['check']} |")
    print("\nKV-cache memory after prompt + new tokens (allocated bytes, all layers)")
    print("| tokens | qkv window cache | qkv full cache | full / window | transformers cache |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        if "qkv_cache_bytes" not in r:
            continue
        w, f = r["qkv_cache_bytes"], r["full_cache_bytes"]
        print(f"| {r['L'] + r['new_tokens']:,} | {w:,} ({w / 2**20:.1f} MiB) | {f:,} ({f / 2**20:.1f} MiB) "
              f"| {f / w:.2f}x | {r['transformers_cache_bytes']:,} ({r['transformers_cache_bytes'] / 2**20:.1f} MiB) |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    p.add_argument("--words", type=int, default=36, help="words per sentence (about 40 tokens with [CLS]/[SEP])")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tasks", nargs="+", choices=["embeddings", "gpt2", "mistral"],
                   default=["embeddings", "gpt2", "mistral"], help="what to run (default: all)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192],
                   help="Mistral prompt lengths (default 1024 8192; the docs' table adds 32768)")
    p.add_argument("--window", type=int, default=4096, help="Mistral sliding_window")
    p.add_argument("--chunk", type=int, default=2048, help="Mistral prefill chunk, both sides")
    p.add_argument("--mistral-layers", type=int, default=2)
    p.add_argument("--mistral-hidden", type=int, default=4096, help="hidden size (Mistral 7B: 4096 = 32 x 128)")
    p.add_argument("--mistral-ffn", type=int, default=1024, help="SwiGLU inner size (Mistral 7B: 14336)")
    p.add_argument("--mistral-vocab", type=int, default=1000)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    if "embeddings" in args.tasks:
        rows += bench_embeddings(args)
    if "gpt2" in args.tasks:
        rows.append(bench_decode(args))
    mistral = bench_mistral(args) if "mistral" in args.tasks else []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, best of {args.repeats}")
    if rows:
        print("| task | unit | transformers | qkv | qkv / transformers | check |")
        print("|---|---|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['task']} | {r['unit']} | {r['transformers']:.1f} | {r['qkv']:.1f} | {r['ratio']:.2f}x "
                  f"| {r['check']} |")
    if mistral:
        print(f"load average {mistral[0]['load_start']:.2f} at the start, {mistral[-1]['load_end']:.2f} at the end")
        print_mistral(mistral, args)
    rows += mistral
    if args.json:
        write_text(args.json, json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                          "argv": sys.argv[1:], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
