"""Associative recall: a three-layer GPT-2 learns to look a key up in its context.

A prompt is a list of key-value pairs, then "?" and one of the keys; the model answers with
that key's value, then [EOS]:

    c3 a7 k2 ? a   ->   7

Keys are the letters a-z (distinct within a prompt), values the digits 0-9, 1 to 8 pairs.
The task is the associative-recall probe of Ba et al. 2016 ("Using Fast Weights to Attend to
the Recent Past") and the H3/Zoology line of work (Fu et al. 2023, Arora et al. 2023). A
transformer solves it with an induction circuit (Olsson et al. 2022): an early head copies
each key into the position of its value, and a later head queries with the final key and
finds the value whose copied key matches. Each training prompt asks as many queries as fit
(multi-query recall, Arora et al. 2023), and every step also trains on a copy task (random
tokens, then the same tokens again), which needs the same circuit and gives it a dense
signal: on recall alone, two- and three-layer models sat at chance for thousands of steps.

The model is qkv's own `GPT2LMHeadModel` (so it saves and loads as an ordinary Hugging Face
GPT-2 folder), trained through `qkv.attention` and its backward pass.
"""

from __future__ import annotations

import string
from dataclasses import asdict
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import gpt2
from ..models.gpt2 import GPT2Config, GPT2LMHeadModel
from ._loop import Size, export_weights, save_folder, train_task

KEYS = string.ascii_lowercase  # 26 keys
VALUES = string.digits  # 10 values
SPECIALS = ["[PAD]", "[UNK]", "[EOS]", "?"]
MAX_PAIRS = 8  # the longest prompt trained on: 8 pairs, "?", the key = 18 tokens
EVAL_SEED = 1_000_000_007  # held-out samples come from this stream, never from a training step's
# The head that does the lookup in the shipped model (found by `find_lookup_head`, checked by
# tests/models/test_trained.py): from the final key, its strongest weight lands on the value
# after the matching key.
LOOKUP_HEAD = (1, 0)
GENERATION = {"max_new_tokens": 1}  # generation_config.json of the saved folder
# "shipped": the bundled weights (qkv.load("recall")); "tiny": the test suite's run of the same code
SIZES = {"shipped": Size(width=64, layers=3, heads=4, ffn=256, steps=6000, batch=64, lr=2e-3),
         "tiny": Size(width=32, layers=2, heads=2, ffn=64, steps=40, batch=16, lr=5e-3)}


