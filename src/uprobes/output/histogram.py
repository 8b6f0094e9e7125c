"""Histograms of integers (durations, an argument's values), printed with bars as bpftrace's ``hist()`` prints
them.

Log2 buckets: ``[0, 2)``, then ``[2^k, 2^(k+1))``; a negative value goes to the mirror bucket ``(-2^(k+1), -2^k]``
(``-1`` to ``(-2, -1]``). Linear buckets of ``step``: ``[n*step, (n+1)*step)``. Each bucket is kept as its lowest
and highest value. Empty buckets between used ones are listed, unless there would be more than
:data:`MOST_BUCKETS` in all.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Histogram", "MOST_BUCKETS", "duration"]

_BAR_WIDTH = 52
MOST_BUCKETS = 1024  # a range of more buckets lists only those used


def _percentile(ordered: list[int], fraction: float) -> int:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Histogram:
    """Values bucketed by powers of two, or by ``step`` (linear)."""

    def __init__(self, step: int | None = None) -> None:
        self.step = step
        self.values: list[int] = []

    def add(self, value: int) -> None:
        self.values.append(value)

    def extend(self, values) -> None:
        self.values.extend(values)

    def _bucket(self, value: int) -> int:
        """The bucket's number: ordered as the values are."""
        if self.step is not None:
            return value // self.step
        if value >= 0:
            return max(0, value.bit_length() - 1)
        return -1 - max(0, (-value).bit_length() - 1)

    def _bounds(self, bucket: int) -> tuple[int, int]:
        """Lowest and highest value of bucket number ``bucket``."""
        if self.step is not None:
            return bucket * self.step, (bucket + 1) * self.step - 1
        if bucket >= 0:
            return (0 if bucket == 0 else 1 << bucket), (1 << (bucket + 1)) - 1
        k = -1 - bucket
        return -((1 << (k + 1)) - 1), -(1 << k)

    def buckets(self) -> list[tuple[int, int, int]]:
        """(low, high, count) for every bucket from the lowest to the highest used, empty ones included where
        there are at most :data:`MOST_BUCKETS` of them (else only those used)."""
        if not self.values:
            return []
        counts: dict[int, int] = {}
        for value in self.values:
            bucket = self._bucket(value)
            counts[bucket] = counts.get(bucket, 0) + 1
        span = range(min(counts), max(counts) + 1)
        return [(*self._bounds(bucket), counts.get(bucket, 0))
                for bucket in (span if len(span) <= MOST_BUCKETS else sorted(counts))]

    def summary(self, suffix: str = "") -> dict:
        """count, mean, p50, p99, max and min (each name followed by ``suffix``: ``_ns``)."""
        ordered = sorted(self.values)
        if not ordered:
            return {"count": 0}
        return {"count": len(ordered), f"mean{suffix}": sum(ordered) // len(ordered),
                f"p50{suffix}": _percentile(ordered, 0.5), f"p99{suffix}": _percentile(ordered, 0.99),
                f"max{suffix}": ordered[-1], f"min{suffix}": ordered[0]}

    def render(self, label: Callable[[int], str] | None = None, empty: str = "no values") -> str:
        """The histogram as text: ``[1K, 2K)   12 |@@@@@   |`` lines, then count, min, mean, p50, p99, max;
        ``label`` writes a value (:func:`duration` for nanoseconds)."""
        label = label or _human
        buckets = self.buckets()
        if not buckets:
            return f"{empty}\n"
        peak = max(count for _, _, count in buckets)
        lines = []
        for low, high, count in buckets:
            bar = "@" * (count * _BAR_WIDTH // peak if peak else 0)
            mirrored = low < 0 and self.step is None
            bounds = f"({label(low - 1)}, {label(high)}]" if mirrored else f"[{label(low)}, {label(high + 1)})"
            lines.append(f"{bounds:<16} {count:>8} |{bar:<{_BAR_WIDTH}}|")
        s = self.summary()
        lines.append(f"count {s['count']}  " + "  ".join(f"{name} {label(s[name])}"
                                                        for name in ("min", "mean", "p50", "p99", "max")))
        return "\n".join(lines) + "\n"


def duration(ns: int) -> str:
    """``ns`` nanoseconds to three significant digits, in the unit that suits: 512ns, 16.4µs, 1.05ms, 2.5s."""
    if abs(ns) >= 999_500_000_000:
        return f"{ns / 10**9:.0f}s"
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("µs", 10**3)):
        if abs(ns) >= scale - scale // 2000:  # 999.5µs is 1ms, not 1e+03µs
            return f"{ns / scale:.3g}{unit}"
    return f"{ns}ns"


def _human(value: int) -> str:
    for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(value) >= scale and value % scale == 0:
            return f"{value // scale}{suffix}"
    return str(value)
