"""What `qkv bench` measures: the cases, dtypes and methods, and `BenchConfig` (see `qkv.bench`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FORMAT = "qkv.bench/1"
CASES = ("dense", "causal", "window", "gqa", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("qkv", "sdpa", "flex")


@dataclass(frozen=True)
class BenchConfig:
    """What `qkv bench` measures; `validate()` explains any bad value."""

    cases: tuple = CASES                      # any of CASES, in the order to run
    dtypes: tuple = ("float32", "bfloat16")   # any of DTYPES
    lengths: tuple = (1024, 4096, 16384)      # L of the self-attention cases
    decode_lengths: Optional[tuple] = None    # cache lengths of `decode`; None = `lengths`
    batch: int = 1                            # B
    heads: int = 8                            # H: query heads
    kv_heads: Optional[int] = None            # key/value heads of gqa and decode; None = H // 4
    dim: int = 64                             # D: head size (of queries, keys and values)
    window: int = 256                         # keys before each query in `window`
    repeats: int = 3                          # timed samples per method
    min_sample_s: float = 0.05                # a sample repeats a fast call until this long
    backend: str = "auto"                     # qkv.attention(..., backend=)
    flex: bool = False                        # also time compiled FlexAttention
    max_seconds: float = 60.0                 # skip a peer whose call would take longer
    max_memory_gib: float = 4.0               # skip a peer that would need more memory
    check_rows: int = 128                     # query rows compared with the float64 reference
    seed: int = 0                             # inputs are a function of seed, case, dtype, L
    threads: Optional[int] = None             # torch threads; None = torch's default

    @property
    def Hkv(self) -> int:
        return self.kv_heads if self.kv_heads is not None else max(1, self.heads // 4)

    def lengths_of(self, case: str) -> tuple:
        if case == "decode" and self.decode_lengths is not None:
            return tuple(self.decode_lengths)
        return tuple(self.lengths)

    def validate(self) -> "BenchConfig":
        for c in self.cases:
            if c not in CASES:
                raise ValueError(f"unknown case {c!r}; choose from {', '.join(CASES)}")
        if not self.cases:
            raise ValueError(f"no cases given; choose from {', '.join(CASES)}")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
        if not self.dtypes:
            raise ValueError(f"no dtypes given; choose from {', '.join(DTYPES)}")
        for name in ("cases", "dtypes", "lengths", "decode_lengths"):
            values = list(getattr(self, name) or ())
            twice = sorted({x for x in values if values.count(x) > 1}, key=str)
            if twice:
                raise ValueError(f"--{name.replace('_', '-')}: {', '.join(map(str, twice))} given more than once")
        for name in ("lengths", "decode_lengths"):
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise ValueError(f"--{name.replace('_', '-')} needs at least one length")
            for n in values:
                if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                    raise ValueError(f"--{name.replace('_', '-')}: {n!r} is not a positive length; "
                                     "give whole numbers of tokens, e.g. 1024 4096")
        for name, flag in (("batch", "--batch"), ("heads", "--heads"), ("dim", "--dim"),
                           ("repeats", "--repeats"), ("check_rows", "--check-rows")):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"{flag} must be a positive whole number; got {n!r}")
        if self.kv_heads is not None and (self.kv_heads <= 0 or self.heads % self.kv_heads):
            raise ValueError(f"--kv-heads {self.kv_heads} must be positive and divide --heads {self.heads} "
                             "(grouped-query attention shares each key/value head among Hq/Hkv query heads)")
        if self.window < 0:
            raise ValueError(f"--window must be 0 or more keys; got {self.window}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"--threads must be a positive number of threads; got {self.threads}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0; got {self.seed}")
        if not self.max_seconds > 0 or not self.max_memory_gib > 0 or self.min_sample_s < 0:
            raise ValueError(f"--max-seconds and --max-memory-gib must be positive; got {self.max_seconds} "
                             f"and {self.max_memory_gib}")
        from ..core import backends

        if self.backend != "auto" and self.backend not in backends():
            raise ValueError(f"unknown backend {self.backend!r}; choose one of "
                             + ", ".join(repr(b) for b in ["auto"] + backends()))
        return self

