"""The proof every decoder family gives (issue 17): a qkv model loaded from a folder that
transformers saved, against that transformers model (`ref`), on inputs that reach what the family
adds. Each family's test module calls these on its own tiny random checkpoints:

- `check_left_padded_logits`: logits within 1e-4 (float32) on a left-padded batch, real
  positions compared (padding masked, positions counting every slot, as transformers does
  without position_ids);
- `check_greedy`: 20 greedy tokens identical for a short prompt, for a left-padded batch of two
  prompts, and for a prompt longer than one prefill chunk (and longer than the sliding window,
  where there is one);
- `check_tokenizer`: the folder's tokenizer gives transformers' ids;
- `check_step_logits` (families whose RoPE depends on the length reached): greedy tokens and
  each step's logits as transformers', the prompt fed in chunks.

`hf_greedy` and `generate_with_logits` give transformers' and qkv's tokens with step logits. The
encoders with heads (BERT, RoBERTa, DistilBERT) share `TEXTS`, `LABELS`, `padded_texts`,
`masked_err`, `check_labels` and `check_fill_mask`.
"""

from __future__ import annotations

from typing import Optional

import torch

TOLERANCE = 1e-4  # float32 logits against transformers (issue 17)
# the encoders' batch (different lengths, so it is padded) and their classifiers' labels
TEXTS = ["the cat sat on the mat .", "a dog ran", "attention is all you need , queries keys and values",
         "the quick brown fox jumps over the lazy dog"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def random_ids(B: int, L: int, vocab: int, seed: int) -> torch.Tensor:
    """(B, L) ids in [4, vocab): clear of the word tokenizer's <unk> <pad> <s> </s>."""
    return torch.randint(4, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths: list[int], vocab: int, seed: int, pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, L) left-padded with pad_id, mask (B, L) int64 (0 = padding)."""
    L = max(lengths)
    ids = random_ids(len(lengths), L, vocab, seed)
    mask = torch.zeros(len(lengths), L, dtype=torch.int64)
    for b, n in enumerate(lengths):
        mask[b, L - n:] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def check_left_padded_logits(model, ref, vocab: int, lengths=(13, 9, 5), seed: int = 1) -> float:
    """qkv's logits on a left-padded batch within TOLERANCE of transformers' at real tokens; returns the error."""
    ids, mask = left_padded(list(lengths), vocab, seed)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    err = (got[real] - want[real]).abs().max().item()
    assert err < TOLERANCE, f"max |logits - transformers| = {err:.2e} on a left-padded batch"
    return err


def hf_greedy(ref, ids: torch.Tensor, mask: Optional[torch.Tensor] = None, new: int = 20):
    """transformers' `new` greedy tokens after ids (B, L) (mask (B, L): 0 = padding; None: no
    padding): `.sequences` (B, L + new) and each step's `.logits`."""
    with torch.no_grad():
        return ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                            max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=1,
                            eos_token_id=None, output_logits=True, return_dict_in_generate=True)