def vocabulary() -> dict[str, int]:
    tokens = SPECIALS + list(KEYS) + list(VALUES)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer():
    """One token per character (keys, values, "?"), whitespace ignored; unknown -> [UNK]."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex("."), "isolated")])
    for t in SPECIALS[:3]:
        tok.add_special_tokens([t])
    return tok


def model_config(size: Size = SIZES["shipped"]) -> GPT2Config:
    V = vocabulary()
    return GPT2Config(
        vocab_size=len(V), n_positions=2 * MAX_PAIRS + 4, n_embd=size.width, n_layer=size.layers, n_head=size.heads,
        n_inner=size.ffn, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=V["[EOS]"], tie_word_embeddings=True,
    )


def sample(n_pairs: int, batch: int, generator: torch.Generator, queries: int = 1) -> Tensor:
    """(batch, 2 n + 1 + 2 q) ids: n pairs with distinct keys, "?", then q queries, each a key of
    the prompt followed by its value."""
    V = vocabulary()
    key0, val0, q = V["a"], V["0"], V["?"]
    keys = torch.argsort(torch.rand(batch, len(KEYS), generator=generator), dim=1)[:, :n_pairs] + key0  # (B, n)
    vals = torch.randint(0, len(VALUES), (batch, n_pairs), generator=generator) + val0  # (B, n)
    which = torch.randint(0, n_pairs, (batch, queries), generator=generator)  # (B, q)
    seq = torch.stack([keys, vals], dim=2).reshape(batch, 2 * n_pairs)  # (B, 2n) k v k v ...
    asked = torch.stack([keys.gather(1, which), vals.gather(1, which)], dim=2).reshape(batch, 2 * queries)  # (B, 2q)
    return torch.cat([seq, torch.full((batch, 1), q), asked], dim=1)


def copy_batch(batch: int, generator: torch.Generator) -> tuple[Tensor, int]:
    """(batch, 2 r) ids: r distinct random tokens (letters and digits), then the same r again."""
    r = int(torch.randint(3, MAX_PAIRS + 2, (1,), generator=generator))
    x = torch.argsort(torch.rand(batch, len(KEYS) + len(VALUES), generator=generator), dim=1)[:, :r] + len(SPECIALS)
    return torch.cat([x, x], dim=1), r


def copy_loss(model: GPT2LMHeadModel, ids: Tensor, r: int) -> Tensor:
    """Cross-entropy of the second copy, each token predicted from its twin in the first."""
    logits = model(ids)  # (B, 2r, V)
    return F.cross_entropy(logits[:, r:-1].flatten(0, 1), ids[:, r + 1:].flatten())


def batch_loss(model: GPT2LMHeadModel, ids: Tensor, n_pairs: int) -> tuple[Tensor, float]:
    """Cross-entropy of every answer (after each query key) and of [EOS] after the last answer.

    Several queries per prompt give several answers to learn from per forward pass (as in
    multi-query associative recall, Arora et al. 2023); the first query alone is exactly the
    prompt a user writes.
    """
    eos = model.config.eos_token_id
    logits = model(ids)  # (B, L, V)
    start = 2 * n_pairs + 1  # first query key
    answer_logits = logits[:, start::2]  # (B, q, V) at each query key
    answers = ids[:, start + 1::2]  # (B, q)
    loss = F.cross_entropy(answer_logits.flatten(0, 1), answers.flatten()) + 0.2 * F.cross_entropy(
        logits[:, -1], torch.full_like(ids[:, -1], eos))
    acc = (answer_logits[:, 0].argmax(-1) == answers[:, 0]).float().mean().item()
    return loss, acc


def step_loss(model: GPT2LMHeadModel, g: torch.Generator, batch: int) -> tuple[Tensor, float]:
    """The loss of one training step (its batches drawn from `g`): recall, plus the copy task."""
    n = int(torch.randint(1, MAX_PAIRS + 1, (1,), generator=g))
    q = MAX_PAIRS - n + 1  # as many queries as fit the positions: every prompt has 2 * 8 + 3 tokens
    loss, acc = batch_loss(model, sample(n, batch, g, q), n)
    # The copy task asks for the same circuit (find the earlier twin, read the token after it)
    # with a dense signal; recall alone sits on a long plateau before the circuit forms.
    return loss + copy_loss(model, *copy_batch(batch, g)), acc


def train(out: Union[str, Path], **options) -> GPT2LMHeadModel:
    """Train the recall model and save it to `out` as a Hugging Face GPT-2 folder, resuming
    from out/checkpoint.safetensors: `size` ("shipped", "tiny" or a `Size`), `seed`, `steps`,
    `batch`, `lr`, `progress`, `stop_after`, `checkpoint_every`, `history` as
    `qkv.train._loop.train_task` says. Returns the model (eval mode)."""
    return train_task("recall", out, SIZES, lambda size: GPT2LMHeadModel(model_config(size)), step_loss, save,
                      **options)


def save(model: GPT2LMHeadModel, out: Path) -> None:
    """Write the recall model as a Hugging Face GPT-2 folder `out` (see `_loop.save_folder`)."""
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **asdict(model.config),
              "qkv_task": "recall", "qkv_lookup_head": list(LOOKUP_HEAD)}
    weights = export_weights(model, gpt2.hf_plan(model.config))
    # The answer is one token. Training prompts ask as many queries as fit, so after an answer
    # the model expects the next query, not [EOS]: generation defaults to one new token.
    save_folder(Path(out), config, weights, build_tokenizer(), task="recall",
                extra={"generation_config.json": GENERATION})


def prompt_text(ids: Tensor) -> str:
    """Ids of a prompt (pairs, "?", key) -> its text, e.g. "c3 a7 k2 ? a"."""
    inv = {i: t for t, i in vocabulary().items()}
    toks = [inv[i] for i in ids.tolist()]
    pairs = [toks[i] + toks[i + 1] for i in range(0, len(toks) - 2, 2)]
    return " ".join(pairs + toks[-2:])


def held_out(count: int, *, seed: int = EVAL_SEED) -> list[Tensor]:
    """`count` fresh samples per pair count 1..8, as (count, 2n + 3) id tensors, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return [sample(n, count, g) for n in range(1, MAX_PAIRS + 1)]


@torch.no_grad()
def accuracy(model: GPT2LMHeadModel, batches: list[Tensor]) -> float:
    """Fraction of prompts whose greedy answer is the right value."""
    right = total = 0
    for ids in batches:
        logits = model(ids[:, :-1])[:, -1]  # (B, V) at the query key
        right += int((logits.argmax(-1) == ids[:, -1]).sum())
        total += ids.shape[0]
    return right / total


METRIC = "answer accuracy"


def evaluate(model: GPT2LMHeadModel, count: int = 500) -> float:
    """Held-out accuracy on `count` fresh prompts per pair count 1..8 (fixed seed)."""
    return accuracy(model, held_out(count))


@torch.no_grad()
def lookup_hits(model: GPT2LMHeadModel, batches: list[Tensor]) -> Tensor:
    """(layers, heads) fraction of prompts where the head's strongest weight from the final key
    lands on the matching key or on the value right after it (the Recorder's recomputed weights)."""
    from ..inspect.capture import Recorder

    hits, total = None, 0
    for ids in batches:
        prompt = ids[:, :-1]  # (B, 2n + 2)
        L = prompt.shape[1]
        rec = Recorder(rows=[L - 1], with_values=False).attach(model)
        try:
            model(prompt)
        finally:
            rec.detach()
        w = torch.stack([r.weights()[:, :, 0] for r in rec.records], dim=1)  # (B, layers, heads, L)
        top = w.argmax(-1)  # (B, layers, heads)
        query_key = prompt[:, -1:]  # (B, 1)
        key_pos = (prompt[:, :-2:2] == query_key).float().argmax(-1) * 2  # (B,) position of the matching key
        ok = (top == key_pos[:, None, None]) | (top == key_pos[:, None, None] + 1)
        hits = ok.sum(0) if hits is None else hits + ok.sum(0)
        total += ids.shape[0]
    return hits.float() / total
