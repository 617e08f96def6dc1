"""Decoders whose rotary frequencies depend on the length a forward pass reaches (RoPE scaling
types `dynamic` and `longrope`, nn/positions.py), run so that qkv's cached and chunked passes
give transformers' results.

transformers chooses these frequencies once per forward pass, from the largest position it
holds (`dynamic_rope_update`). qkv runs a prompt in chunks (chunked prefill, generation.py):
without more, each chunk would choose for itself, and a prompt longer than
original_max_position_embeddings would store its first chunks' keys with the short factors
where transformers' one pass uses the long ones. `LengthDependentRope` marks the passes that run
in pieces: `generate` marks its prompt, `hidden(..., chunk_size=...)` its input; every
`RotaryEmbedding` of the model then takes its frequencies for the whole pass (its `reach`).
Decoding steps choose for themselves, as transformers' do; keys already cached keep their
rotation, as in transformers (Phi-3 recomputes its cache at the switch, phi3.py).

It also lets a `dynamic` model run past max_position_embeddings, which is what dynamic scaling
is for: up to factor x max_position_embeddings (transformers sets no limit).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import Tensor

from ..nn import RotaryEmbedding
from .generation import check_chunk_size


class LengthDependentRope:
    """Mixin for a `CausalLM` (listed before it) whose rotary embeddings may depend on the
    length reached; a no-op for models whose RoPE does not (default, linear, llama3, yarn)."""

    _generation: Optional[dict] = None  # while `generate` runs: {"reach", "prompt"} (phi3.py adds)

    def _length_rotaries(self) -> list[RotaryEmbedding]:
        """The model's rotary embeddings whose frequencies depend on the length (found once)."""
        found = self.__dict__.get("_rope_by_length")
        if found is None:
            found = [m for m in self.modules() if isinstance(m, RotaryEmbedding) and m.depends_on_length]
            self.__dict__["_rope_by_length"] = found
        return found

    @contextmanager
    def one_pass(self, length: Optional[int]) -> Iterator[None]:
        """Calls inside run as pieces of one forward pass reaching `length` tokens (None: no effect)."""
        rotaries = self._length_rotaries() if length is not None else []
        before = [r.reach for r in rotaries]
        for r in rotaries:
            r.reach = length
        try:
            yield
        finally:
            for r, reach in zip(rotaries, before):
                r.reach = reach

    def hidden(self, input_ids: Tensor, *, attention_mask: Optional[Tensor] = None, cache=None,
               positions: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
        """`CausalLM.hidden`; an input run in chunks is one pass (its largest position + 1)."""
        reach = None
        check_chunk_size(chunk_size)
        if (chunk_size is not None and self._length_rotaries() and input_ids.dim() == 2
                and input_ids.shape[1] > chunk_size):
            start = cache.length if cache is not None else 0
            # transformers' one pass over these tokens reaches its largest position + 1
            reach = start + input_ids.shape[1] if positions is None else int(positions.max()) + 1
        with self.one_pass(reach):
            return super().hidden(input_ids, attention_mask=attention_mask, cache=cache, positions=positions,
                                  chunk_size=chunk_size)

    def generate(self, prompt, *, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        """`CausalLM.generate`; the prompt, however it is chunked, is one pass."""
        if not self._length_rotaries():
            return super().generate(prompt, attention_mask=attention_mask, **kwargs)
        reach, slots = self._prompt_length(prompt, attention_mask)
        self._generation = {"reach": reach, "prompt": slots}
        try:
            with self.one_pass(reach):
                return super().generate(prompt, attention_mask=attention_mask, **kwargs)
        finally:
            self._generation = None

    def _prompt_length(self, prompt, attention_mask: Optional[Tensor]) -> tuple[Optional[int], Optional[int]]:
        """(largest position + 1 of the prompt, its slots with padding): the prompt's
        positions count real tokens only, as `generate` gives them; (None, None) where
        `generate` itself refuses the prompt."""
        if isinstance(prompt, Tensor):
            slots = prompt.shape[-1]
            if attention_mask is None:
                return slots, slots
            return int(attention_mask.long().sum(dim=-1).max()), slots
        if isinstance(prompt, (str, list, tuple)) and self.tokenizer is not None and attention_mask is None:
            lengths = self.tokenizer(prompt, max_length=10**9).lengths  # (N,) real tokens per text
            return int(lengths.max()), int(lengths.max())
        return None, None

    @property
    def max_positions(self) -> int:
        longest = [r.max_length for r in self._length_rotaries() if r.max_length is not None]
        return max([super().max_positions, *longest])

    @property
    def positions_text(self) -> str:
        longest = [r.max_length for r in self._length_rotaries() if r.max_length is not None]
        if not longest or max(longest) <= super().max_positions:
            return super().positions_text
        factor = float(next(r for r in self._length_rotaries() if r.max_length).rope_scaling["factor"])
        return "{n} positions ({field}=" + f"{super().max_positions} times the dynamic rope factor {factor:g})"
