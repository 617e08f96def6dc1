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

Times are best-of-N wall clock (qkv.bench.timing: a warm-up call each, then N samples with the two
sides in turns); ratio = transformers time / qkv time (> 1: qkv is faster).
Prints a table and writes JSON.

    python benchmarks/models.py                      # the table in docs/benchmarks.md
    python benchmarks/models.py --repeats 3 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import qkv  # noqa: E402
from qkv._files import write_text  # noqa: E402
from qkv.bench.timing import best_times  # noqa: E402
from qkv.models import bundled_path  # noqa: E402

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
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [*bench_embeddings(args), bench_decode(args)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, "
          f"best of {args.repeats}")
    print("| task | unit | transformers | qkv | qkv / transformers | check |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['task']} | {r['unit']} | {r['transformers']:.1f} | {r['qkv']:.1f} | {r['ratio']:.2f}x "
              f"| {r['check']} |")
    if args.json:
        write_text(args.json, json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                          "argv": sys.argv[1:], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
