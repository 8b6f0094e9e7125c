"""Time stamps of records: the time stamp counter the target's threads read, as CLOCK_MONOTONIC nanoseconds.

Our own ``rdtsc`` (a four-instruction function encoded by iced-x86, mapped executable in the tool and called
through ctypes) is read next to ``clock_gettime``; two such pairs, the first at the start and the other
refreshed at every read, give the scale. The counter is invariant (``constant_tsc``, ``nonstop_tsc``) and
shared by every CPU on the machines this runs on; the pair taken between the closest two clock reads is kept.
"""

from __future__ import annotations

import ctypes
import mmap
import time

import numpy

from ...x86_64.codegen import encode
from ...x86_64.trampolines import tsc_reader

__all__ = ["TscClock"]

_SAMPLES = 5


class TscClock:
    """Converts time stamp counter values to CLOCK_MONOTONIC nanoseconds."""

    def __init__(self) -> None:
        code = b"".join(encode(tsc_reader(), 0))
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
        self._start = self._pair()
        time.sleep(0.001)
        self._now = self._pair()

    def _pair(self) -> tuple[int, int]:
        """(tsc, ns) read as close together as a few tries get them."""
        best = None
        for _ in range(_SAMPLES):
            before = time.monotonic_ns()
            tsc = self._rdtsc()
            after = time.monotonic_ns()
            if best is None or after - before < best[0]:
                best = (after - before, tsc, (before + after) // 2)
        return best[1], best[2]

    def to_ns(self, tsc: numpy.ndarray) -> numpy.ndarray:
        """CLOCK_MONOTONIC nanoseconds of ``tsc`` values (uint64), with the scale measured up to now."""
        self._now = self._pair()
        (tsc0, ns0), (tsc1, ns1) = self._start, self._now
        scale = (ns1 - ns0) / (tsc1 - tsc0)
        delta = tsc.astype(numpy.int64) - numpy.int64(tsc0)
        return ns0 + numpy.rint(delta * scale).astype(numpy.int64)
