"""The serving engine's counters, gauges and latency histograms, exported by the server at /metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qserve.engine_request import Event


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (seconds)."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = list(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class EngineMetrics:
    """Counters and gauges the server exports at /metrics."""

    received: int = 0
    rejected: int = 0  # queue full
    finished_by_reason: dict[str, int] = field(default_factory=dict)  # stop, length, cancelled, error
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_size: int = 0  # rows in the last decode step
    ttft: Histogram = field(default_factory=lambda: Histogram(_LATENCY_BUCKETS))
    inter_token: Histogram = field(default_factory=lambda: Histogram(_LATENCY_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(_LATENCY_BUCKETS))

    def finished(self, event: Event, seconds: float, prompt_tokens: int) -> None:
        reason = "error" if event.error else event.finish_reason
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.latency.observe(seconds)
