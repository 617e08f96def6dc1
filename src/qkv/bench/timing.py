"""The one timer of `qkv bench` and of every script in benchmarks/.

The clock is `torch.utils.benchmark.timer`, the clock of `torch.utils.benchmark.Timer`: it
synchronises the accelerator (CUDA) before it reads `time.perf_counter`, so a sample ends
when the device work does. A sample runs the call `calls` times through Python's `timeit`
(garbage collection off, as `torch.utils.benchmark.Timer` does too) and is divided by the
count. We do not call `Timer.timeit`/`blocked_autorange` themselves: they add at least two
warm-up calls to every sample (tripling the cost of a slow call) and pin torch to one thread
unless told otherwise, which would change what `qkv bench` measures.

The method, after the timeit module's documentation ("the best of a few repeats is the least
noisy estimate on a shared machine"):

- a first call, timed apart (`first_call_s`: for a compiled peer it includes compilation);
- if that call was faster than `min_sample_s` (or compiled), one more call sizes the samples:
  a sample repeats the call until it lasts at least `min_sample_s` (at most 10,000 calls);
- `repeats` samples per function, the functions interleaved (one sample of each in turn), so
  a burst of load from elsewhere hits all of them alike; the best sample is the estimate.

See docs/architecture.md.
"""

from __future__ import annotations

import math
import timeit
from typing import Callable, Optional

from torch.utils.benchmark import timer as clock

__all__ = ["Sampler", "best_of", "best_of_turns", "best_times", "clock", "sample_in_turns"]


class Sampler:
    """Samples of one function's calls.

    Args:
        fn: the call to time, without arguments (its result is returned by `first`).
        min_sample_s: a sample repeats a fast call until it lasts this long (0: one call each).
        compiles: the first call compiles: always size the samples by a second call.
    """

    def __init__(self, fn: Callable[[], object], min_sample_s: float = 0.0, *, compiles: bool = False):
        self.fn, self.min_sample_s, self.compiles = fn, min_sample_s, compiles
        self._timer = timeit.Timer(fn, timer=clock)
        self.samples: list[float] = []
        self.calls = 1
        self.first_call_s: Optional[float] = None

    def first(self):
        """The first call, timed apart; its result."""
        t0 = clock()
        out = self.fn()
        self.first_call_s = clock() - t0
        # a fast call (or one whose first call was mostly compilation): time one more to size the samples
        if self.compiles or self.first_call_s < self.min_sample_s:
            once = max(self._timer.timeit(1), 1e-7)
            self.calls = max(1, min(10_000, math.ceil(self.min_sample_s / once)))
        return out

    def sample(self) -> None:
        self.samples.append(self._timer.timeit(self.calls) / self.calls)

    def summary(self) -> dict:
        """seconds (the best sample), median_s, samples_s, calls_per_sample, first_call_s."""
        s = sorted(self.samples)
        mid = len(s) // 2
        return {"seconds": s[0], "median_s": s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2,
                "samples_s": self.samples, "calls_per_sample": self.calls, "first_call_s": self.first_call_s}


def sample_in_turns(samplers: dict, repeats: int, step: Optional[Callable[[str], None]] = None) -> dict:
    """`repeats` rounds of one sample of each Sampler in turn; {name: its summary()}.
    `step(label)` (optional) is told before each sample, for a progress bar."""
    for r in range(repeats):
        for name, s in samplers.items():
            if step is not None:
                step(f"{name} {r + 1}/{repeats}")
            s.sample()
    return {name: s.summary() for name, s in samplers.items()}


def best_of_turns(fns: dict, *, repeats: int, min_sample_s: float = 0.0, warmup: bool = True) -> dict:
    """Each function of `fns` ({name: callable}) called once apart, then `repeats` samples of all
    in turns; {name: summary}, best time at ["seconds"]. With `warmup=False` the first call
    counts as the first sample (for calls too long to repeat): `repeats` calls in all."""
    samplers = {name: Sampler(fn, min_sample_s) for name, fn in fns.items()}
    for s in samplers.values():
        s.first()
        if not warmup:
            s.samples.append(s.first_call_s)
    return sample_in_turns(samplers, repeats - (not warmup))


def best_of(fn: Callable[[], object], *, repeats: int, min_sample_s: float = 0.0, warmup: bool = True) -> dict:
    """`best_of_turns` of one function: its summary, best time at ["seconds"]."""
    return best_of_turns({"": fn}, repeats=repeats, min_sample_s=min_sample_s, warmup=warmup)[""]


def best_times(fns: dict, *, repeats: int, min_sample_s: float = 0.0, warmup: bool = True) -> dict:
    """`best_of_turns` reduced to {name: best seconds}."""
    runs = best_of_turns(fns, repeats=repeats, min_sample_s=min_sample_s, warmup=warmup)
    return {name: s["seconds"] for name, s in runs.items()}
