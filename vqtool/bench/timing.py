"""Timing calls: latency percentiles and throughput, and contenders timed in alternating rounds."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ROUNDS = 3


@dataclass(frozen=True)
class Timing:
    images_per_s: float
    p50_ms: float
    p99_ms: float
    iterations: int


def call_latencies(
    call: Callable[[], object], *, warmup: int = 3, min_seconds: float = 1.0, min_iterations: int = 10
) -> np.ndarray:
    """Seconds per call, after a warm-up, for at least `min_seconds` and `min_iterations` calls."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < min_iterations or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - begin)
    return np.asarray(latencies)


def _timing(latencies: np.ndarray, images: int, images_per_s: float | None = None) -> Timing:
    return Timing(
        images * len(latencies) / latencies.sum() if images_per_s is None else images_per_s,
        float(np.percentile(latencies, 50) * 1e3),
        float(np.percentile(latencies, 99) * 1e3),
        len(latencies),
    )


def time_calls(
    call: Callable[[], object], images: int, *, warmup: int = 3, min_seconds: float = 1.0, min_iterations: int = 10
) -> Timing:
    """Latency percentiles per call and throughput over all calls, after a warm-up."""
    latencies = call_latencies(call, warmup=warmup, min_seconds=min_seconds, min_iterations=min_iterations)
    return _timing(latencies, images)


def time_interleaved(
    calls: Sequence[Callable[[], object]], images: int, *, seconds: float = 1.0, rounds: int = ROUNDS
) -> list[tuple[Timing, list[float]]]:
    """Time several contenders in alternating rounds: (timing, throughput per round) for each.

    A shared machine drifts in speed over seconds; in rounds every contender sees the same drift,
    so per-round ratios between them hold even when absolute figures move. Throughput is the median
    over rounds; latency percentiles pool all calls.
    """
    latencies: list[list[np.ndarray]] = [[] for _ in calls]
    for _ in range(rounds):
        for index, call in enumerate(calls):
            latencies[index].append(call_latencies(call, min_seconds=seconds / rounds, min_iterations=3))
    results = []
    for per_round in latencies:
        speeds = [images * len(lat) / lat.sum() for lat in per_round]
        results.append((_timing(np.concatenate(per_round), images, float(np.median(speeds))), speeds))
    return results
