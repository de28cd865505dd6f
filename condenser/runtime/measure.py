"""Latency and parity of a model as deployed.

Latency is reported as the median (the figure the pipeline's metrics have always used, robust to the
odd slow call on a shared machine) and the 95th percentile (how bad the slow calls get), together with
the repeats, warmup and thread count it was taken with, since a latency means nothing without them.
Parity checks the deployed ONNX file against the PyTorch model that the quality metrics were computed on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from condenser.runtime.onnx import session


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p95_ms: float
    repeats: int
    warmup: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def latency(fn: Callable[[], Any], repeats: int, warmup: int = 3, threads: int | None = None) -> Latency:
    """Time `repeats` calls of fn() after `warmup` untimed ones (which fill caches and let lazy
    initialisation happen), under torch.no_grad(). `threads` is only recorded, never applied; by default
    it is PyTorch's intra-op thread count, the one that applies to a PyTorch callable."""
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return Latency(median_ms=float(np.median(times) * 1000), p95_ms=float(np.percentile(times, 95) * 1000),
                   repeats=repeats, warmup=warmup,
                   threads=torch.get_num_threads() if threads is None else threads)


def onnx_latency(path: Path, feed: dict[str, np.ndarray], repeats: int, warmup: int = 3,
                 threads: int | None = None) -> Latency:
    """Latency of one ONNX Runtime CPU run of the file at `path` on `feed`; `threads` as for `session`."""
    runner = session(path, threads)
    # ONNX Runtime reports 0 for its default thread count and exposes no other figure; its default pool
    # has one thread per physical core, counted with cpuinfo over the whole machine, which is what
    # psutil's physical core count reads too.
    used = threads if threads is not None else psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return latency(lambda: runner.run(None, feed), repeats, warmup, threads=used)


def timed_rounds(calls: dict[str, Callable[[], Any]], repeats: int, rounds: int = 5, warmup: int = 3,
                 progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, list[list[float]]]:
    """Milliseconds of each call, per round: every call is warmed up, then each of `rounds` rounds times every
    one in turn (repeats // rounds calls each), so a slow spell of a shared machine (another process, a clock
    change) falls on all of them alike instead of on whichever was timed then. `progress` wraps the rounds."""
    per_round = max(1, repeats // rounds)
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[list[float]]] = {name: [] for name in calls}
    for _ in (progress or iter)(range(rounds)):
        for name, call in calls.items():
            laps = []
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                laps.append((time.perf_counter() - start) * 1000)
            times[name].append(laps)
    return times


def compare_calls(calls: dict[str, Callable[[], Any]], repeats: int, rounds: int = 5, warmup: int = 3,
                  threads: int = 1) -> dict[str, Latency]:
    """Latency of several callables measured side by side (`timed_rounds`). The figures of one call are
    comparable; their ratios are what a comparison reports. `threads` is recorded, not applied."""
    out = {}
    for name, per_round in timed_rounds(calls, repeats, rounds, warmup).items():
        laps = np.concatenate(per_round)
        out[name] = Latency(median_ms=float(np.median(laps)), p95_ms=float(np.percentile(laps, 95)),
                            repeats=len(laps), warmup=warmup, threads=threads)
    return out


def compare_latency(files: dict[str, Path], feed: dict[str, np.ndarray], repeats: int, rounds: int = 5,
                    warmup: int = 3, threads: int | None = None) -> dict[str, Latency]:
    """ONNX Runtime CPU latency of several files on the same `feed`, side by side (`compare_calls`)."""
    runners = {name: session(path, threads) for name, path in files.items()}
    used = threads if threads is not None else psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return compare_calls({name: (lambda r=runner: r.run(None, feed)) for name, runner in runners.items()},
                         repeats, rounds, warmup, used)


def output_parity(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Largest and mean absolute difference between two outputs of the same inputs."""
    diff = (actual.float() - expected.float()).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}


def parity(model: nn.Module, path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Max absolute difference between the first output of `model` (eval mode, no grad) and of the ONNX
    file at `path`, on the same `inputs` (keyed by the ONNX input names, in the model's argument order):
    the deployed file against the simulation the quality metrics were measured on."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(*inputs.values())
    finally:
        model.train(training)
    if not isinstance(expected, torch.Tensor):
        expected = expected[0]
    actual = session(path).run(None, {name: t.detach().cpu().numpy() for name, t in inputs.items()})[0]
    return float(np.abs(expected.detach().cpu().numpy() - actual).max())
