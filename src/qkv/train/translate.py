"""Translation with reordering: a small encoder-decoder learns an invented language, "Qish".

English-like source, subject-verb-object, adjectives before the noun:

    the big red cat sees a small dog

Qish, subject-object-verb, each noun phrase mirrored (noun, adjectives in reverse, article):

    miro dulo raka ke vasku semi na tolven

Every English word has one Qish word, so each target word has one source word to look at,
and the cross-attention of the decoder (queries from the target, keys and values from the
encoder's output of the source) draws the alignment: a diagonal inside each noun phrase
turned around, and the verb moved from the middle to the end.

Held-out sentences are a fixed tenth of all sentences (by a CRC of the text), never drawn
for training; accuracy is exact match of the greedy translation.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import seq2seq
from ..models.seq2seq import QkvSeq2Seq, Seq2SeqConfig
from ._loop import Size, export_weights, save_folder, train_task

ARTICLES = {"the": "ke", "a": "na"}
NOUNS = {"cat": "miro", "dog": "vasku", "bird": "pelli", "fish": "tunna", "mouse": "skiv", "horse": "dravo",
         "fox": "lunet", "bear": "orsk", "frog": "kvak", "owl": "hubo", "wolf": "varg", "duck": "anat"}
ADJECTIVES = {"red": "dulo", "big": "raka", "small": "semi", "old": "vetu", "young": "nova", "blue": "sini",
              "happy": "joli", "quiet": "tisa", "fast": "bistr", "black": "kuro"}
VERBS = {"sees": "tolven", "chases": "jagar", "likes": "amur", "follows": "sekva", "bites": "mordi",
         "finds": "trova", "hears": "oru", "helps": "juva"}
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
MAX_ADJECTIVES = 2
MAX_SOURCE = 2 * (2 + MAX_ADJECTIVES) + 1  # 9 words
HELD_OUT_EVERY = 10  # sentences with crc32 % 10 == 0 are never trained on
LEXICON = {**ARTICLES, **NOUNS, **ADJECTIVES, **VERBS}
# "shipped": the bundled weights (qkv.load("translate")); "tiny": the test suite's run of the same code
SIZES = {"shipped": Size(width=64, layers=2, heads=4, ffn=256, steps=1500, batch=64, lr=2e-3),
         "tiny": Size(width=32, layers=1, heads=2, ffn=64, steps=40, batch=16, lr=5e-3)}


def vocabulary() -> dict[str, int]:
    words = SPECIALS + list(LEXICON) + list(LEXICON.values())
    return {w: i for i, w in enumerate(words)}


def build_tokenizer():
    """Word level, whitespace split, lowercase; unknown words -> [UNK]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(SPECIALS)
    return tok


def model_config(size: Size = SIZES["shipped"]) -> Seq2SeqConfig:
    V = vocabulary()
    return Seq2SeqConfig(vocab_size=len(V), d_model=size.width, encoder_layers=size.layers,
                         decoder_layers=size.layers, attention_heads=size.heads, ffn_dim=size.ffn,
                         max_position_embeddings=MAX_SOURCE, max_target_positions=MAX_SOURCE + 2, dropout=0.0,
                         pad_token_id=V["[PAD]"], bos_token_id=V["[BOS]"], eos_token_id=V["[EOS]"])


def translate_words(source: list[str]) -> list[str]:
    """The reference translation of a grammatical source sentence (a list of words)."""
    v = [i for i, w in enumerate(source) if w in VERBS]
    if len(v) != 1:
        raise ValueError(f"not a sentence of the grammar: {' '.join(source)!r}")
    subj, verb, obj = source[:v[0]], source[v[0]], source[v[0] + 1:]

    def phrase(np: list[str]) -> list[str]:
        # article adjectives... noun -> noun, adjectives reversed, article
        return [LEXICON[w] for w in reversed(np)]

    return phrase(subj) + phrase(obj) + [VERBS[verb]]


def is_held_out(sentence: str) -> bool:
    return zlib.crc32(sentence.encode()) % HELD_OUT_EVERY == 0


