"""Log2 histograms of durations, printed with bars as bpftrace's ``hist()`` prints them."""

from __future__ import annotations

__all__ = ["Log2Histogram"]

_BAR_WIDTH = 52


def _percentile(ordered: list[int], fraction: float) -> int:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Log2Histogram:
    """Durations in nanoseconds, bucketed by powers of two: bucket k holds [2^k, 2^(k+1)), bucket 0 also 0."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def add(self, value: int) -> None:
        self.values.append(max(0, value))

    def buckets(self) -> list[tuple[int, int, int]]:
        """(low, high, count) for every bucket from the lowest to the highest used, empty ones included."""
        if not self.values:
            return []
        counts: dict[int, int] = {}
        for value in self.values:
            k = max(0, value.bit_length() - 1)
            counts[k] = counts.get(k, 0) + 1
        return [(0 if k == 0 else 1 << k, (1 << (k + 1)) - 1, counts.get(k, 0))
                for k in range(min(counts), max(counts) + 1)]

    def summary(self) -> dict:
        ordered = sorted(self.values)
        if not ordered:
            return {"count": 0}
        return {"count": len(ordered), "mean_ns": sum(ordered) // len(ordered), "p50_ns": _percentile(ordered, 0.5),
                "p99_ns": _percentile(ordered, 0.99), "max_ns": ordered[-1], "min_ns": ordered[0]}

    def render(self, unit: str = "ns") -> str:
        """The histogram as text: ``[1K, 2K)   12 |@@@@@   |`` lines, then count, mean, p50, p99, max."""
        buckets = self.buckets()
        if not buckets:
            return "no calls completed\n"
        peak = max(count for _, _, count in buckets)
        lines = []
        for low, high, count in buckets:
            bar = "@" * (count * _BAR_WIDTH // peak if peak else 0)
            label = f"[{_human(low)}, {_human(high + 1)})"
            lines.append(f"{label:<14} {count:>8} |{bar:<{_BAR_WIDTH}}|")
        s = self.summary()
        lines.append(f"count {s['count']}  mean {_human(s['mean_ns'])}{unit}  p50 {_human(s['p50_ns'])}{unit}  "
                     f"p99 {_human(s['p99_ns'])}{unit}  max {_human(s['max_ns'])}{unit}")
        return "\n".join(lines) + "\n"


def _human(value: int) -> str:
    for suffix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= scale and value % scale == 0:
            return f"{value // scale}{suffix}"
    return str(value)