def generate_with_logits(model, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """model.generate's tokens and the logits of each step (B, T, V), seen through `model.logits`."""
    seen = []
    logits = model.logits
    model.logits = lambda h: seen.append(logits(h)) or seen[-1]
    try:
        return model.generate(ids, **kwargs), torch.stack(seen, dim=1)
    finally:
        del model.logits


def check_step_logits(model, ref, ids: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                      prefill_chunk: int = 4, new: int = 20) -> None:
    """`new` greedy tokens after ids (B, L) (mask: 0 = padding), the prompt fed to qkv in chunks of
    `prefill_chunk`: transformers' tokens, and each step's logits within TOLERANCE of transformers'."""
    want = hf_greedy(ref, ids, mask, new)
    padding = {} if mask is None else {"attention_mask": mask.bool()}
    got, logits = generate_with_logits(model, ids, max_new_tokens=new, prefill_chunk=prefill_chunk,
                                       eos_token_id=None, **padding)
    assert torch.equal(got, want.sequences), \
        f"qkv {got[:, -new:].tolist()} vs transformers {want.sequences[:, -new:].tolist()}"
    err = (logits - torch.stack(want.logits, dim=1)).abs().max().item()
    assert err < TOLERANCE, f"max |step logits - transformers| = {err:.2e}"


def check_greedy(model, ref, vocab: int, *, window: Optional[int] = None, prefill_chunk: int = 4,
                 new: int = 20) -> None:
    """20 greedy tokens equal transformers': a short prompt, a left-padded batch, and a prompt
    longer than one prefill chunk and than `window` (fed to qkv in chunks of `prefill_chunk`)."""
    short = random_ids(1, 5, vocab, seed=3)
    got = model.generate(short, max_new_tokens=new, eos_token_id=None)
    want = hf_greedy(ref, short, None, new).sequences
    assert torch.equal(got, want), f"short prompt: qkv {got.tolist()} vs transformers {want.tolist()}"

    ids, mask = left_padded([7, 4], vocab, seed=5)
    got = model.generate(ids, attention_mask=mask.bool(), max_new_tokens=new, eos_token_id=None)
    want = hf_greedy(ref, ids, mask, new).sequences
    assert torch.equal(got[:, -new:], want[:, -new:]), \
        f"left-padded batch: qkv {got[:, -new:].tolist()} vs transformers {want[:, -new:].tolist()}"

    L = max(3 * prefill_chunk + 1, (window or 0) + prefill_chunk + 1)
    long = random_ids(1, L, vocab, seed=7)
    got = model.generate(long, max_new_tokens=new, prefill_chunk=prefill_chunk, eos_token_id=None)
    want = hf_greedy(ref, long, None, new).sequences
    assert torch.equal(got, want), (f"prompt of {L} tokens in chunks of {prefill_chunk}: qkv {got[0, L:].tolist()} "
                                    f"vs transformers {want[0, L:].tolist()}")


def check_tokenizer(folder, model, texts=("the cat sat on the mat", "queries keys and values")) -> None:
    """The ids of qkv's tokenizer equal those of transformers' fast tokenizer reading the same
    tokenizer.json. (Not AutoTokenizer: transformers 5 picks a family's own class by model_type,
    and e.g. Qwen2Tokenizer rebuilds Qwen's BPE pipeline around the file's vocabulary, which the
    word-level test tokenizer is not.)"""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in texts:
        got = model.tokenizer(text).input_ids[0].tolist()
        assert got == hf(text)["input_ids"], f"{text!r}: qkv {got} vs transformers {hf(text)['input_ids']}"


def padded_texts(model) -> tuple[torch.Tensor, torch.Tensor]:
    """TEXTS through an encoder's tokenizer: ids (B, L), attention mask (B, L) with padding."""
    batch = model.tokenizer(TEXTS)
    assert not bool(batch.attention_mask.all()), "the batch must contain padding"
    return batch.input_ids, batch.attention_mask


def masked_err(got: torch.Tensor, want: torch.Tensor, real: torch.Tensor) -> float:
    """max |got - want| over the real (not padding) positions of (B, L, ...) tensors."""
    return (got[real] - want[real]).abs().max().item()


def check_labels(model, want: torch.Tensor) -> None:
    """model.classify(TEXTS) gives the labels and probabilities of transformers' logits `want`
    (B, labels), and not one label for all (so the comparison can fail)."""
    probs = want.softmax(dim=-1)
    labels = model.classify(TEXTS, batch_size=3)
    assert [label for label, _ in labels] == [LABELS[int(i)] for i in probs.argmax(dim=-1)]
    assert torch.allclose(torch.tensor([p for _, p in labels]), probs.max(dim=-1).values, atol=1e-5)
    assert len({label for label, _ in labels}) > 1, "the classifier should not give one label to all"


def check_fill_mask(model, ref, text: str, top_k: int) -> tuple[torch.Tensor, list]:
    """model.fill_mask(text) gives, for each mask token of `text`, transformers' `top_k` most
    probable tokens with their probabilities; returns (ids (1, L) of `text`, qkv's fills)."""
    ids = model.tokenizer([text]).input_ids  # (1, L)
    with torch.no_grad():
        probs = ref(input_ids=ids).logits[0].softmax(dim=-1)  # (L, V)
    where = (ids[0] == model.tokenizer.token_to_id(model.mask_token)).nonzero().squeeze(1).tolist()
    got = model.fill_mask(text, top_k=top_k)
    assert len(got) == len(where) == text.count(model.mask_token)
    for fills, pos in zip(got, where):
        top = probs[pos].topk(top_k)
        assert [t for t, _ in fills] == [model.tokenizer.backend.id_to_token(int(i)) for i in top.indices]
        assert torch.allclose(torch.tensor([p for _, p in fills]), top.values, atol=1e-5)
    return ids, got
