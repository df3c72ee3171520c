"""app/metrics.py's batched counts: what `flush` writes is what the same calls made one by one would have
written, and nothing reaches the metric before it."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram

from app.metrics import LATENCY_BUCKETS, BatchedCounter, BatchedHistogram


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for metric in registry.collect() for sample in metric.samples if not sample.name.endswith("_created")}


def test_a_batched_histogram_flushes_what_observing_one_by_one_writes() -> None:
    direct, batched = CollectorRegistry(), CollectorRegistry()
    one_by_one = Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=direct)
    later = BatchedHistogram(Histogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=batched))
    rng = random.Random(7)
    # Every bound itself (`le` is inclusive), just above each, zero, and the tail past the last finite bound.
    amounts = [*LATENCY_BUCKETS, *(bound * 1.0001 for bound in LATENCY_BUCKETS), 0.0, 31.0, 1e9]
    amounts += [rng.expovariate(20) for _ in range(2000)]
    for amount in amounts:
        one_by_one.observe(amount)
        later.observe(amount)
    before = samples(batched)
    assert before[("h_seconds_count", ())] == 0  # nothing written before the flush
    later.flush()
    assert samples(batched) == samples(direct)
    later.flush()  # nothing new: nothing more
    assert samples(batched) == samples(direct)


def test_a_batched_counter_writes_its_sum_at_the_flush_only() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["outcome"], registry=registry)
    batched = BatchedCounter(counter.labels(outcome="delivered"))
    for _ in range(5):
        batched.inc()
    batched.inc(2.5)
    assert samples(registry) == {("c_total", (("outcome", "delivered"),)): 0.0}  # nothing written yet
    batched.flush()
    assert samples(registry)[("c_total", (("outcome", "delivered"),))] == 7.5
    batched.flush()
    assert samples(registry)[("c_total", (("outcome", "delivered"),))] == 7.5
