"""Tokenisation through the Hugging Face `tokenizers` library, from a model folder's files.

Reads tokenizer.json when the folder has one; otherwise builds a WordPiece tokenizer from
vocab.txt (BERT, Devlin et al. 2019) or a byte-level BPE from vocab.json + merges.txt
(GPT-2, Radford et al. 2019; RoBERTa's, Liu et al. 2019, when the folder's tokenizer_config.json
names RobertaTokenizer or, without a tokenizer class, config.json's model_type is "roberta",
as transformers' AutoTokenizer chooses: <s> ... </s> around each text and its special tokens).
The folder's own padding and truncation settings are switched off: qkv pads each batch to its
longest text and truncates only when asked, so a text that is too long is an error that says
so, not a silent cut.

Every token keeps the index of the word it came from (`word_ids`, None for special tokens),
so views can gather attention from tokens back to words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .checkpoint import ModelError, find_in_folder, read_json
from .fields import Fields


@dataclass(frozen=True)
class Batch:
    """A tokenised batch of N texts padded on the right to length L.

    input_ids: (N, L) int64 token ids (pad id where padded).
    attention_mask: (N, L) bool, True for real tokens.
    word_ids: N lists of L entries: the index of the word each token came from within its
        text, None for special and padding tokens.
    tokens: N lists of the token strings (without padding).
    offsets: N lists of (start, end) character spans of each token in its text (without padding).
    truncated: N bools, True where the text was cut to fit.
    """

    input_ids: Tensor
    attention_mask: Tensor
    word_ids: list[list[Optional[int]]]
    tokens: list[list[str]]
    offsets: list[list[tuple[int, int]]]
    truncated: list[bool]

    @property
    def lengths(self) -> Tensor:
        """(N,) int64 number of real tokens per text."""
        return self.attention_mask.sum(dim=1)


class Tokenizer:
    """A `tokenizers.Tokenizer` with qkv's checks on input and length.

    Args:
        backend: the `tokenizers.Tokenizer`.
        max_length: the longest token sequence the model accepts (its positions), or None.
        pad_id: id used for padding (masked out, so any valid id works).
        source: where it was read from, for messages.
    """

    def __init__(self, backend, *, max_length: Optional[int] = None, pad_id: int = 0, source: str = "tokenizer"):
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.max_length = max_length
        self.pad_id = pad_id
        self.source = source

    @classmethod
    def from_folder(cls, folder: Union[str, Path], *, max_length: Optional[int] = None,
                    pad_id: Optional[int] = None) -> "Tokenizer":
        """Read the tokenizer files of a Hugging Face folder (see the module docstring)."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        path = find_in_folder(folder, "tokenizer.json")
        if path is not None:
            try:
                backend = HFTokenizer.from_file(str(path))
            except Exception as exc:
                raise ModelError(f"{path} could not be read by the tokenizers library ({exc}); "
                                 "download it again") from None
            source = str(path)
        elif find_in_folder(folder, "vocab.txt") is not None:
            from tokenizers.implementations import BertWordPieceTokenizer

            vocab, lowercase = folder / "vocab.txt", True
            cfg_path = folder / "tokenizer_config.json"
            if cfg_path.is_file():
                lowercase = Fields(read_json(cfg_path), cfg_path).get("do_lower_case", bool, True)
            backend = _build(lambda: BertWordPieceTokenizer(str(vocab), lowercase=lowercase)._tokenizer, vocab,
                             "a WordPiece vocabulary (one token per line, UTF-8, with [CLS], [SEP], [UNK])")
            source = str(vocab)
        elif find_in_folder(folder, "vocab.json") and find_in_folder(folder, "merges.txt"):
            from tokenizers.implementations import ByteLevelBPETokenizer

            vocab, merges = folder / "vocab.json", folder / "merges.txt"
            table = read_json(vocab)  # a broken vocab.json is named by the JSON reader
            bad = next((k for k, v in table.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
            if bad is not None:
                raise ModelError(f"{vocab}: entry {bad!r} is {table[bad]!r}; a BPE vocabulary maps each token to a "
                                 f"non-negative integer id; restore the file from the model's source")
            roberta = _roberta_settings(folder)
            prefix_space = roberta.get("add_prefix_space", False) if roberta else False
            backend = _build(lambda: ByteLevelBPETokenizer(str(vocab), str(merges),
                                                           add_prefix_space=prefix_space)._tokenizer, merges,
                             f"the BPE merges of {vocab.name} (UTF-8, one pair of tokens of {vocab.name} per line)")
            if roberta is not None:
                _add_roberta_specials(backend, roberta, vocab)
            source = str(vocab)
        else:
            raise FileNotFoundError(
                f"model folder {str(folder)!r} has no tokenizer: expected tokenizer.json, or vocab.txt (BERT), "
                f"or vocab.json + merges.txt (GPT-2); copy them from the model's source"
            )
        if pad_id is None:
            pad_id = _guess_pad_id(backend)
        return cls(backend, max_length=max_length, pad_id=pad_id, source=source)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def __call__(self, texts: Union[str, Sequence[str]], *, truncate: bool = False,
                 max_length: Optional[int] = None, add_special_tokens: bool = True) -> Batch:
        """Tokenise texts into a padded batch.

        Args:
            texts: one text or a list of N texts (each non-empty).
            truncate: cut texts longer than the limit instead of raising.
            max_length: the limit in tokens, special tokens included (default: the model's).
            add_special_tokens: add [CLS]/[SEP] or the like as the folder's tokenizer prescribes.

        Returns:
            a `Batch` with input_ids and attention_mask of shape (N, L), L the longest text.
        """
        texts = check_texts(texts)
        limit = self.max_length if max_length is None else max_length
        encs = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        too_long = [i for i, e in enumerate(encs) if limit is not None and len(e.ids) > limit]
        truncated = [False] * len(texts)
        if too_long:
            if not truncate:
                i = too_long[0]
                more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
                raise ModelError(
                    f"text {i}{more} has {len(encs[i].ids)} tokens but this model takes at most {limit}; "
                    f"shorten it, or pass truncate=True to keep the first {limit} tokens"
                )
            self.backend.enable_truncation(limit)
            try:
                cut = self.backend.encode_batch([texts[i] for i in too_long], add_special_tokens=add_special_tokens)
            finally:
                self.backend.no_truncation()
            for i, e in zip(too_long, cut):
                encs[i] = e
                truncated[i] = True
        empty = [i for i, e in enumerate(encs) if len(e.ids) == 0]
        if empty:
            raise ModelError(f"text {empty[0]} gives no tokens at all; pass text the tokenizer can represent")
        n, L = len(encs), max(len(e.ids) for e in encs)
        ids = torch.full((n, L), self.pad_id, dtype=torch.int64)  # (N, L)
        mask = torch.zeros(n, L, dtype=torch.bool)  # (N, L)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.int64)
            mask[i, : len(e.ids)] = True
        word_ids = [list(e.word_ids) + [None] * (L - len(e.ids)) for e in encs]
        return Batch(ids, mask, word_ids, [list(e.tokens) for e in encs], [list(e.offsets) for e in encs], truncated)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """One text -> its token ids (no length check, no padding)."""
        return list(self.backend.encode(check_texts(text)[0], add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Token ids (a list or a 1-D tensor) -> text."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence of ids (1-D); got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"


def check_texts(texts, *, what: Optional[str] = None) -> list[str]:
    """Normalise one text or a list of texts, refusing what a tokenizer cannot take, with a clear message.

    The one check of user text in qkv (the tokenizer, the command line and the web service
    call it): TypeError for something that is not a string or a list of strings; ModelError
    (a ValueError) for no texts, an empty or blank text, or a lone surrogate (U+D800..U+DFFF):
    what Python makes of bytes that are not UTF-8 in a command-line argument (U+DC80..U+DCFF,
    "surrogateescape") or of a lone "\\ud800" in JSON. The message names the text and the
    index of the first bad character. `what` names a single text in messages (e.g. "the
    prompt"); texts of a list are "text 0", "text 1", ...
    """
    single = isinstance(texts, str)
    if single:
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{what or 'texts'} must be a string or a list of strings; got {type(texts).__name__}")
    if len(texts) == 0:
        raise ModelError("no texts given; pass at least one non-empty string")
    for i, t in enumerate(texts):
        name = what if (single and what) else f"text {i}"
        if not isinstance(t, str):
            raise TypeError(f"{name} must be a string; got {type(t).__name__}")
        if not t.strip():
            raise ModelError(f"{name} is empty; give some words" if single else
                             f"{name} is empty; pass a non-empty string (or drop it from the list)")
        bad = _LONE_SURROGATE.search(t)
        if bad is not None:
            raise ModelError(f"{name} is not valid Unicode at index {bad.start()}{_context(t, bad.start())}: "
                             f"{_describe_surrogate(bad.group())}{_more(t)}; give text that is valid UTF-8")
    return list(texts)


# RobertaTokenizer's special tokens (transformers 5.24), each a field of tokenizer_config.json
_ROBERTA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                     "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}


def _roberta_settings(folder: Path) -> Optional[dict]:
    """RobertaTokenizer's settings for a vocab.json + merges.txt folder whose tokenizer is
    RoBERTa's, else None (GPT-2's plain byte-level BPE). As AutoTokenizer decides: the
    `tokenizer_class` of tokenizer_config.json, else config.json's `model_type`."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = Fields(read_json(cfg_path), cfg_path) if cfg_path.is_file() else None
    name = cfg.get("tokenizer_class", Optional[str], None) if cfg is not None else None
    if name is None:
        config_path = folder / "config.json"
        if not config_path.is_file():
            return None
        model_type = Fields(read_json(config_path), config_path).get("model_type", Optional[str], None)
        if model_type != "roberta":
            return None
    elif name not in ("RobertaTokenizer", "RobertaTokenizerFast"):
        return None
    out: dict = {"add_prefix_space": False, "trim_offsets": True, **_ROBERTA_SPECIALS}
    if cfg is not None:
        out["add_prefix_space"] = cfg.get("add_prefix_space", bool, False)
        out["trim_offsets"] = cfg.get("trim_offsets", bool, True)
        for field in _ROBERTA_SPECIALS:
            value = cfg.get(field, Union[str, dict], out[field])
            if isinstance(value, dict):  # older files: {"content": "<s>", "lstrip": false, ...}
                value = Fields(value, cfg_path, prefix=f"{field}.").get("content", str)
            out[field] = value
    return out


def _add_roberta_specials(backend, settings: dict, vocab: Path) -> None:
    """Make RoBERTa's special tokens whole tokens of any text and put <s> ... </s> around each
    text (RobertaProcessing), as RobertaTokenizer does."""
    from tokenizers import AddedToken, processors

    tokens = list(dict.fromkeys(settings[f] for f in _ROBERTA_SPECIALS))
    missing = [t for t in tokens if backend.token_to_id(t) is None]
    if missing:
        raise ModelError(f"{vocab} has no {', '.join(missing)}: a RoBERTa vocabulary holds its special tokens "
                         f"{', '.join(tokens)}; restore the file from the model's source")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    sep, cls = settings["sep_token"], settings["cls_token"]
    backend.post_processor = processors.RobertaProcessing(
        (sep, backend.token_to_id(sep)), (cls, backend.token_to_id(cls)),
        trim_offsets=settings["trim_offsets"], add_prefix_space=settings["add_prefix_space"])


def _build(make, path: Path, what: str):
    """Run a `tokenizers` constructor; its errors (which name no file) become a ModelError naming `path`."""
    try:
        return make()
    except Exception as exc:  # tokenizers raises plain Exception (and TypeError for a missing [SEP])
        raise ModelError(f"{path} could not be read as {what} (tokenizers: {exc}); restore the file from the "
                         f"model's source") from None


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _context(text: str, i: int) -> str:
    before = _LONE_SURROGATE.sub("?", text[max(0, i - 12):i])
    return f" (after {before!r})" if before else " (its first character)"


def _describe_surrogate(ch: str) -> str:
    c = ord(ch)
    if 0xDC80 <= c <= 0xDCFF:
        return (f"U+{c:04X} is a lone surrogate, which is how Python keeps the byte 0x{c - 0xDC00:02X} of "
                "input that is not UTF-8")
    return f"U+{c:04X} is a lone surrogate (half of a UTF-16 pair), not a character"


def _more(text: str) -> str:
    n = len(_LONE_SURROGATE.findall(text))
    return f" ({n - 1} more such character{'s' if n > 2 else ''} follow{'' if n > 2 else 's'})" if n > 1 else ""


def _guess_pad_id(backend) -> int:
    padding = backend.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
        tid = backend.token_to_id(token)
        if tid is not None:
            return tid
    return 0