def _phrase(g: torch.Generator) -> list[str]:
    arts, adjs, nouns = list(ARTICLES), list(ADJECTIVES), list(NOUNS)
    k = int(torch.randint(0, MAX_ADJECTIVES + 1, (1,), generator=g))
    chosen = [adjs[i] for i in torch.randperm(len(adjs), generator=g)[:k].tolist()]
    first = arts[int(torch.randint(0, 2, (1,), generator=g))]
    last = nouns[int(torch.randint(0, len(nouns), (1,), generator=g))]
    return [first] + chosen + [last]


def sentences(count: int, g: torch.Generator, *, held_out: bool) -> list[str]:
    """`count` random sentences from the training part (held_out=False) or the held-out tenth."""
    out = []
    verbs = list(VERBS)
    while len(out) < count:
        s = " ".join(_phrase(g) + [verbs[int(torch.randint(0, len(verbs), (1,), generator=g))]] + _phrase(g))
        if is_held_out(s) == held_out:
            out.append(s)
    return out


def encode_pairs(texts: list[str]):
    """-> source ids (B, Ls), source mask (B, Ls), decoder inputs (B, Lt) and targets (B, Lt) (-100 = padding)."""
    V = vocabulary()
    src = [[V[w] for w in t.split()] for t in texts]
    tgt = [[V[w] for w in translate_words(t.split())] for t in texts]
    B, Ls, Lt = len(texts), max(map(len, src)), max(map(len, tgt)) + 1
    src_ids = torch.full((B, Ls), V["[PAD]"], dtype=torch.int64)
    src_mask = torch.zeros(B, Ls, dtype=torch.bool)
    dec_in = torch.full((B, Lt), V["[PAD]"], dtype=torch.int64)
    target = torch.full((B, Lt), -100, dtype=torch.int64)
    for i, (s, t) in enumerate(zip(src, tgt)):
        src_ids[i, :len(s)] = torch.tensor(s)
        src_mask[i, :len(s)] = True
        dec_in[i, :len(t) + 1] = torch.tensor([V["[BOS]"]] + t)
        target[i, :len(t) + 1] = torch.tensor(t + [V["[EOS]"]])
    return src_ids, src_mask, dec_in, target


def step_loss(model: QkvSeq2Seq, g: torch.Generator, batch: int) -> tuple[Tensor, float]:
    """The loss of one training step on `batch` training sentences drawn from `g`, and its exact match."""
    src, mask, dec_in, target = encode_pairs(sentences(batch, g, held_out=False))
    logits = model(src, dec_in, attention_mask=mask)  # (B, Lt, V)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    ok = ((logits.argmax(-1) == target) | (target == -100)).all(dim=1)  # (B,)
    return loss, ok.float().mean().item()


def train(out: Union[str, Path], **options) -> QkvSeq2Seq:
    """Train the translation model and save it to `out` (options as `qkv.train.recall.train`)."""
    return train_task("translate", out, SIZES, lambda size: QkvSeq2Seq(model_config(size)), step_loss, save,
                      **options)


def save(model: QkvSeq2Seq, out: Path) -> None:
    """Write the translation model as a Hugging Face-style folder `out` (see `_loop.save_folder`)."""
    config = {**model.config.to_hf(), "qkv_task": "translate"}
    save_folder(Path(out), config, export_weights(model, seq2seq.hf_plan(model.config)), build_tokenizer(),
                task="translate")


def held_out(count: int = 1000, *, seed: int = 1_000_000_007) -> list[str]:
    """`count` held-out sentences (never trained on), from a fixed seed."""
    return sentences(count, torch.Generator().manual_seed(seed), held_out=True)


@torch.no_grad()
def exact_match(model: QkvSeq2Seq, texts: list[str]) -> float:
    """Fraction of sentences whose greedy translation equals the reference word for word."""
    inv = {i: w for w, i in vocabulary().items()}
    src, mask, _, _ = encode_pairs(texts)
    out = model.generate(src, attention_mask=mask)
    right = 0
    for text, row in zip(texts, out.tolist()):
        words = []
        for i in row[1:]:
            if i == model.config.eos_token_id:
                break
            words.append(inv[i])
        right += words == translate_words(text.split())
    return right / len(texts)


METRIC = "exact match"


def evaluate(model: QkvSeq2Seq, count: int = 1000) -> float:
    return exact_match(model, held_out(count))
