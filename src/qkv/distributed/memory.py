"""Peak resident memory of a stretch of code, for the demo and the benchmark (Linux /proc)."""

from __future__ import annotations

import os
import resource
import threading
import time
from typing import Callable, Optional

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakRSS:
    """Peak RSS increase over the baseline taken on entry, in bytes (`.peak`).

    A thread samples RSS every `interval` s (and may call `on_exceed` once the increase
    passes `limit` bytes); the kernel's lifetime maximum (ru_maxrss) is used too whenever
    it grew inside the block, so short spikes between samples are not missed.
    """

    def __init__(self, interval: float = 0.002, limit: Optional[int] = None,
                 on_exceed: Optional[Callable[[int], None]] = None):
        self.interval, self.limit, self.on_exceed = interval, limit, on_exceed
        self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self.base = rss_bytes()
        self._max_before = _maxrss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            if self.limit is not None and self.peak > self.limit and self.on_exceed is not None:
                self.on_exceed(self.peak)
                return
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)
        max_after = _maxrss_bytes()
        if max_after > self._max_before:  # a new lifetime high was reached inside the block
            self.peak = max(self.peak, max_after - self.base)
